"""TRADES and MART on the method contract: each training loss against its
paper's formula written out by hand (value and weight gradients), each attack
against the ε-ball, [0, 1] and the quantity it ascends, the cost model against
the passes actually run, the presets' defaults, training, exact resume and bad
input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import trained_model
from advtrain import MARTPolicy, MARTTrainer, TRADESPolicy, TRADESTrainer
from advtrain.data.batch import Batch
from advtrain.methods import METHODS, Passes
from advtrain.methods.mart import log_one_minus_top_other
from advtrain.methods.trades import kl_from_clean
from advtrain.models import SmallCNN
from advtrain.policies import LossContext, Perturbation
from advtrain.training import Callback, load_checkpoint

EPS = 8 / 255


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, width=4).to(dtype)


def hand_batch(n: int = 6, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A batch of 8×8 images and a fixed perturbation of at most ε."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.arange(n) % 3
    delta = EPS * (2 * torch.rand(n, 3, 8, 8, generator=g, dtype=dtype) - 1)
    return Batch(x, y, torch.arange(n)), (x + delta).clamp(0, 1)


def training_context(model: nn.Module, label_smoothing: float = 0.0) -> LossContext:
    model.train()
    return LossContext(forward=lambda x, sites=None: model(x), label_smoothing=label_smoothing)


def weight_grads(loss: torch.Tensor, model: nn.Module):
    return torch.autograd.grad(loss, [p for p in model.parameters()])


def synthetic(n: int = 48, seed: int = 0):
    """8×8 images whose class (of 3) is the brightest channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


# -------------------------------------------------------------------- TRADES
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_trades_loss_is_clean_cross_entropy_plus_beta_times_the_kl_by_hand(label_smoothing):
    model = tiny_model(dtype=torch.float64)
    batch, x_adv = hand_batch(dtype=torch.float64)
    policy = TRADESPolicy(beta=6.0)
    out = policy.loss(training_context(model, label_smoothing), batch, Perturbation(x=x_adv))

    clean, adv = model(batch.x), model(x_adv)
    p, q = clean.softmax(1), adv.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1)  # the clean distribution first, gradients through both
    n_classes = clean.shape[1]
    soft = (1 - label_smoothing) * F.one_hot(batch.y, n_classes) + label_smoothing / n_classes
    natural = -(soft * clean.log_softmax(1)).sum(1).mean()
    expected = natural + 6.0 * kl.mean()

    # torch's cross-entropy applies a label smoothing in single precision
    tol = 1e-12 if label_smoothing == 0 else 1e-7
    torch.testing.assert_close(out.loss, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out.logits, adv)
    for got, want in zip(weight_grads(out.loss, model), weight_grads(expected, model)):
        torch.testing.assert_close(got, want, rtol=1e3 * tol, atol=tol)


def test_trades_attack_ascends_the_kl_inside_the_ball_in_eval_mode():
    model, (x, y) = trained_model(0)
    x, y = x[:32], y[:32]
    model.train()
    flags = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    policy = TRADESPolicy(EPS, steps=10)
    torch.manual_seed(3)
    x_adv = policy.perturb(model, Batch(x, y, torch.arange(32))).x
    torch.manual_seed(3)
    start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    uniform = (x + EPS * (2 * torch.rand_like(x) - 1)).clamp(0, 1)

    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    # the attack ran in eval mode: flags restored, BatchNorm statistics untouched, no weight gradients
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    with torch.no_grad():
        clean_log_probs = model(x).log_softmax(1)
        kl_adv, kl_start, kl_uniform = (kl_from_clean(model(z), clean_log_probs) for z in (x_adv, start, uniform))
    assert bool((kl_adv >= kl_start).all())
    assert bool((kl_adv >= kl_uniform).float().mean() >= 0.9)
    assert float(kl_adv.mean()) > 3 * float(kl_uniform.mean()) > 0


def test_trades_attack_loss_refuses_labels_for_the_clean_prediction():
    with pytest.raises(ValueError, match="clean_log_probs"):
        kl_from_clean(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


# ---------------------------------------------------------------------- MART
def test_mart_loss_is_the_papers_formula_by_hand():
    model = tiny_model(dtype=torch.float64)
    batch, x_adv = hand_batch(dtype=torch.float64)
    policy = MARTPolicy(lam=5.0)
    out = policy.loss(training_context(model), batch, Perturbation(x=x_adv))

    def formula(detach_weights: bool = False) -> torch.Tensor:
        clean, adv = model(batch.x), model(x_adv)
        p, q = clean.softmax(1), adv.softmax(1)
        y = batch.y
        others = q.clone()
        others[torch.arange(len(y)), y] = 0
        bce = -q[torch.arange(len(y)), y].log() - (1 - others.max(1).values).log()
        kl = (p * (p.log() - q.log())).sum(1)
        weight = 1 - p[torch.arange(len(y)), y]
        if detach_weights:
            weight = weight.detach()
        return bce.mean() + 5.0 * (kl * weight).mean()

    expected = formula()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    got_grads = weight_grads(out.loss, model)
    for got, want in zip(got_grads, weight_grads(expected, model)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # the weights 1 − p_y(x) take part in the gradient: detaching them changes it
    detached = weight_grads(formula(detach_weights=True), model)
    assert any(not torch.allclose(g, d, rtol=1e-6, atol=1e-10) for g, d in zip(got_grads, detached))


def test_mart_margin_term_stays_finite_where_a_wrong_class_takes_all_the_probability():
    logits = torch.tensor([[0.0, 40.0, 0.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 0])
    got = log_one_minus_top_other(logits, y)
    p = logits.double().softmax(1)
    want = torch.stack([torch.log(p[0, 0] + p[0, 2]), torch.log(1 - p[1, 2])]).float()
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mart_attack_raises_the_cross_entropy_inside_the_ball():
    model, (x, y) = trained_model(0)
    x, y = x[:32], y[:32]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    torch.manual_seed(5)
    x_adv = MARTPolicy(EPS, steps=10).perturb(model, Batch(x, y, torch.arange(32))).x
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    model.eval()
    with torch.no_grad():
        ce_adv, ce_clean = (F.cross_entropy(model(z), y, reduction="none") for z in (x_adv, x))
    assert bool((ce_adv >= ce_clean).all()) and float(ce_adv.mean()) > 2 * float(ce_clean.mean())


# ---------------------------------------------------- both: cost, presets, runs
class PassCounter:
    """Counts a model's forward passes in eval mode (the attacks') and in
    train mode (the loss's), and the backward passes through its first layer
    that follow each kind."""

    def __init__(self, model: nn.Module, first: nn.Module) -> None:
        self.forwards = {"eval": 0, "train": 0}
        self.backwards = {"eval": 0, "train": 0}
        model.register_forward_hook(self._forward)
        first.register_forward_hook(self._first_layer)

    def _forward(self, module, _inputs, _output):
        self.forwards["train" if module.training else "eval"] += 1

    def _first_layer(self, module, _inputs, output):
        if output.requires_grad:
            mode = "train" if module.training else "eval"
            output.register_hook(lambda _g: self.backwards.__setitem__(mode, self.backwards[mode] + 1))


@pytest.mark.parametrize("name", ["trades", "mart"])
@pytest.mark.parametrize("steps", [1, 3])
def test_the_registry_counts_the_passes_one_training_step_runs(name, steps):
    method = METHODS[name]
    trainer = method.build(tiny_model(), steps=steps, progress=False, device="cpu", channels_last=False)
    counter = PassCounter(trainer.model, trainer.model.stage1[0])
    batch, _ = hand_batch(8)
    loss, _ = trainer.train_step(batch)
    assert math.isfinite(float(loss))
    passes = method.passes(steps=steps)
    assert passes.forward == counter.forwards["eval"] + counter.forwards["train"]
    assert counter.forwards["train"] == 2  # the clean and the adversarial training forward
    assert passes.input_backward == counter.backwards["eval"] == steps
    assert passes.full_backward == counter.backwards["train"] == 2  # one backward through both
    assert method.passes() == Passes(forward=13 if name == "trades" else 12, input_backward=10, full_backward=2)
    assert {"eps", "steps"} <= set(method.options) and method.compiles


@pytest.mark.parametrize("preset, policy, weight, value", [
    (TRADESTrainer, TRADESPolicy, "beta", 6.0), (MARTTrainer, MARTPolicy, "lam", 5.0)])
def test_presets_hold_the_defaults_and_pass_their_knobs_on(preset, policy, weight, value):
    trainer = preset(tiny_model(), progress=False, device="cpu")
    assert isinstance(trainer.policy, policy)
    assert (trainer.policy.eps, trainer.policy.steps, trainer.policy.step_size) == (EPS, 10, EPS / 4)
    assert getattr(trainer.policy, weight) == value
    assert trainer.policy.attack.bn_mode == "eval" and not trainer.policy.attack.random_start
    assert (trainer.epochs, trainer.lr, trainer.weight_decay, trainer.momentum, trainer.pad_fill) == \
        (30, 0.2, 5e-4, 0.9, 0.0)
    assert trainer.lr_schedule(0) == 0 and trainer.lr_schedule(15) == pytest.approx(0.2)  # cyclic
    custom = preset(tiny_model(), eps=4 / 255, steps=3, step_size=0.01, **{weight: 1.5}, epochs=2,
                    progress=False, device="cpu")
    assert (custom.policy.eps, custom.policy.steps, custom.policy.step_size, getattr(custom.policy, weight),
            custom.epochs) == (4 / 255, 3, 0.01, 1.5, 2)
    assert custom.policy.attack.eps == 4 / 255 and custom.policy.attack.steps == 3


@pytest.mark.parametrize("preset", [TRADESTrainer, MARTTrainer])
def test_a_few_epochs_learn_the_synthetic_task(preset):
    data = synthetic(48)
    trainer = preset(tiny_model(), steps=2, epochs=4, batch_size=16, lr=0.1, eval_every=4, eval_attack=None,
                     eval_examples=None, progress=False, seed=0, device="cpu")
    history = trainer.fit(data, eval_data=data)
    losses = [r["train_loss"] for r in history.records]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert history.records[-1]["clean_acc"] > 0.6  # 3 classes: chance is 1/3


@pytest.mark.parametrize("preset", [TRADESTrainer, MARTTrainer])
def test_under_bf16_autocast_the_perturbation_stays_fp32_and_the_loss_finite(preset):
    trainer = preset(tiny_model(), steps=2, progress=False, device="cpu", precision="bf16", channels_last=False)
    batch, _ = hand_batch(8)
    pert = trainer.policy.perturb(trainer.forward_model, batch)
    assert pert.x.dtype == torch.float32 and float((pert.x - batch.x).abs().max()) <= EPS + 1e-6
    loss, _ = trainer.train_step(batch)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


class StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("preset", [TRADESTrainer, MARTTrainer])
def test_resume_after_a_kill_equals_an_uninterrupted_run(preset, tmp_path):
    data = synthetic(32)

    def make(run_dir, seed=0, **kw):
        return preset(tiny_model(seed), steps=2, epochs=2, batch_size=16, lr=0.05, eval_every=0,
                      progress=False, seed=0, device="cpu", run_dir=run_dir, **kw)

    full = make(tmp_path / "full")
    full.fit(data)
    killed = make(tmp_path / "killed", callbacks=[StopAt(1)])
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["policy"] == {}  # stateless
    resumed = make(tmp_path / "killed", seed=7)
    resumed.fit(data, resume=True)
    for (k, want), got in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(want, got), k
    assert [r["train_loss"] for r in resumed.history.records] == [r["train_loss"] for r in full.history.records]


@pytest.mark.parametrize("policy, kwargs, error, match", [
    (TRADESPolicy, dict(beta=-1.0), ValueError, "beta"),
    (TRADESPolicy, dict(beta=float("nan")), ValueError, "beta"),
    (TRADESPolicy, dict(beta="6"), TypeError, "beta"),
    (TRADESPolicy, dict(beta=True), TypeError, "beta"),
    (TRADESPolicy, dict(steps=0), ValueError, "steps"),
    (TRADESPolicy, dict(steps=2.5), TypeError, "steps"),
    (TRADESPolicy, dict(eps=8), ValueError, "eps"),
    (TRADESPolicy, dict(step_size=-0.01), ValueError, "step_size"),
    (MARTPolicy, dict(lam=-5.0), ValueError, "lam"),
    (MARTPolicy, dict(lam=float("inf")), ValueError, "lam"),
    (MARTPolicy, dict(lam=None), TypeError, "lam"),
    (MARTPolicy, dict(steps=0), ValueError, "steps"),
    (MARTPolicy, dict(eps=-0.1), ValueError, "eps"),
    (MARTPolicy, dict(step_size="big"), TypeError, "step_size"),
])
def test_bad_settings_are_refused_naming_the_argument(policy, kwargs, error, match):
    with pytest.raises(error, match=match):
        policy(**kwargs)
    preset = TRADESTrainer if policy is TRADESPolicy else MARTTrainer
    with pytest.raises(error, match=match):
        preset(tiny_model(), **kwargs)

"""NuAT and GAT on the method contract: the nuclear norm against singular
values set by hand, each training loss against its paper's formula written
out by hand (value and weight gradients), each attack step against the
reference's recipe recomputed by hand (Bernoulli start, plain loss on even
steps, guided loss on odd ones, BatchNorm modes), the λ schedules, the
alternation's reset per epoch, exact resume from a mid-epoch checkpoint, the
presets' defaults and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.data.batch import Batch
from advtrain.methods import METHODS, Passes
from advtrain.methods.gat import FASTAT_CONFIG as GAT_FASTAT, GATPolicy, GATTrainer, softmax_distance
from advtrain.methods.nuat import FASTAT_CONFIG as NUAT_FASTAT, NuATPolicy, NuATTrainer, nuclear_gap
from advtrain.models import SmallCNN
from advtrain.policies import LossContext, Perturbation, PolicyContext
from advtrain.training import load_checkpoint

EPS = 8 / 255


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, width=4)


def hand_batch(n: int = 6, seed: int = 0):
    """8×8 images, labels and a fixed perturbed copy within ε."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    delta = EPS * (2 * torch.rand(n, 3, 8, 8, generator=g) - 1)
    return Batch(x, torch.arange(n) % 3, torch.arange(n)), (x + delta).clamp(0, 1)


def context(epochs: int) -> PolicyContext:
    return PolicyContext(num_examples=6, image_shape=(3, 8, 8), padding=0, epochs=epochs, steps_per_epoch=1,
                         device=torch.device("cpu"))


def at_epoch(policy, epochs: int, epoch: int, step: int = 0):
    policy.setup(nn.Identity(), context(epochs))
    policy.start_epoch(epoch)
    policy.step = step
    return policy


def synthetic(n: int):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def assert_same_buffers(model: nn.Module, hand: nn.Module) -> None:
    for (name, a), b in zip(model.named_buffers(), hand.buffers()):
        assert torch.equal(a, b), name


def test_nuclear_gap_is_the_sum_of_singular_values_over_the_batch_size():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    sigma = torch.tensor([3.0, 0.5, 0.25], dtype=torch.float64)
    adv = torch.randn(6, 3, dtype=torch.float64)
    clean = adv + u @ torch.diag(sigma) @ v.T
    assert nuclear_gap(clean, adv).item() == pytest.approx(3.75 / 6, rel=1e-12)
    assert torch.allclose(nuclear_gap(clean, adv), torch.linalg.matrix_norm(clean - adv, "nuc") / 6)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        nuclear_gap(clean, adv[:, :2])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.4])
def test_nuat_loss_is_clean_cross_entropy_plus_lambda_times_the_nuclear_norm_by_hand(label_smoothing):
    batch, x_adv = hand_batch()
    policy = at_epoch(NuATPolicy(), epochs=10, epoch=5)  # λ = 4 · 5 / 10
    assert policy.current_lam == 2.0
    model, hand = tiny_model(), tiny_model()
    out = policy.loss(LossContext(forward=lambda x, sites=None: model(x), label_smoothing=label_smoothing),
                      batch, Perturbation(x=x_adv))
    out.loss.backward()
    adv_logits, clean_logits = hand(x_adv), hand(batch.x)
    want = (F.cross_entropy(clean_logits, batch.y, label_smoothing=label_smoothing)
            + 2.0 * torch.linalg.matrix_norm(clean_logits - adv_logits, "nuc") / 6)
    want.backward()
    assert torch.allclose(out.loss, want, rtol=1e-6, atol=0)
    assert torch.equal(out.logits, adv_logits)  # the training accuracy counts the adversarial logits
    for p, q in zip(model.parameters(), hand.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert_same_buffers(model, hand)  # adversarial forward first, then clean, as the reference


def test_gat_loss_is_clean_cross_entropy_plus_lambda_times_the_softmax_distance_by_hand():
    batch, x_adv = hand_batch()
    policy = at_epoch(GATPolicy(), epochs=100, epoch=86)  # boosted: 4 · 10
    assert policy.current_lam == 40.0
    model, hand = tiny_model(), tiny_model()
    out = policy.loss(LossContext(forward=lambda x, sites=None: model(x)), batch, Perturbation(x=x_adv))
    out.loss.backward()
    adv_logits, clean_logits = hand(x_adv), hand(batch.x)
    p, q = clean_logits.softmax(1), adv_logits.softmax(1)
    want = F.cross_entropy(clean_logits, batch.y) + 40.0 * sum(
        sum((p[i, k] - q[i, k]) ** 2 for k in range(3)) for i in range(6)) / 6
    want.backward()
    assert torch.allclose(out.loss, want, rtol=1e-6, atol=0)
    assert torch.allclose(softmax_distance(clean_logits, adv_logits), ((p - q) ** 2).sum(1).mean())
    for a, b in zip(model.parameters(), hand.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert_same_buffers(model, hand)


def hand_attack(model: nn.Module, batch: Batch, seed: int, attack_mode: str, guided, lam: float):
    """The reference's recipe written out: clean logits in train mode, the
    Bernoulli start ±ε/2, one signed step of ε from it, clipped to the ball."""
    x, y = batch.x, batch.y
    model.train()
    with torch.no_grad():
        clean = model(x)
    torch.manual_seed(seed)
    start = torch.clamp(x + EPS / 2 * torch.sign(torch.tensor([0.5]) - torch.rand_like(x)), 0, 1)
    start.requires_grad_(True)
    model.train(attack_mode == "train")
    logits = model(start)
    loss = F.cross_entropy(logits, y)
    if guided is not None:
        loss = loss + lam * guided(clean, logits)
    (grad,) = torch.autograd.grad(loss, start)
    model.train()
    delta = torch.clamp(start.detach() + EPS * grad.sign() - x, -EPS, EPS)
    return torch.clamp(x + delta, 0, 1)


def _nuc(clean, logits):
    return torch.linalg.matrix_norm(clean - logits, "nuc") / clean.shape[0]


def _l2(clean, logits):
    return ((clean.softmax(1) - logits.softmax(1)) ** 2).sum(1).mean()


@pytest.mark.parametrize("make, attack_mode, term, epoch, lam", [
    (NuATPolicy, "train", _nuc, 1, 2.0),  # epochs=2: λ = 4 · 1 / 2
    (GATPolicy, "eval", _l2, 0, 10.0),
])
def test_the_attack_is_the_reference_step_plain_on_even_and_guided_on_odd_steps(make, attack_mode, term, epoch,
                                                                                lam):
    batch, _ = hand_batch(12, seed=1)
    batch = Batch(batch.x * 0.2 + 0.4, batch.y, batch.index)  # pixels off the bounds: the step is not clipped away
    results = {}
    for step in (0, 1):
        model = tiny_model()
        model.train()
        policy = at_epoch(make(), epochs=2, epoch=epoch, step=step)
        assert policy.current_lam == lam
        torch.manual_seed(3)
        got = policy.perturb(model, batch).x
        hand = tiny_model()
        want = hand_attack(hand, batch, 3, attack_mode, term if step == 1 else None, lam)
        assert torch.equal(got, want), step
        assert model.training  # modes restored
        assert_same_buffers(model, hand)  # the same BatchNorm statistics moved
        assert float((got - batch.x).abs().max()) <= EPS + 1e-7 and got.min() >= 0 and got.max() <= 1
        results[step] = got
    assert not torch.equal(results[0], results[1])  # the guided term changes the step
    # the start, not the clean image: the step leaves some pixels inside the ball
    assert ((results[0] - batch.x).abs() < EPS - 1e-4).any()


@pytest.mark.parametrize("make", [NuATPolicy, GATPolicy])
def test_the_guided_step_and_its_loss_make_no_host_synchronisation(make):
    batch, _ = hand_batch()
    model = tiny_model()
    policy = at_epoch(make(), epochs=2, epoch=1, step=1)
    with NoHostSync():
        pert = policy.perturb(model, batch)
        out = policy.loss(LossContext(forward=lambda x, sites=None: model(x)), batch, pert)
        out.loss.backward()
        policy.after_step(model, batch, pert)
    assert policy.step == 2


def test_lambda_schedules_at_given_epochs():
    nuat = at_epoch(NuATPolicy(), epochs=30, epoch=0)
    assert [nuat.lam_at(e) for e in (0, 15, 29)] == [0.0, 2.0, 4.0 * 29 / 30]
    assert at_epoch(NuATPolicy(lam_max=6.0), epochs=100, epoch=0).lam_at(50) == 3.0
    gat = at_epoch(GATPolicy(), epochs=100, epoch=0)
    assert gat.boost_epoch == 86 and (gat.lam_at(85), gat.lam_at(86), gat.lam_at(99)) == (10.0, 40.0, 40.0)
    gat30 = at_epoch(GATPolicy(), epochs=30, epoch=0)
    assert gat30.boost_epoch == 26 and (gat30.lam_at(25), gat30.lam_at(26)) == (10.0, 40.0)
    assert at_epoch(GATPolicy(boost_at=1.0), epochs=30, epoch=0).lam_at(29) == 10.0  # never boosted


@pytest.mark.parametrize("preset", [NuATTrainer, GATTrainer])
def test_a_run_alternates_within_each_epoch_and_restarts_the_count_per_epoch(preset):
    trainer = preset(tiny_model(), epochs=2, batch_size=16, lr=0.05, eval_every=0, progress=False, seed=0,
                     device="cpu")
    calls = []
    original = trainer.policy.regularizer
    trainer.policy.regularizer = lambda c, a: calls.append((trainer.policy.epoch, trainer.policy.step)) or \
        original(c, a)
    trainer.fit(synthetic(32))
    # per step: the attack's call on odd steps, then the loss's
    assert calls == [(0, 0), (0, 1), (0, 1), (1, 0), (1, 1), (1, 1)]


@pytest.mark.parametrize("preset, kw, lams", [
    (NuATTrainer, {}, [0.0, 2.0]),
    (GATTrainer, {"boost_at": 0.5}, [10.0, 40.0]),
])
def test_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(preset, kw, lams, tmp_path):
    data = synthetic(64)  # 4 steps per epoch

    def make(run_dir, seed=0):
        return preset(tiny_model(seed), **kw, epochs=2, batch_size=16, lr=0.05, eval_every=0, progress=False,
                      seed=0, device="cpu", run_dir=run_dir, checkpoint_every_steps=3)

    full = make(tmp_path / "full")
    full.fit(data)
    killed = make(tmp_path / "killed")
    original = killed.train_step

    def train_step(batch):
        if killed.global_step == 7:
            raise KeyboardInterrupt("simulated kill")
        return original(batch)

    killed.train_step = train_step
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data)
    state = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["global_step"] == 6 and state["policy"] == {"epoch": 1, "step": 2}
    resumed = make(tmp_path / "killed", seed=7)
    resumed.fit(data, resume=True)
    for (k, want), got in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(want, got), k
    assert resumed.policy.state_dict() == full.policy.state_dict() == {"epoch": 1, "step": 4}
    assert [r["train_loss"] for r in resumed.history.records] == [r["train_loss"] for r in full.history.records]
    assert [r["lam"] for r in full.history.records] == lams


def test_under_bf16_autocast_the_nuclear_norm_is_float32_and_the_step_finite():
    trainer = NuATTrainer(SmallCNN(num_classes=3, width=4), epochs=2, progress=False, device="cpu",
                          precision="bf16", channels_last=False)
    trainer.policy.setup(trainer.model, context(2))
    trainer.policy.start_epoch(1)
    trainer.policy.step = 1
    batch, _ = hand_batch(8)
    pert = trainer.policy.perturb(trainer.forward_model, batch)
    assert pert.x.dtype == torch.float32 and float((pert.x - batch.x).abs().max()) <= EPS + 1e-6
    loss, _ = trainer.train_step(batch)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


def test_presets_registry_and_protocol_settings():
    nuat, gat = NuATTrainer(tiny_model(), progress=False, device="cpu"), GATTrainer(tiny_model(), progress=False,
                                                                                  device="cpu")
    assert (nuat.policy.eps, nuat.policy.step_size, nuat.policy.init_radius, nuat.policy.lam_max) == \
        (EPS, EPS, EPS / 2, 4.0)
    assert (gat.policy.lam, gat.policy.boost, gat.policy.boost_at, gat.policy.step_size) == (10.0, 4.0, 0.86, EPS)
    for t in (nuat, gat):
        assert (t.epochs, t.lr, t.weight_decay, t.momentum, t.pad_fill) == (30, 0.2, 5e-4, 0.9, 0.0)
    custom = GATTrainer(tiny_model(), eps=4 / 255, lam=2.0, boost=1.0, boost_at=0.5, step_size=0.01,
                        init_radius=0.0, progress=False, device="cpu")
    assert (custom.policy.eps, custom.policy.lam, custom.policy.boost, custom.policy.boost_at,
            custom.policy.step_size, custom.policy.init_radius) == (4 / 255, 2.0, 1.0, 0.5, 0.01, 0.0)
    assert NuATTrainer(tiny_model(), lam_max=1.5, progress=False, device="cpu").policy.lam_max == 1.5
    for name, opts in (("nuat", ("eps", "lam_max")), ("gat", ("eps", "lam"))):
        assert METHODS[name].passes() == Passes(forward=4, input_backward=1, full_backward=2)
        assert METHODS[name].options == opts and METHODS[name].compiles
    assert NUAT_FASTAT == GAT_FASTAT == {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


@pytest.mark.parametrize("make, kwargs, error, match", [
    (NuATPolicy, dict(lam_max=-1.0), ValueError, "lam_max"),
    (NuATPolicy, dict(lam_max=float("nan")), ValueError, "lam_max"),
    (NuATPolicy, dict(lam_max="4"), TypeError, "lam_max"),
    (NuATPolicy, dict(eps=8), ValueError, "eps"),
    (NuATPolicy, dict(step_size=-0.01), ValueError, "step_size"),
    (NuATPolicy, dict(init_radius=4), ValueError, "init_radius"),
    (GATPolicy, dict(lam=-10.0), ValueError, "lam"),
    (GATPolicy, dict(lam=True), TypeError, "lam"),
    (GATPolicy, dict(boost=float("inf")), ValueError, "boost"),
    (GATPolicy, dict(boost_at=1.5), ValueError, "boost_at"),
    (GATPolicy, dict(boost_at=-0.1), ValueError, "boost_at"),
    (GATPolicy, dict(step_size="big"), TypeError, "step_size"),
])
def test_bad_settings_are_refused_naming_the_argument(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


@pytest.mark.parametrize("make", [NuATPolicy, GATPolicy])
def test_a_schedule_needs_the_run_length_and_a_state_must_fit(make):
    policy = make()
    with pytest.raises(RuntimeError, match="setup"):
        policy.current_lam
    at_epoch(policy, epochs=3, epoch=2)
    with pytest.raises(ValueError, match="missing keys"):
        policy.load_state_dict({"epoch": 1})
    policy.load_state_dict({"epoch": 1, "step": 5})
    assert (policy.epoch, policy.step, policy.current_lam) == (1, 5, policy.lam_at(1))
    with pytest.raises(ValueError, match="shape"):
        softmax_distance(torch.zeros(2, 3), torch.zeros(3, 3))

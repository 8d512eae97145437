"""N-AAER, RS-AAER and LIET on the method contract.

AAER: the abnormal-example mask and the regularizer against a per-example
hand computation (values and weight gradients), the empty-set and clipping
cases, the presets' attacks, no host synchronisation. LIET: the random label
smoothing, the label-information perturbations, the start, step and loss of
one batch by hand, when the perturbations are recomputed and the weight's
ramp, and a run resumed from a mid-epoch checkpoint equal to an
uninterrupted one. Both: the cost model against counted passes, bad input.
Everything runs on the CPU with tiny models.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.data import Batch
from advtrain.methods import METHODS
from advtrain.methods.aaer import AAERPolicy, NAAERTrainer, RSAAERTrainer, aaer_regularizer, abnormal_mask
from advtrain.methods.liet import (LIETPolicy, LIETTrainer, jensen_shannon, random_smoothing_cross_entropy)
from advtrain.policies import LossContext, PolicyContext

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.passes import PassCounter  # noqa: E402

EPS = 8 / 255
SHAPE = (3, 8, 8)


class Wavy(nn.Module):
    """linear → BatchNorm → sin(30·) → linear: its loss is far from
    monotone along a signed-gradient step, so a batch holds abnormal and
    normal examples alike."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(torch.sin(30 * self.bn(self.fc1(x.flatten(1)))))


def make_model(seed: int = 0) -> Wavy:
    torch.manual_seed(seed)
    return Wavy()


def make_batch(n: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), torch.arange(n), None)


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def quiet(**kw):
    return dict(device="cpu", progress=False, eval_every=0, eval_attack=None, seed=0, **kw)


def weight_grads(model: nn.Module, loss: torch.Tensor):
    return torch.autograd.grad(loss, list(model.parameters()))


# ------------------------------------------------------------------- AAER
@pytest.mark.parametrize("trainer", [NAAERTrainer, RSAAERTrainer])
def test_aaer_loss_is_the_papers_formula_by_hand(trainer):
    model = make_model(1)  # a batch whose abnormal examples' variation gap is positive
    policy = trainer(make_model(), device="cpu").policy
    batch = make_batch()
    x, y = batch.x, batch.y

    torch.manual_seed(7)
    pert = policy.perturb(model, batch)
    reference = copy.deepcopy(model)  # the same weights and running statistics, for the hand computation
    out = policy.loss(LossContext(forward=model), batch, pert)

    # By hand, one example at a time, from the same draws.
    torch.manual_seed(7)
    start = (torch.rand_like(x) * 2 - 1) * policy.init_radius
    start = torch.clamp(start, min=-x, max=1 - x).requires_grad_(True)
    hand = copy.deepcopy(reference)
    hand.train()
    z_before = hand(x + start)
    l_before = F.cross_entropy(z_before, y, reduction="none")
    (g,) = torch.autograd.grad(l_before.mean(), start)
    delta = start.detach() + policy.step_size * g.sign()
    if policy.project:
        delta = delta.clamp(-EPS, EPS)
    x_adv = (x + torch.clamp(delta, min=-x, max=1 - x)).clamp(0, 1)
    assert torch.allclose(pert.x, x_adv, atol=1e-6)
    assert torch.equal(pert.x, pert.x.clamp(0, 1))
    bound = EPS if policy.project else 3 * EPS
    assert (pert.x - x).abs().max() <= bound + 1e-6

    z_after = hand(x_adv)
    l_after = F.cross_entropy(z_after, y, reduction="none")
    abnormal = [i for i in range(len(y)) if l_before[i] > l_after[i]]
    normal = [i for i in range(len(y)) if i not in abnormal]
    assert abnormal and normal, "the batch should hold both kinds of example"
    assert abnormal_mask(pert.extras["loss"], l_after).tolist() == [i in abnormal for i in range(len(y))]
    # the loss drop is a constant: both reference codes take it from detached losses
    ce_a = sum(l_before[i] - l_after[i] for i in abnormal).detach() / len(abnormal)
    v_a = sum(((z_before[i].detach() - z_after[i]) ** 2).sum() for i in abnormal) / len(abnormal)
    v_n = sum(((z_before[i] - z_after[i]) ** 2).sum() for i in normal).detach() / len(normal)
    gap = torch.clamp(v_a - v_n, -100, 100)
    assert 0 < gap < 100, "the variation term should carry a gradient"
    reg = policy.lam1 * len(abnormal) / len(y) * (policy.lam2 * ce_a + policy.lam3 * max(gap, 0))
    expected = l_after.mean() + reg
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.logits, z_after, atol=1e-5)
    for mine, theirs in zip(weight_grads(model, out.loss), weight_grads(hand, expected)):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_aaer_regularizer_cases():
    z0 = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    z1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    weights = dict(lam1=2.0, lam2=3.0, lam3=0.5)
    # examples 0 and 2 abnormal (loss dropped), example 1 normal
    before, after = torch.tensor([2.0, 0.5, 1.5]), torch.tensor([1.0, 0.7, 1.0])
    reg = aaer_regularizer(z0, before, z1, after, **weights)
    v_a, v_n = (2.0 + 4.0) / 2, 4.0
    assert torch.isclose(reg, torch.tensor(2.0 * 2 / 3 * (3.0 * (1.0 + 0.5) / 2 + 0.5 * 0.0)))  # gap < 0: dropped
    assert v_a - v_n < 0
    # a gap above 100 is clipped and carries no gradient
    far = z1.detach().clone()
    far[0] += 20.0
    far.requires_grad_(True)
    reg = aaer_regularizer(z0, before, far, after, **weights)
    assert torch.isclose(reg, torch.tensor(2.0 * 2 / 3 * (3.0 * 0.75 + 0.5 * 100.0)))
    (g,) = torch.autograd.grad(reg, far)
    assert torch.equal(g, torch.zeros_like(g))
    # the loss drop enters the value only: no gradient reaches loss_after
    after_leaf = after.clone().requires_grad_(True)
    reg = aaer_regularizer(z0, before, z1, after_leaf, **weights)
    assert torch.autograd.grad(reg, [after_leaf], allow_unused=True) == (None,)
    # no abnormal or no normal example: nothing, and no NaN
    for loss_after in (before + 1, before - 1):
        reg = aaer_regularizer(z0, before, z1, loss_after, **weights)
        (g,) = torch.autograd.grad(reg, z1)
        assert reg.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_aaer_step_has_no_host_sync():
    model, batch = make_model(), make_batch()
    policy = NAAERTrainer(make_model(), device="cpu").policy
    with NoHostSync():
        out = policy.loss(LossContext(forward=model), batch, policy.perturb(model, batch))
    assert out.loss.dim() == 0


def test_aaer_presets_hold_the_benchmark_configs():
    n = NAAERTrainer(make_model(), device="cpu")
    assert (n.policy.step_size, n.policy.init_radius, n.policy.project) == (EPS, 2 * EPS, False)
    assert (n.policy.lam1, n.policy.lam2, n.policy.lam3) == (1.0, 1.5, 0.15)
    rs = RSAAERTrainer(make_model(), device="cpu", eps=4 / 255, lam3=0.5)
    assert (rs.policy.step_size, rs.policy.init_radius, rs.policy.project) == (1.25 * 4 / 255, 4 / 255, True)
    assert (rs.policy.lam1, rs.policy.lam2, rs.policy.lam3) == (1.0, 2.5, 0.5)
    assert (rs.epochs, rs.lr, rs.weight_decay, rs.label_smoothing) == (30, 0.2, 5e-4, 0.0)


def test_aaer_bad_input():
    kw = dict(step_size=EPS, init_radius=EPS, project=True, lam1=1.0, lam2=1.0, lam3=1.0)
    with pytest.raises(ValueError, match="eps"):
        AAERPolicy(8, **kw)
    for name, value, error in (("lam1", -1.0, ValueError), ("lam2", "2", TypeError), ("lam3", float("nan"), ValueError),
                               ("step_size", -0.1, ValueError), ("init_radius", None, TypeError),
                               ("project", 1, TypeError)):
        with pytest.raises(error, match=name):
            AAERPolicy(EPS, **{**kw, name: value})
    with pytest.raises(ValueError, match="eps"):
        NAAERTrainer(make_model(), eps=8.0, device="cpu")
    with pytest.raises(ValueError, match="loss_before"):
        abnormal_mask(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="logits"):
        aaer_regularizer(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 5), torch.zeros(3), lam1=1, lam2=1, lam3=1)


# ------------------------------------------------------------------- LIET
def test_random_smoothing_targets_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 1, 2])
    torch.manual_seed(3)
    got = random_smoothing_cross_entropy(logits, y, 0.6)
    torch.manual_seed(3)
    u = torch.rand(5, 4)
    target = torch.zeros(5, 4)
    for i in range(5):
        others = [k for k in range(4) if k != y[i]]
        total = sum(u[i, k] for k in others)
        for k in others:
            target[i, k] = 0.6 * u[i, k] / total
        target[i, y[i]] = 0.4
    assert torch.allclose(target.sum(1), torch.ones(5))
    assert torch.allclose(got, -(target * logits.log_softmax(1)).sum(1), atol=1e-6)
    assert torch.allclose(random_smoothing_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y, reduction="none"))
    p, q = logits.softmax(1), logits.flip(0).softmax(1)
    m = (p + q) / 2
    js = ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2
    assert torch.allclose(jensen_shannon(logits, logits.flip(0)), js, atol=1e-6)


def setup_liet(policy: LIETPolicy, model: nn.Module, epochs: int = 4) -> None:
    policy.setup(model, PolicyContext(num_examples=12, image_shape=SHAPE, padding=0, epochs=epochs,
                                      steps_per_epoch=3, device=torch.device("cpu")))


def test_liet_label_information_is_the_signed_gradient_at_grey():
    model, policy = make_model(), LIETPolicy(EPS)
    setup_liet(policy, model)
    assert policy.num_classes == 10  # read from the model's output
    stats = model.bn.running_mean.clone()
    torch.manual_seed(5)
    li = policy.label_information(model, make_batch().x)
    assert torch.equal(model.bn.running_mean, stats) and model.training  # eval mode, then restored
    assert all(p.grad is None for p in model.parameters())
    grey = torch.full((10, *SHAPE), 0.5, requires_grad=True)
    model.eval()
    torch.manual_seed(5)
    (g,) = torch.autograd.grad(random_smoothing_cross_entropy(model(grey), torch.arange(10), 0.6).mean(), grey)
    assert torch.equal(li, EPS * g.sign())
    assert li.shape == (10, *SHAPE) and not torch.equal(li[0], li[1])  # one perturbation per class


def test_liet_start_step_and_loss_by_hand():
    model, batch = make_model(), make_batch()
    x, y = batch.x, batch.y
    policy = LIETPolicy(EPS, lam=10.0)
    setup_liet(policy, model, epochs=4)
    policy.start_epoch(1)
    torch.manual_seed(11)
    pert = policy.perturb(model, batch)
    li = policy.state_dict()["li"]
    hand = copy.deepcopy(model)
    torch.manual_seed(12)
    out = policy.loss(LossContext(forward=model), batch, pert)

    # The start: the draws after the label-information pass, in order.
    torch.manual_seed(11)
    policy.label_information(copy.deepcopy(hand), x)
    replace, noise = torch.rand_like(x), torch.empty_like(x).uniform_(-EPS, EPS)
    ratio = torch.rand(()) * 0.4 + 0.1
    sign = -1.0 if torch.rand(()) < 0.5 else 1.0
    delta = li[y].clone()
    delta[replace < ratio] = noise[replace < ratio]
    x0 = (x + sign * delta).clamp(0, 1)
    assert torch.equal(pert.x, x0)
    assert 0 < (delta != li[y]).float().mean() < 0.6  # some pixels, not all, are noise

    torch.manual_seed(12)
    start = x0.clone().requires_grad_(True)
    hand.train()
    z0 = hand(start)
    (g,) = torch.autograd.grad(random_smoothing_cross_entropy(z0, y, 0.6).mean(), start, retain_graph=True)
    x_adv = (x + (x0 + EPS * g.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
    z1 = hand(x_adv)
    expected = random_smoothing_cross_entropy(z1, y, 0.6).mean() + 10.0 * 2 / 4 * jensen_shannon(z0, z1)
    assert policy.weight == 10.0 * 2 / 4
    assert torch.allclose(out.logits, z1, atol=1e-6) and torch.allclose(out.loss, expected, atol=1e-6)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    for mine, theirs in zip(weight_grads(model, out.loss), weight_grads(hand, expected)):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_liet_recomputes_the_perturbations_every_li_every_steps_of_an_epoch():
    model, batch = make_model(), make_batch()
    policy = LIETPolicy(EPS, li_every=2, num_classes=10)
    setup_liet(policy, model)
    calls = []
    original = policy.label_information
    policy.label_information = lambda *a: calls.append(policy._step) or original(*a)  # type: ignore[method-assign]
    for epoch in range(2):
        policy.start_epoch(epoch)
        for _ in range(5):
            policy.perturb(model, batch)
        assert policy.metrics() == {"js_weight": 100.0 * (epoch + 1) / 4}
    assert calls == [0, 2, 4, 0, 2, 4]
    with NoHostSync():
        policy.loss(LossContext(forward=model), batch, policy.perturb(model, batch))


def test_liet_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data = make_data(36)
    kw = quiet(epochs=2, batch_size=12, lr=0.05, li_every=2, checkpoint_every_steps=2)
    full = LIETTrainer(make_model(1), run_dir=tmp_path / "full", **kw)
    full.fit(data)
    first = LIETTrainer(make_model(1), run_dir=tmp_path / "split", **kw)
    original = first.train_step

    def train_step(b):
        if first.global_step == 4:  # after the mid-epoch checkpoint of step 4 (epoch 2, step 1 of 3)
            raise KeyboardInterrupt("simulated kill")
        return original(b)

    first.train_step = train_step  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        first.fit(data)
    resumed = LIETTrainer(make_model(5), run_dir=tmp_path / "split", **kw)
    resumed.fit(data, resume=True)
    assert resumed.global_step == full.global_step == 6
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    mine, theirs = full.policy.state_dict(), resumed.policy.state_dict()
    assert mine["epoch"] == theirs["epoch"] == 1 and mine["step"] == theirs["step"] == 3
    assert torch.equal(mine["li"], theirs["li"]) and mine["li"].numel() > 0


def test_liet_bad_input():
    with pytest.raises(ValueError, match="eps"):
        LIETPolicy(8)
    for kw, error, name in (({"lam": -1.0}, ValueError, "lam"), ({"smoothing": 1.0}, ValueError, "smoothing"),
                            ({"li_every": 0}, ValueError, "li_every"), ({"li_every": 2.0}, TypeError, "li_every"),
                            ({"min_mask_ratio": 0.6}, ValueError, "mask_ratio"),
                            ({"max_mask_ratio": 1.5}, ValueError, "mask_ratio"),
                            ({"num_classes": 1}, ValueError, "num_classes")):
        with pytest.raises(error, match=name):
            LIETPolicy(EPS, **kw)
    with pytest.raises(ValueError, match="label_smoothing"):
        LIETTrainer(make_model(), label_smoothing=0.1, device="cpu")
    model, batch, policy = make_model(), make_batch(), LIETPolicy(EPS)
    with pytest.raises(RuntimeError, match="setup"):
        policy.perturb(model, batch)
    setup_liet(policy, model)
    pert = policy.perturb(model, batch)
    with pytest.raises(ValueError, match="label_smoothing"):
        policy.loss(LossContext(forward=model, label_smoothing=0.2), batch, pert)
    with pytest.raises(ValueError, match="LIETPolicy"):
        policy.load_state_dict({"epoch": 0, "step": 0})


# ------------------------------------------------------------------ both
@pytest.mark.parametrize("name", ["n-aaer", "rs-aaer", "liet"])
def test_the_cost_model_is_what_an_epoch_runs(name):
    trainer = METHODS[name].build(make_model(), batch_size=8, **quiet())
    loader = trainer.setup(make_data(40))  # 5 steps of 8
    with PassCounter(trainer.model) as counter:
        trainer.train_epoch()
    expected = METHODS[name].passes(li_every=20, batch_size=8, examples=40)
    assert counter.passes(examples=loader.num_examples) == expected
    if name == "liet":  # one grey-image pass of 10 classes per epoch, spread over 40 examples
        assert expected.forward == 2 + 10 / 40 and expected.full_backward == 2

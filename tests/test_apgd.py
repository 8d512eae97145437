"""Tests of APGD (Auto-PGD, Croce & Hein 2020): the checkpoint schedule, the
known optimum on linear models, targeted runs, the attack contract (ball, box,
no parameter gradients, modes restored, no host synchronisation) and strength
against PGD-20 on a small trained model."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync, trained_model

from advtrain.attacks.apgd import APGD, apgd_checkpoints
from advtrain.attacks.pgd import PGD
from advtrain.utils import model_mode

EPS = 8 / 255


def binary_linear(seed: int = 0, shape=(3, 4, 4), bias: float = 0.0):
    """``z = W x + b`` with two classes; ``w_1 - w_0`` has no entry near zero."""
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    w = torch.randn(2, d, generator=g)
    v = w[1] - w[0]
    w[1] = w[0] + torch.sign(v) * (v.abs() + 0.1)
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.tensor([bias, -bias]))
    return nn.Sequential(nn.Flatten(), lin), w


def test_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert apgd_checkpoints(1) == [1]
    for steps in (1, 5, 20, 37, 100, 250):
        points = apgd_checkpoints(steps)
        assert points == sorted(set(points)) and 1 <= points[0] and points[-1] <= steps


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("seed", [0, 1])
def test_linf_optimum_on_binary_linear_model(seed, loss):
    # A large bias keeps every example correct, so the returned point is the
    # highest-loss one: the corner eps * sign(w_wrong - w_true).
    shape = (3, 4, 4)
    x = 0.45 + 0.1 * torch.rand(6, *shape, generator=torch.Generator().manual_seed(seed))
    y = torch.zeros(6, dtype=torch.long)
    _, w = binary_linear(seed, shape)
    # clean margin z_0 - z_1 about 5 (the attack removes about 2): large enough to
    # stay correct, small enough for float32 cross-entropy to resolve changes
    model, w = binary_linear(seed, shape, bias=2.5 + 0.25 * float((w[1] - w[0]).sum()))
    assert ((model(x)[:, 0] - model(x)[:, 1]) > 3.5).all()
    if loss == "dlr":  # DLR needs 3 classes: add a constant, never-winning third class
        lin = model[1]
        wide = nn.Linear(lin.in_features, 3)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:2] = lin.weight
            wide.bias.copy_(torch.tensor([lin.bias[0], lin.bias[1], -1e3]))
        model = nn.Sequential(nn.Flatten(), wide)
    torch.manual_seed(seed)
    x_adv = APGD(EPS, steps=10, loss=loss)(model, x, y)
    expected = EPS * torch.sign(w[1] - w[0]).view(1, *shape)
    assert torch.allclose(x_adv - x, expected.expand_as(x), atol=1e-6)


def test_l2_reaches_the_optimal_direction_on_binary_linear_model():
    shape = (3, 4, 4)
    model, w = binary_linear(0, shape, bias=10.0)
    x = torch.full((4, *shape), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    eps = 0.5
    delta = (APGD(eps, steps=50, norm="l2")(model, x, y) - x).flatten(1)
    direction = (w[1] - w[0]) / (w[1] - w[0]).norm()
    assert torch.allclose(delta.norm(dim=1), torch.full((4,), eps), atol=1e-4)
    assert (F.cosine_similarity(delta, direction.expand_as(delta), dim=1) > 0.999).all()


def test_misclassified_point_is_returned_when_found():
    _, w = binary_linear(0)
    model, _ = binary_linear(0, bias=0.2 + 0.25 * float((w[1] - w[0]).sum()))  # clean margin 0.4
    x = torch.full((6, 3, 4, 4), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    assert (model(x).argmax(1) == y).all()
    x_adv = APGD(EPS, steps=10)(model, x, y)
    assert (model(x_adv).argmax(1) != y).all()


def test_targeted_reaches_the_target_on_easy_linear_model():
    # 10 classes: class 0 (true) and class 3 share one direction with opposite
    # signs; the other classes are constant and far below. The most likely
    # wrong class is 3, and the targeted run must reach it (eps moves z_3 - z_0
    # by 2 * eps * 48 = 3.0, from -0.5 to 2.5).
    d = 3 * 4 * 4
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)).sign()
    lin = nn.Linear(d, 10)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0], lin.weight[3] = v, -v
        lin.bias.fill_(-5.0)
        lin.bias[0], lin.bias[3] = 0.5 - 0.5 * v.sum(), 0.5 * v.sum()  # z_0 = 0.5 and z_3 = 0 at x = 0.5
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.full((5, 3, 4, 4), 0.5)
    y = torch.zeros(5, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    for loss in ("dlr", "ce"):
        x_adv = APGD(EPS, steps=20, loss=loss, targeted=True, n_target_classes=1)(model, x, y)
        assert (model(x_adv).argmax(1) == 3).all(), loss
        assert (x_adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("radius, kwargs", [
    pytest.param(EPS, dict(restarts=2), id="ce_restarts"),
    pytest.param(EPS, dict(loss="dlr", targeted=True, n_target_classes=3), id="targeted_dlr"),
    pytest.param(0.5, dict(norm="l2", loss="dlr", bn_mode="train"), id="l2_dlr_train"),
])
def test_contract_ball_box_grads_modes_and_no_host_sync(radius, kwargs):
    model, (x, y) = trained_model(0)
    x = x[:16].clone()
    x[:4] = torch.where(x[:4] > 0.5, 1.0, 0.0)  # pixels on the box boundary
    y = y[:16]
    eps = torch.linspace(0.5, 1.0, 16) * radius  # per-example radius
    attack = APGD(eps, steps=12, **kwargs)
    model.train()
    model[1].eval()  # a mixed state that must come back as it was
    flags = [m.training for m in model.modules()]
    with NoHostSync():
        x_adv = attack.run(model, x, y, check=False)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if attack.norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()


def test_stronger_than_pgd20_on_a_trained_model():
    model, (x, y) = trained_model(0)
    x, y = x[:48], y[:48]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert clean.float().mean() > 0.8
    torch.manual_seed(0)
    pgd_correct = model(PGD(EPS, steps=20, step_size=EPS / 4)(model, x, y)).argmax(1) == y
    apgd_ce = model(APGD(EPS, steps=30)(model, x, y)).argmax(1) == y
    apgd_t = model(APGD(EPS, steps=30, loss="dlr", targeted=True, n_target_classes=2)(model, x, y)).argmax(1) == y
    robust_pgd = clean & pgd_correct
    robust_apgd = clean & apgd_ce & apgd_t
    assert 0.05 < robust_pgd.float().mean() < 0.95  # a regime where the attacks can differ
    assert robust_apgd.sum() <= robust_pgd.sum()
    # per example: no example that PGD-20 breaks survives both APGD-CE and APGD-T
    assert int((robust_apgd & ~robust_pgd).sum()) == 0


def test_restarts_only_attack_unbroken_examples(monkeypatch):
    model, (x, y) = trained_model(0)
    sizes = []
    original = APGD._run

    def spy(self, model, x, y, eps, target):
        sizes.append(x.shape[0])
        return original(self, model, x, y, eps, target)

    monkeypatch.setattr(APGD, "_run", spy)
    APGD(0.1, steps=5, restarts=3)(model, x[:16], y[:16])
    assert sizes[0] == 16 and all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert len(sizes) <= 3


def test_empty_batch_and_validation():
    model, _ = binary_linear(0)
    x = torch.zeros(0, 3, 4, 4)
    assert APGD(EPS)(model, x, torch.zeros(0, dtype=torch.long)).shape == x.shape
    with pytest.raises(ValueError, match="loss"):
        APGD(EPS, loss="margin")
    with pytest.raises(ValueError, match="rho"):
        APGD(EPS, rho=0.0)
    with pytest.raises(ValueError, match="n_target_classes"):
        APGD(EPS, targeted=True, n_target_classes=0)
    with pytest.raises(ValueError, match="norm"):
        APGD(EPS, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        APGD(-1.0)
    with pytest.raises(ValueError, match="x must hold pixels"):
        APGD(EPS)(model, torch.full((2, 3, 4, 4), 2.0), torch.zeros(2, dtype=torch.long))


def test_eval_mode_uses_running_statistics_and_leaves_them_alone():
    model, (x, y) = trained_model(0)
    before = [b.clone() for b in model.buffers()]
    with model_mode(model, "train"):
        APGD(EPS, steps=5, bn_mode="eval")(model, x[:16], y[:16])
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))

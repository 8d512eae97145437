"""Tests of the stateless attacks (PGD L∞/L2, FGSM, FGSM-RS, N-FGSM) and losses.

Exactness is checked on linear models, where the optimum of the attack problem
is known in closed form; the contract (ball, box, gradients, modes, autocast,
per-example ε, restarts) on small random conv nets with BatchNorm.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.attacks import (APGD, FGSM, FGSMRS, NFGSM, PGD, Attack, cross_entropy, dlr_loss, get_loss,
                              margin_loss, targeted_dlr_loss)
from advtrain.evaluation import attack_suite, check_gradient_masking, evaluate
from advtrain.policies import APARTPolicy, ATTAPolicy
from advtrain.utils import model_mode

SEEDS = [0, 1, 2]
EPS = 0.05
TOL = 1e-6


# ----------------------------------------------------------------------------- helpers

def linear_model(seed: int = 0, shape=(3, 4, 4)):
    """Two-class linear classifier ``z = W x`` whose weight difference has no
    entry near zero, so ``sign(w_other - w_true)`` is well defined."""
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    w = torch.randn(2, d, generator=g)
    v = w[1] - w[0]
    w[1] = w[0] + torch.sign(v) * (v.abs() + 0.1)
    lin = nn.Linear(d, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return nn.Sequential(nn.Flatten(), lin), w


def linear_batch(value: float = 0.5, n: int = 6, shape=(3, 4, 4)):
    x = torch.full((n, *shape), value)
    y = torch.arange(n) % 2
    return x, y


def optimal_direction(w, y, shape):
    """Per-example ``w_other - w_true`` (the CE and margin input-gradient direction)."""
    v = w[1 - y] - w[y]
    return v.view(len(y), *shape)


def conv_model(seed: int) -> nn.Sequential:
    """Small random conv net with BatchNorm (non-trivial running statistics), in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 8, 8))
    return model.eval()


def conv_batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@torch.no_grad()
def per_example_loss(model, x, y, loss=cross_entropy):
    with model_mode(model, "eval"):
        return loss(model(x), y)


def uniform_noise(x, eps):
    return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)


def linf(x_adv, x):
    return (x_adv - x).flatten(1).abs().amax(dim=1)


def l2(x_adv, x):
    return (x_adv - x).flatten(1).norm(dim=1)


def assert_in_box(x_adv):
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# ---------------------------------------------------------------- exact optima on linear models

def test_fgsm_reaches_linf_optimum_on_linear_model():
    model, w = linear_model()
    x, y = linear_batch()
    x_adv = FGSM(0.1)(model, x, y)
    expected = 0.1 * torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def test_fgsm_margin_loss_reaches_same_optimum():
    model, w = linear_model(1)
    x, y = linear_batch()
    x_adv = FGSM(0.1, loss="margin")(model, x, y)
    expected = 0.1 * torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def test_fgsm_clips_to_pixel_box():
    model, w = linear_model()
    x, y = linear_batch(value=0.98)
    x_adv = FGSM(0.1)(model, x, y)
    expected = (x + 0.1 * torch.sign(optimal_direction(w, y, x.shape[1:]))).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=TOL, rtol=0)
    assert x_adv.max() == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_pgd_linf_reaches_optimum_from_random_start(seed):
    model, w = linear_model(seed)
    x, y = linear_batch()
    torch.manual_seed(seed)
    x_adv = PGD(0.1, steps=5)(model, x, y)
    expected = 0.1 * torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def test_pgd_default_step_size_is_madry_rule():
    model, w = linear_model()
    x, y = linear_batch()
    # Without projection two steps of the default 2.5 * eps / steps move exactly 2.5 * eps.
    x_adv = PGD(0.1, steps=2, random_start=False, project=False)(model, x, y)
    expected = 0.25 * torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def test_pgd_l2_reaches_optimum_from_zero():
    model, w = linear_model()
    x, y = linear_batch()
    v = optimal_direction(w, y, x.shape[1:])
    expected = 0.3 * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = PGD(0.3, norm="l2", random_start=False)(model, x, y)
    torch.testing.assert_close(x_adv - x, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(l2(x_adv, x), torch.full((len(y),), 0.3), atol=1e-5, rtol=0)


def test_pgd_l2_step_is_normalized_gradient():
    model, w = linear_model()
    x, y = linear_batch()
    v = optimal_direction(w, y, x.shape[1:])
    x_adv = PGD(1.0, norm="l2", steps=1, step_size=0.1, random_start=False)(model, x, y)
    expected = 0.1 * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def constant_model(features: int) -> nn.Module:
    """A classifier whose logits do not depend on the input: zero input gradient,
    so an attack returns its random start unchanged."""
    lin = nn.Linear(features, 3)
    with torch.no_grad():
        lin.weight.zero_()
    return nn.Sequential(nn.Flatten(), lin)


def test_linf_random_start_is_uniform_in_init_box():
    x = torch.full((2000, 1, 1, 2), 0.5)
    y = torch.zeros(2000, dtype=torch.long)
    torch.manual_seed(0)
    delta = (PGD(0.2, steps=1, init_radius=0.1)(constant_model(2), x, y) - x).flatten()
    assert delta.abs().max() <= 0.1 + TOL
    assert delta.max() > 0.099 and delta.min() < -0.099
    assert abs(float(delta.mean())) < 0.005
    assert abs(float((delta / 0.1).pow(2).mean()) - 1 / 3) < 0.02  # E[u^2] = 1/3 for u ~ U(-1, 1)


def test_l2_random_start_is_uniform_in_ball_and_zero_gradient_is_safe():
    x = torch.full((4000, 1, 1, 2), 0.5)
    y = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    delta = (PGD(0.3, norm="l2", steps=2)(constant_model(2), x, y) - x).flatten(1)
    assert torch.isfinite(delta).all()
    radius = delta.norm(dim=1) / 0.3
    assert radius.max() <= 1 + 1e-5
    assert abs(float(radius.pow(2).mean()) - 0.5) < 0.03  # squared radius ~ U(0, 1) in a disc
    angle = torch.atan2(delta[:, 1], delta[:, 0])
    assert abs(float(angle.cos().mean())) < 0.05 and abs(float(angle.sin().mean())) < 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_pgd_l2_converges_to_optimum_from_random_start(seed):
    model, w = linear_model(seed)
    x, y = linear_batch()
    v = optimal_direction(w, y, x.shape[1:]).flatten(1)
    torch.manual_seed(seed)
    x_adv = PGD(0.3, norm="l2", steps=30, step_size=0.15)(model, x, y)
    d = (x_adv - x).flatten(1)
    cosine = F.cosine_similarity(d, v, dim=1)
    assert cosine.min() > 0.9999
    torch.testing.assert_close(d.norm(dim=1), torch.full((len(y),), 0.3), atol=1e-5, rtol=0)


def test_fgsm_rs_is_uniform_start_then_step_of_1_25_eps():
    model, w = linear_model()
    x, y = linear_batch()
    eps = 0.1
    s = torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.manual_seed(3)
    x_adv = FGSMRS(eps)(model, x, y)
    torch.manual_seed(3)
    start = (torch.rand_like(x) * 2 - 1) * eps
    expected = (start + 1.25 * eps * s).clamp(-eps, eps)
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


def test_nfgsm_is_noise_of_2eps_then_step_of_eps_without_projection():
    model, w = linear_model()
    x, y = linear_batch(value=0.6)
    eps = 0.2  # large enough for the [0, 1] box to bind on some pixels
    s = torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.manual_seed(4)
    x_adv = NFGSM(eps)(model, x, y)
    torch.manual_seed(4)
    start = (x + (torch.rand_like(x) * 2 - 1) * 2 * eps).clamp(0, 1) - x
    expected = (x + start + eps * s).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=TOL, rtol=0)
    assert linf(x_adv, x).max() > eps + 1e-3  # no projection back to the eps-ball
    assert x_adv.max() == 1.0  # the box did bind


# ---------------------------------------------------------------- contract on conv nets

ATTACKS = {
    "pgd_linf": lambda eps: PGD(eps, steps=5),
    "pgd_linf_restarts": lambda eps: PGD(eps, steps=3, restarts=2),
    "fgsm": lambda eps: FGSM(eps),
    "fgsm_rs": lambda eps: FGSMRS(eps),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_linf_attacks_stay_in_ball_and_box(seed, name):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    torch.manual_seed(seed)
    x_adv = ATTACKS[name](EPS)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert linf(x_adv, x).max() <= EPS + TOL
    assert_in_box(x_adv)


@pytest.mark.parametrize("seed", SEEDS)
def test_pgd_l2_stays_in_ball_and_box(seed):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    torch.manual_seed(seed)
    x_adv = PGD(0.5, norm="l2", steps=5, restarts=2)(model, x, y)
    assert l2(x_adv, x).max() <= 0.5 + 1e-5
    assert_in_box(x_adv)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_beats_random_noise(seed, loss):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    loss_fn = get_loss(loss)
    torch.manual_seed(seed)
    x_adv = PGD(EPS, steps=5, loss=loss)(model, x, y)
    attacked = per_example_loss(model, x_adv, y, loss_fn)
    noise = per_example_loss(model, uniform_noise(x, EPS), y, loss_fn)
    clean = per_example_loss(model, x, y, loss_fn)
    assert (attacked > noise).float().mean() >= 0.9
    assert (attacked > clean).all()
    assert attacked.mean() > noise.mean() + 0.5 * (attacked.mean() - clean.mean()).abs()


@pytest.mark.parametrize("seed", SEEDS)
def test_pgd_l2_beats_random_noise(seed):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    torch.manual_seed(seed)
    x_adv = PGD(0.5, norm="l2", steps=5)(model, x, y)
    attacked = per_example_loss(model, x_adv, y)
    noise_delta = torch.randn_like(x)
    noise = x + 0.5 * noise_delta / noise_delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (attacked > per_example_loss(model, noise.clamp(0, 1), y)).float().mean() >= 0.9


@pytest.mark.parametrize("targeted", [False, True])
def test_restarts_keep_best_run_per_example(targeted):
    """After the same seed, restart k of a 3-restart attack equals the k-th of
    three consecutive single runs, so the result must be, per example, the best
    of those three (first one on ties) and never worse than the first."""
    improved = 0
    for seed in SEEDS:
        model = conv_model(seed)
        x, y = conv_batch(seed)
        attack = dict(steps=2, targeted=targeted)
        torch.manual_seed(seed)
        singles = torch.stack([PGD(EPS, **attack)(model, x, y) for _ in range(3)])
        torch.manual_seed(seed)
        x_adv = PGD(EPS, restarts=3, **attack)(model, x, y)

        losses = torch.stack([per_example_loss(model, s, y) for s in singles])
        objective = -losses if targeted else losses
        best = objective.argmax(dim=0)
        expected = singles[best, torch.arange(len(y))]
        torch.testing.assert_close(x_adv, expected, atol=0, rtol=0)

        final = per_example_loss(model, x_adv, y)
        if targeted:
            assert (final <= losses[0]).all()
            improved += int((final < losses[0]).sum())
        else:
            assert (final >= losses[0]).all()
            improved += int((final > losses[0]).sum())
    assert improved > 0  # the restarts did change some examples


@pytest.mark.parametrize("bn_mode", ["eval", "train", "keep"])
def test_parameter_grads_are_never_written(bn_mode):
    model = conv_model(0)
    x, y = conv_batch(0)
    PGD(EPS, steps=2, bn_mode=bn_mode)(model, x, y)
    assert all(p.grad is None for p in model.parameters())

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    PGD(EPS, steps=2, restarts=2, bn_mode=bn_mode)(model, x, y)
    NFGSM(EPS, bn_mode=bn_mode)(model, x, y)
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


def mixed_mode_model():
    model = conv_model(0)
    model.train()
    model[1].eval()  # first BatchNorm in eval mode, second in train mode
    return model


@pytest.mark.parametrize("bn_mode", ["eval", "train", "keep"])
def test_bn_mode_is_used_and_model_flags_restored(bn_mode):
    model = mixed_mode_model()
    flags = [m.training for m in model.modules()]
    seen = []
    for bn in (model[1], model[4]):
        bn.register_forward_hook(lambda mod, inp, out: seen.append(mod.training))
    x, y = conv_batch(0)
    # check=False: the input checks' one-example probe forward is not the attack's
    FGSMRS(EPS, bn_mode=bn_mode).run(model, x, y, check=False)

    assert [m.training for m in model.modules()] == flags
    assert len(seen) == 2
    expected = {"eval": [False, False], "train": [True, True], "keep": [False, True]}[bn_mode]
    assert seen == expected


def test_model_flags_restored_after_error_in_attack():
    model = mixed_mode_model()
    flags = [m.training for m in model.modules()]
    x, y = conv_batch(0)
    # the loss returns a scalar, not one value per example
    bad = PGD(EPS, loss=lambda z, t: F.cross_entropy(z, t))
    with pytest.raises(ValueError, match="one value per example"):
        bad(model, x, y)
    assert [m.training for m in model.modules()] == flags


def test_eval_mode_leaves_running_stats_and_train_mode_updates_them():
    model = conv_model(0)
    x, y = conv_batch(0)
    bn = model[1]
    before = bn.running_mean.clone()
    PGD(EPS, steps=2, bn_mode="eval")(model, x, y)
    assert torch.equal(bn.running_mean, before)
    PGD(EPS, steps=2, bn_mode="train")(model, x, y)
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_under_bf16_autocast(norm):
    model = conv_model(0)
    x, y = conv_batch(0)
    eps = EPS if norm == "linf" else 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the attack really sees bf16 logits
        torch.manual_seed(0)
        x_adv = PGD(eps, steps=5, norm=norm, restarts=2)(model, x, y)
    assert x_adv.dtype == torch.float32
    dist = linf(x_adv, x) if norm == "linf" else l2(x_adv, x)
    assert dist.max() <= eps + 1e-5
    assert_in_box(x_adv)
    # fp32 delta: steps of 2.5 * eps / 5 are not rounded to bf16's 8-bit mantissa
    assert (per_example_loss(model, x_adv, y) > per_example_loss(model, x, y)).float().mean() >= 0.9


def test_per_example_eps_tensor():
    model = conv_model(1)
    x, y = conv_batch(1)
    eps = torch.linspace(0.0, 0.1, len(y))
    torch.manual_seed(0)
    x_adv = PGD(eps, steps=5)(model, x, y)
    reached = linf(x_adv, x)
    assert (reached <= eps + TOL).all()
    # sign steps saturate some pixel of each example at its own radius
    torch.testing.assert_close(reached, eps, atol=TOL, rtol=0)
    assert torch.equal(x_adv[0], x[0])

    eps_l2 = (torch.arange(len(y), dtype=torch.float32) * 0.05).view(-1, 1, 1, 1)
    x_adv = PGD(eps_l2, norm="l2", steps=5)(model, x, y)
    assert (l2(x_adv, x) <= eps_l2.flatten() + 1e-5).all()
    assert (l2(x_adv, x)[1:] > 0.5 * eps_l2.flatten()[1:]).all()


def test_per_example_eps_on_linear_fgsm_is_exact():
    model, w = linear_model()
    x, y = linear_batch()
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    x_adv = FGSM(eps)(model, x, y)
    expected = eps.view(-1, 1, 1, 1) * torch.sign(optimal_direction(w, y, x.shape[1:]))
    torch.testing.assert_close(x_adv - x, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_attack_lowers_target_loss(seed, loss):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    g = torch.Generator().manual_seed(seed)
    target = (y + torch.randint(1, 10, y.shape, generator=g)) % 10
    loss_fn = get_loss(loss)
    torch.manual_seed(seed)
    x_adv = PGD(EPS, steps=5, loss=loss, targeted=True)(model, x, target)
    after = per_example_loss(model, x_adv, target, loss_fn)
    before = per_example_loss(model, x, target, loss_fn)
    assert (after < before).all()
    assert linf(x_adv, x).max() <= EPS + TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_nfgsm_within_3eps_and_box(seed):
    model = conv_model(seed)
    x, y = conv_batch(seed)
    torch.manual_seed(seed)
    x_adv = NFGSM(EPS)(model, x, y)
    assert linf(x_adv, x).max() <= 3 * EPS + TOL
    assert linf(x_adv, x).max() > EPS + 1e-3
    assert_in_box(x_adv)
    x_adv = NFGSM(EPS, noise=0.5 * EPS, step_size=0.5 * EPS)(model, x, y)
    assert linf(x_adv, x).max() <= EPS + TOL


def test_callable_loss_matches_named_loss():
    model = conv_model(2)
    x, y = conv_batch(2)
    torch.manual_seed(0)
    named = PGD(EPS, steps=3, loss="margin")(model, x, y)
    torch.manual_seed(0)
    custom = PGD(EPS, steps=3, loss=lambda z, t: margin_loss(z, t))(model, x, y)
    torch.testing.assert_close(named, custom, atol=0, rtol=0)


@pytest.mark.parametrize("attack", [
    pytest.param(PGD(EPS, steps=3, restarts=2, bn_mode="train"), id="pgd_linf_restarts_train"),
    pytest.param(PGD(0.5, norm="l2", steps=3, loss="margin"), id="pgd_l2_margin"),
    pytest.param(PGD(EPS, steps=2, targeted=True, loss="dlr"), id="pgd_targeted_dlr"),
    pytest.param(FGSM(EPS), id="fgsm"),
    pytest.param(FGSMRS(EPS), id="fgsm_rs"),
    pytest.param(NFGSM(EPS), id="nfgsm"),
])
def test_unchecked_run_has_no_host_sync(attack):
    model = conv_model(0)
    x, y = conv_batch(0)
    with NoHostSync():
        x_adv = attack.run(model, x, y, check=False)
    assert x_adv.shape == x.shape


def test_empty_batch():
    model = conv_model(0)
    x = torch.rand(0, 3, 8, 8)
    y = torch.zeros(0, dtype=torch.long)
    assert PGD(EPS)(model, x, y).shape == x.shape


def test_public_names():
    import advtrain.attacks as attacks
    for name in attacks.__all__:
        assert hasattr(attacks, name)
    assert issubclass(PGD, Attack) and issubclass(FGSM, PGD) and issubclass(NFGSM, PGD)


# ---------------------------------------------------------------- losses

def test_cross_entropy_per_example():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(cross_entropy(z, y), F.cross_entropy(z, y, reduction="none"))


def test_margin_and_dlr_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(margin_loss(z, y), torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-2.0 / 3.0, 2.0 / 3.0]))
    z5 = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0]])
    torch.testing.assert_close(targeted_dlr_loss(z5, torch.tensor([0]), torch.tensor([1])),
                               torch.tensor([-2.0 / 3.5]))
    torch.testing.assert_close(targeted_dlr_loss(z5, torch.tensor([3]), torch.tensor([0])),
                               torch.tensor([4.0 / 3.5]))


def test_dlr_is_shift_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    t = (y + 1) % 10
    torch.testing.assert_close(dlr_loss(7.0 * z + 3.0, y), dlr_loss(z, y))
    torch.testing.assert_close(targeted_dlr_loss(7.0 * z + 3.0, y, t), targeted_dlr_loss(z, y, t))


@pytest.mark.parametrize("fn", [cross_entropy, margin_loss, dlr_loss])
def test_losses_return_float32_per_example(fn):
    z = torch.randn(6, 10).to(torch.bfloat16)
    y = torch.randint(0, 10, (6,), dtype=torch.int32)
    out = fn(z, y)
    assert out.dtype == torch.float32 and out.shape == (6,)


def test_get_loss_registry():
    assert get_loss("ce") is cross_entropy
    assert get_loss("margin") is margin_loss
    assert get_loss("dlr") is dlr_loss
    assert get_loss(margin_loss) is margin_loss
    with pytest.raises(ValueError, match="loss must be one of 'ce', 'margin', 'dlr'.*'hinge'"):
        get_loss("hinge")
    with pytest.raises(TypeError, match="loss must be a loss name"):
        get_loss(3)


def test_losses_check_class_count_and_shapes():
    with pytest.raises(ValueError, match="dlr_loss needs at least 3 classes"):
        dlr_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targeted_dlr_loss needs at least 4 classes"):
        targeted_dlr_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                          torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="margin_loss expects labels of shape"):
        margin_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, error, match", [
    (lambda: PGD(-0.1), ValueError, "eps must be finite and >= 0"),
    (lambda: PGD(torch.tensor([0.1, -0.1])), ValueError, "eps must be finite and >= 0"),
    (lambda: PGD("8/255"), TypeError, "eps must be a number or a tensor"),
    (lambda: PGD(0.1, steps=0), ValueError, "steps must be >= 1"),
    (lambda: PGD(0.1, steps=2.0), TypeError, "steps must be an int"),
    (lambda: PGD(0.1, restarts=0), ValueError, "restarts must be >= 1"),
    (lambda: PGD(0.1, restarts=2, random_start=False), ValueError,
     "restarts=2 needs random_start=True"),
    (lambda: PGD(0.1, step_size=-1.0), ValueError, "step_size must be finite and >= 0"),
    (lambda: PGD(0.1, init_radius=float("nan")), ValueError, "init_radius must be finite and >= 0"),
    (lambda: PGD(0.1, norm="l1"), ValueError, "norm must be one of 'linf', 'l2'; got 'l1'"),
    (lambda: PGD(0.1, loss="hinge"), ValueError, "loss must be one of"),
    (lambda: PGD(0.1, loss=None), TypeError, "loss must be a loss name"),
    (lambda: PGD(0.1, targeted="yes"), TypeError, "targeted must be a bool"),
    (lambda: PGD(0.1, random_start=1), TypeError, "random_start must be a bool"),
    (lambda: PGD(0.1, project=None), TypeError, "project must be a bool"),
    (lambda: PGD(0.1, bn_mode="frozen"), ValueError, "bn_mode must be one of"),
    (lambda: FGSM(-1.0), ValueError, "eps must be finite and >= 0"),
    (lambda: FGSMRS(0.1, step_size=-0.1), ValueError, "step_size must be finite and >= 0"),
    (lambda: NFGSM(0.1, noise=-0.2), ValueError, "noise must be finite and >= 0"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _good():
    return conv_batch(0, n=4)


@pytest.mark.parametrize("make_input, error, match", [
    (lambda: (_good()[0] * 2, _good()[1]), ValueError, r"x must hold pixels in \[0, 1\]"),
    (lambda: (_good()[0] - 0.5, _good()[1]), ValueError, r"x must hold pixels in \[0, 1\]"),
    (lambda: (_good()[0][0], _good()[1]), ValueError, r"x must have shape \(N, C, H, W\)"),
    (lambda: (_good()[0].numpy(), _good()[1]), TypeError, "x must be a torch.Tensor"),
    (lambda: ((_good()[0] * 255).to(torch.uint8), _good()[1]), TypeError,
     "x must be a floating-point tensor"),
    (lambda: (_good()[0], torch.tensor([0, 1, -1, 2])), ValueError, "outside the valid range"),
    (lambda: (_good()[0], torch.tensor([0, 1, 2])), ValueError, r"y must have shape \(4,\)"),
    (lambda: (_good()[0], torch.zeros(4, 1, dtype=torch.long)), ValueError,
     r"y must have shape \(4,\)"),
    (lambda: (_good()[0], torch.zeros(4)), TypeError, "y must hold integer class indices"),
])
def test_bad_call_inputs(make_input, error, match):
    x, y = make_input()
    with pytest.raises(error, match=match):
        PGD(EPS, steps=1)(conv_model(0), x, y)


def test_bad_model_and_per_example_radius():
    x, y = _good()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PGD(EPS)(lambda t: t, x, y)
    with pytest.raises(ValueError, match="eps: a per-example radius needs 4 values"):
        PGD(torch.full((3,), EPS))(conv_model(0), x, y)
    with pytest.raises(ValueError, match="step_size: a per-example radius needs 4 values"):
        PGD(EPS, step_size=torch.full((5,), 0.01))(conv_model(0), x, y)


def test_label_at_or_above_class_count_is_rejected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"y holds labels in \[0, 5\].*\[0, 4\]"):
        PGD(EPS, steps=1)(model, x, torch.tensor([0, 1, 5]))


# ---------------------------------------------------------------- radius units

@pytest.mark.parametrize("make", [
    pytest.param(lambda eps: PGD(eps), id="pgd"),
    pytest.param(lambda eps: FGSM(eps), id="fgsm"),
    pytest.param(lambda eps: FGSMRS(eps), id="fgsm_rs"),
    pytest.param(lambda eps: NFGSM(eps), id="nfgsm"),
    pytest.param(lambda eps: APGD(eps), id="apgd"),
    pytest.param(lambda eps: ATTAPolicy(eps), id="atta_policy"),
    pytest.param(lambda eps: APARTPolicy(eps), id="apart_policy"),
    pytest.param(lambda eps: attack_suite("full", eps), id="attack_suite"),
    pytest.param(lambda eps: evaluate(conv_model(0), conv_batch(0, n=2), eps=eps, progress=False), id="evaluate"),
    pytest.param(lambda eps: check_gradient_masking(conv_model(0), *conv_batch(0, n=2), eps=eps),
                 id="gradient_masking"),
])
def test_linf_eps_in_0_255_units_is_refused_with_a_hint(make):
    with pytest.raises(ValueError, match=r"eps is an L∞ radius in pixel units .* must be <= 1; got 8 "
                                         r"\(did you mean 8/255\?\)"):
        make(8)


@pytest.mark.parametrize("make", [PGD, FGSM, FGSMRS, NFGSM, APGD, ATTAPolicy, APARTPolicy])
def test_linf_eps_of_a_whole_pixel_range_is_accepted(make):
    assert float(make(1.0).eps) == 1.0


@pytest.mark.parametrize("make", [lambda eps: PGD(eps), lambda eps: APGD(eps)], ids=["pgd", "apgd"])
def test_per_example_linf_eps_above_one_is_refused(make):
    with pytest.raises(ValueError, match=r"L∞ radius .* got values up to 8 \(did you mean eps / 255\?\)"):
        make(torch.tensor([8 / 255, 8.0]))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        make(torch.tensor([8 / 255, float("nan")]))


@pytest.mark.parametrize("cls", [PGD, APGD])
def test_l2_eps_may_exceed_one_but_not_the_diameter_of_the_pixel_box(cls):
    model = conv_model(0)
    x, y = conv_batch(0, n=2)  # 3x8x8: the box's diameter is sqrt(192) = 13.86
    x_adv = cls(2.0, norm="l2", steps=2)(model, x, y)
    assert (l2(x_adv, x) <= 2.0 + 1e-4).all()
    cls(192 ** 0.5, norm="l2", steps=1)(model, x, y)
    attack = cls(14.0, norm="l2", steps=1)  # the bound depends on the image size, known at the call
    with pytest.raises(ValueError, match=r"eps is an L2 radius .* shape \(3, 8, 8\) it must be <= "
                                         r"√\(C·H·W\) = 13.86, .* got 14"):
        attack(model, x, y)
    with pytest.raises(ValueError, match="L2 radius"):
        cls(torch.tensor([1.0, 14.0]), norm="l2", steps=1).run(model, x, y, check=False)


def test_l2_radius_bound_is_checked_without_a_host_sync():
    model = conv_model(0)
    x, y = conv_batch(0, n=2)
    attack = PGD(torch.tensor([1.0, 13.0]), norm="l2", steps=1)
    with NoHostSync():
        attack.run(model, x, y, check=False)

"""SSAT, ZeroGrad and MultiGrad: each attack's rule recomputed by hand on a
tiny model (per example, in plain Python where it is a selection), their
input checks, and the quantile helper against torch.quantile."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import NoHostSync
from advtrain.methods.registry import METHODS
from advtrain.methods.ssat import SSATAttack, SSATTrainer, first_misclassified
from advtrain.methods.zerograd import (MultiGradAttack, MultiGradTrainer, ZeroGradAttack, ZeroGradTrainer,
                                       per_example_quantile, zero_small_components)

EPS = 8 / 255


def _net(batch_norm: bool = False, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if batch_norm else []) + \
        [nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes)]
    return nn.Sequential(*layers)


def _batch(n: int = 6, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(leaf), y, reduction="sum"), leaf)
    return g


def _quantile_by_hand(values, q: float) -> float:
    """Linear interpolation between the order statistics around rank q·(n − 1)."""
    s = sorted(values)
    rank = q * (len(s) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


# ------------------------------------------------------------------ ZeroGrad
def test_the_per_example_quantile_is_torch_quantile_and_the_hand_formula():
    values = torch.rand(4, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.35, 0.5, 0.9, 1.0):
        ours = per_example_quantile(values, q)
        assert torch.equal(ours, torch.quantile(values.flatten(1), q, dim=1)), q
        for i in range(4):
            assert math.isclose(ours[i].item(), _quantile_by_hand(values[i].flatten().tolist(), q), rel_tol=1e-6)


def test_zero_small_components_zeroes_exactly_those_below_the_example_quantile():
    grad = torch.tensor([[[[-4.0, 1.0], [0.5, -2.0]]], [[[3.0, -3.0], [0.1, 0.2]]]])
    # q = 0.5 of |g|: example 0 {0.5, 1, 2, 4} → 1.5; example 1 {0.1, 0.2, 3, 3} → 1.6
    out = zero_small_components(grad, 0.5)
    assert torch.equal(out, torch.tensor([[[[-4.0, 0.0], [0.0, -2.0]]], [[[3.0, -3.0], [0.0, 0.0]]]]))
    # a component equal to the quantile is kept (the rule is strictly below)
    assert torch.equal(zero_small_components(torch.tensor([[1.0, 2.0, 3.0]]), 0.5), torch.tensor([[0.0, 2.0, 3.0]]))


def test_zerograd_moves_only_the_components_at_or_above_the_quantile_by_hand():
    model, (x, y) = _net(), _batch()
    q = 0.35
    attack = ZeroGradAttack(EPS, quantile=q, random_start=False, check_inputs=False)
    x_adv = attack(model, x, y)
    g = _input_grad(model, x, y)
    n = g[0].numel()
    for i in range(x.shape[0]):
        magnitudes = g[i].abs().flatten().tolist()
        threshold = _quantile_by_hand(magnitudes, q)
        zeroed = g[i].abs() < threshold
        # no ties in random data: the zeroed ones are the floor(q·(n − 1)) + 1 smallest
        assert int(zeroed.sum()) == math.floor(q * (n - 1)) + 1
        assert torch.equal(x_adv[i][zeroed], x[i][zeroed])
        moved = torch.clamp(x[i] + EPS * g[i].sign(), 0, 1)  # the 2ε step is clipped back to ε
        torch.testing.assert_close(x_adv[i][~zeroed], moved[~zeroed], rtol=0, atol=1e-6)
    assert int((x_adv != x).sum()) > 0


def test_zerograd_from_the_random_start_keeps_the_start_where_it_zeroes():
    model, (x, y) = _net(batch_norm=True), _batch()
    reference = copy.deepcopy(model).train()
    torch.manual_seed(5)
    x_adv = ZeroGradAttack(EPS, steps=2)(model, x, y)
    torch.manual_seed(5)
    delta = torch.clamp(torch.zeros_like(x).uniform_(-EPS, EPS), -x, 1 - x)
    for _ in range(2):  # BatchNorm in train mode, as in the reference
        raw = _input_grad(reference, x + delta, y)
        g = zero_small_components(raw, 0.35)
        assert torch.equal(g == 0, raw.abs() < per_example_quantile(raw.abs(), 0.35).view(-1, 1, 1, 1))
        delta = torch.clamp(torch.clamp(delta + 2 * EPS * g.sign(), -EPS, EPS), -x, 1 - x)
    torch.testing.assert_close(x_adv, x + delta, rtol=0, atol=1e-6)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ----------------------------------------------------------------- MultiGrad
@pytest.mark.parametrize("samples, min_agree", [(3, None), (4, 3)])
def test_multigrad_steps_where_enough_sign_votes_agree_by_hand(samples, min_agree):
    model, (x, y) = _net(), _batch()
    torch.manual_seed(3)
    x_adv = MultiGradAttack(EPS, samples=samples, min_agree=min_agree)(model, x, y)
    torch.manual_seed(3)
    signs = []
    for _ in range(samples):
        delta = torch.clamp(torch.empty_like(x).uniform_(-EPS, EPS), -x, 1 - x)
        signs.append(_input_grad(model, x + delta, y).sign())
    positive, negative = sum((s > 0).int() for s in signs), sum((s < 0).int() for s in signs)
    need = samples if min_agree is None else min_agree
    direction = (positive >= need).float() - (negative >= need).float()
    expected = torch.clamp(x + EPS * direction, 0, 1)  # one step from the clean image, clipped to ε
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)
    still = direction == 0
    assert torch.equal(x_adv[still], x[still]) and 0 < int(still.sum()) < still.numel()


# ---------------------------------------------------------------------- SSAT
def test_first_misclassified_picks_the_smallest_checkpoint_or_the_full_perturbation():
    wrong = torch.tensor([[False, True, False, True], [True, True, False, False]])
    assert first_misclassified(wrong).tolist() == [1, 0, 2, 0]
    assert first_misclassified(torch.zeros(0, 3, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_ssat_trains_on_the_first_misclassified_checkpoint_by_hand():
    eps, c = 24 / 255, 4
    model, (x, y) = _net(batch_norm=True), _batch(n=48, seed=2)
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    x_adv = SSATAttack(eps, divisions=c, inference_batch=10)(model, x, y)

    torch.manual_seed(7)
    start = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    reference.train()  # the gradient pass in train mode ...
    leaf = start.clone().requires_grad_(True)
    logits = reference(leaf)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), leaf)
    full = torch.clamp(x + torch.clamp(start + 1.25 * eps * g.sign() - x, -eps, eps), 0, 1)
    reference.eval()  # ... the checkpoints in eval mode, one example at a time
    chosen = []
    for i in range(x.shape[0]):
        if logits[i].argmax() != y[i]:
            expected, k = x[i], 0
        else:
            k = next((k for k in range(1, c) if reference((x[i] + k * (full[i] - x[i]) / c)[None]).argmax() != y[i]),
                     c)
            expected = x[i] + k * (full[i] - x[i]) / c
        chosen.append(k)
        torch.testing.assert_close(x_adv[i], expected, rtol=0, atol=1e-6)
    assert set(chosen) >= {0, 1, c}, chosen  # clean, a checkpoint and the full perturbation all occur
    assert (x_adv - x).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


def test_ssat_with_one_division_is_fgsm_rs_with_the_clean_fallback_and_chunking_changes_nothing():
    model, (x, y) = _net(), _batch(n=12)
    outs = []
    for divisions, chunk in ((3, 1), (3, 1024), (1, 1024)):
        torch.manual_seed(0)
        with NoHostSync():
            outs.append(SSATAttack(EPS, divisions=divisions, inference_batch=chunk).run(model, x, y, check=False))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(0)
    start = torch.clamp(x + torch.empty_like(x).uniform_(-EPS, EPS), 0, 1)
    g = _input_grad(model, start, y)
    full = torch.clamp(x + torch.clamp(start + 10 / 255 * g.sign() - x, -EPS, EPS), 0, 1)
    correct = (model(start).argmax(1) == y).view(-1, 1, 1, 1)
    assert torch.equal(outs[2], torch.where(correct, full, x))


def test_the_attacks_run_without_host_synchronisation():
    model, (x, y) = _net(batch_norm=True), _batch()
    with NoHostSync():
        for attack in (ZeroGradAttack(EPS, steps=2), MultiGradAttack(EPS)):
            attack.run(model, x, y, check=False)


# ------------------------------------------------------------- presets, input
def test_presets_hold_the_benchmark_and_paper_knobs():
    ssat = SSATTrainer(_net(), progress=False, device="cpu").policy.attack
    assert (ssat.eps, ssat.step_size, ssat.divisions, ssat.inference_batch, ssat.bn_mode) == \
        (EPS, 1.25 * EPS, 3, 1024, "train")
    assert math.isclose(ssat.step_size, 0.0392156862745098)  # the yaml's alpha, 10/255
    zero = ZeroGradTrainer(_net(), progress=False, device="cpu").policy.attack
    assert (zero.quantile, zero.steps, zero.step_size, zero.random_start, zero.bn_mode) == \
        (0.35, 1, 2 * EPS, True, "train")
    multi = MultiGradTrainer(_net(), progress=False, device="cpu", epochs=3)
    assert (multi.policy.attack.samples, multi.policy.attack.min_agree, multi.epochs) == (3, 3, 3)
    assert METHODS["ssat"].passes(divisions=5).forward == 6 and METHODS["multigrad"].passes(samples=2).forward == 3


@pytest.mark.parametrize("build, error, match", [
    (lambda: SSATAttack(8), ValueError, "eps"),
    (lambda: SSATAttack(EPS, divisions=0), ValueError, "divisions"),
    (lambda: SSATAttack(EPS, step_size=-1.0), ValueError, "step_size"),
    (lambda: SSATAttack(EPS, inference_batch=2.5), TypeError, "inference_batch"),
    (lambda: ZeroGradAttack(EPS, quantile=1.5), ValueError, "quantile"),
    (lambda: ZeroGradAttack(EPS, quantile="0.3"), TypeError, "quantile"),
    (lambda: ZeroGradAttack(EPS, steps=0), ValueError, "steps"),
    (lambda: ZeroGradAttack(EPS, random_start=1), TypeError, "random_start"),
    (lambda: MultiGradAttack(EPS, samples=0), ValueError, "samples"),
    (lambda: MultiGradAttack(EPS, samples=3, min_agree=4), ValueError, "min_agree"),
    (lambda: ZeroGradTrainer(_net(), eps=16), ValueError, "eps"),
])
def test_bad_input_is_refused_naming_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()

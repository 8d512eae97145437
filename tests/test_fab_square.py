"""Tests of FAB-T and Square and of the standard AutoAttack suite: FAB's exact
projections and its minimal adversarial point on linear models, Square's ball,
box, query budget and success where the margin allows it, the suite's order
and its restriction to the points still robust, seeds, and bad input."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn

from _helpers import NoHostSync

from advtrain.attacks import FAB, Square
from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack
from advtrain.attacks.fab import project_l2_box, project_linf_box
from advtrain.evaluation import attack_suite, evaluate

EPS = 8 / 255
SHAPE = (3, 4, 4)


def linear_model(v: Tensor, bias: float) -> nn.Module:
    """Two classes with ``z_1 − z_0 = v·x + bias``."""
    lin = nn.Linear(v.numel(), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = v.flatten()
        lin.bias.copy_(torch.tensor([0.0, bias]))
    return nn.Sequential(nn.Flatten(), lin).eval()


def net_and_batch(n: int):
    """A small random conv net (10 classes, 3x8x8 images) in eval mode and ``n``
    random images labelled with its own predictions, so every example starts
    correct and the attacks decide what stays robust."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def clipped_step(t: Tensor, w: Tensor, lam: float, norm: str) -> Tensor:
    """The box-clipped step of size ``lam`` towards the plane: each coordinate
    moves by ``lam·sign(w)`` (L∞) or ``lam·w`` (L2) but stays in [0, 1]."""
    step = lam * torch.sign(w) if norm == "linf" else lam * w
    return (t + step).clamp(0, 1) - t


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projections_are_the_smallest_step_onto_the_plane_inside_the_box(norm):
    # An independent solution: the step to the plane is the clipped step of
    # the smallest λ at which w·(t + d(λ)) reaches b (monotone in λ: bisection).
    g = torch.Generator().manual_seed(0)
    t = torch.rand(6, 20, generator=g)
    w = torch.randn(6, 20, generator=g)
    w[0, :3] = 0.0  # coordinates with no gradient never move
    b = (w * t).sum(1) + torch.tensor([0.3, 0.5, 1.0, 2.0, -0.4, 0.05])
    project = project_linf_box if norm == "linf" else project_l2_box
    d = project(t, w, b)
    assert torch.allclose((w * (t + d)).sum(1), b, atol=1e-4)
    assert ((t + d) >= -1e-6).all() and ((t + d) <= 1 + 1e-6).all() and (d[0, :3] == 0).all()
    for i in range(6):
        gap = float(b[i] - w[i] @ t[i])  # how far w·z must move
        side = 1.0 if gap > 0 else -1.0
        lo, hi = 0.0, 1e3
        for _ in range(200):
            mid = (lo + hi) / 2
            reached = side * float(w[i] @ clipped_step(t[i], side * w[i], mid, norm)) >= side * gap
            lo, hi = (lo, mid) if reached else (mid, hi)
        expected = clipped_step(t[i], side * w[i], hi, norm)
        assert torch.allclose(d[i], expected, atol=1e-4), i


def test_a_plane_beyond_the_box_gives_its_closest_corner():
    t = torch.full((1, 4), 0.5)
    w = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    d = project_linf_box(t, w, torch.tensor([100.0]))
    assert torch.equal(t + d, torch.tensor([[1.0, 0.0, 1.0, 0.5]]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_adversarial_point_of_a_linear_model(norm):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(SHAPE, generator=g)
    v = torch.sign(v) * (v.abs() + 0.2)
    x = 0.4 + 0.2 * torch.rand(5, *SHAPE, generator=g)
    y = torch.zeros(5, dtype=torch.long)
    dual = v.abs().sum() if norm == "linf" else v.norm()  # the dual norm of v
    model = linear_model(v, bias=-float((v * x).flatten(1).sum(1).max()) - 0.05 * float(dual))
    f = model(x)[:, 1] - model(x)[:, 0]
    assert (f < 0).all()
    dist = -f.detach() / dual  # distance to the boundary; the box is never reached here
    direction = torch.sign(v) if norm == "linf" else v / v.norm()  # the unique closest point's
    eps = float(dist.max()) * 1.01
    x_adv = FAB(eps, norm=norm, steps=30)(model, x, y)
    assert (model(x_adv).argmax(1) == 1).all()
    moved = (x_adv - x).flatten(1)
    found = moved.abs().amax(1) if norm == "linf" else moved.norm(dim=1)
    # the overshoot η = 1.05 and pull-back β = 0.9 settle 0.52% beyond the boundary
    assert ((found / dist > 1.0) & (found / dist < 1.006)).all()
    assert torch.allclose(x_adv - x, found.view(-1, 1, 1, 1) * direction, atol=1e-5)
    # a radius just below the boundary breaks nothing, and nothing moves
    x_same = FAB(float(dist.min()) * 0.99, norm=norm, steps=30)(model, x, y)
    assert torch.equal(x_same, x)


def test_fab_tries_the_most_likely_wrong_classes_in_order_and_keeps_the_first_success():
    # Class 0 is true (z_0 = 0); class 1 is the runner-up (z_1 = -0.1) but its
    # logit is constant, so it is out of reach; class 2 (z_2 = 2·x_0 - 1.2 = -0.2
    # at x_0 = 0.5) wins once one pixel is raised by 0.1.
    lin = nn.Linear(3 * 4 * 4, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[2, 0] = 2.0
        lin.bias.copy_(torch.tensor([0.0, -0.1, -1.2]))
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.full((1, *SHAPE), 0.5)
    y = torch.tensor([0])
    assert FAB(0.099, steps=20)(model, x, y).equal(x)
    assert FAB(0.11, steps=20, n_target_classes=1)(model, x, y).equal(x)  # only the runner-up tried
    x_adv = FAB(0.11, steps=20)(model, x, y)
    moved = (x_adv - x).flatten()
    assert int(model(x_adv).argmax(1)) == 2 and abs(float(moved[0]) - 0.1) < 1e-3 and (moved[1:] == 0).all()


def test_fab_iterations_make_no_host_synchronisation_and_leave_parameter_gradients_alone():
    model, x, y = net_and_batch(8)
    model = nn.Sequential(model[:2], nn.BatchNorm2d(8).eval(), model[2:])  # a mode to restore
    attack = FAB(EPS, steps=3)
    target = (y + 1) % 10
    with NoHostSync():
        attack._run(model, x, y, target, torch.full((8, 1, 1, 1), EPS), None)
    model.train()
    x_adv = attack(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert ((x_adv - x).abs().amax() <= EPS + 1e-7) and x_adv.min() >= 0 and x_adv.max() <= 1


class Counter(nn.Module):
    """Counts forward passes per image (images are told apart by their first pixel)."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        super().__init__()
        self.model, self.keys = model, x[:, 0, 0, 0].clone()
        self.calls = torch.zeros(x.shape[0], dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        # the clean first pixels are far apart, further than any perturbation moves one
        nearest = (x[:, 0, 0, 0].unsqueeze(1) - self.keys.unsqueeze(0)).abs().argmin(1)
        self.calls += torch.bincount(nearest, minlength=self.calls.numel())
        return self.model(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_stays_in_the_ball_and_box_and_within_its_query_budget(norm):
    model, x, y = net_and_batch(5)
    x[:, 0, 0, 0] = torch.arange(5) * 0.25  # keys 0.25 apart; no pixel moves by 0.125
    eps = EPS if norm == "linf" else 0.1
    counter = Counter(model, x)
    x_adv = Square(eps, n_queries=60, norm=norm).run(counter, x, y, check=False)  # no validation pass
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert (dist <= eps * (1 + 1e-6)).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    # one clean pass, then at most n_queries; an example never broken uses all of them
    still = model(x_adv).argmax(1) == y
    assert still.any() and (counter.calls <= 61).all() and (counter.calls[still] == 61).all()


def test_square_breaks_a_linear_model_exactly_where_the_margin_allows():
    # z_1 - z_0 = v·x + c with one sign per channel, so the corner eps·sign(v)
    # is a Square point; it raises z_1 - z_0 by eps·‖v‖₁.
    v = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1).expand(SHAPE).contiguous()
    gain = EPS * float(v.abs().sum())
    x = torch.full((4, *SHAPE), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    margins = torch.tensor([0.3, 0.9, 1.02, 2.0]) * gain
    models = [linear_model(v, bias=-float((v * x[0]).sum()) - float(m)) for m in margins]
    broken = [int(model(Square(EPS, n_queries=100)(model, x[:1], y[:1])).argmax(1)) == 1 for model in models]
    assert broken == [True, True, False, False]


def test_seeds_reproduce_and_the_global_random_state_is_untouched():
    model, x, y = net_and_batch(8)
    state = torch.get_rng_state()
    a = Square(EPS, n_queries=20, seed=3)(model, x, y)
    b = Square(EPS, n_queries=20, seed=3)(model, x, y)
    c = Square(EPS, n_queries=20, seed=4)(model, x, y)
    f1 = FAB(EPS, steps=3, n_target_classes=2, restarts=2, seed=3)(model, x, y)
    f2 = FAB(EPS, steps=3, n_target_classes=2, restarts=2, seed=3)(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(f1, f2)


class Recorder(Attack):
    """Wraps an attack and records which images (by first pixel) it was given."""

    def __init__(self, attack: Attack, log: List[str], seen: Dict[str, Tensor], name: str) -> None:
        super().__init__(attack.eps)
        self.attack, self.log, self.seen, self.name = attack, log, seen, name

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.log.append(self.name)
        self.seen[self.name] = x[:, 0, 0, 0].clone()
        return self.attack.perturb(model, x, y)


def test_the_standard_suite_runs_in_order_on_the_points_still_robust():
    suite = attack_suite("standard", EPS)
    assert list(suite) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    ce, t, fab, square = suite.values()
    assert isinstance(ce, APGD) and (ce.loss, ce.steps, ce.targeted, ce.restarts) == ("ce", 100, False, 1)
    assert isinstance(t, APGD) and (t.loss, t.steps, t.targeted, t.n_target_classes) == ("dlr", 100, True, 9)
    assert isinstance(fab, FAB) and (fab.steps, fab.n_target_classes, fab.restarts) == (100, 9, 1)
    assert isinstance(square, Square) and (square.n_queries, square.p_init, square.loss) == (5000, 0.8, "margin")
    assert list(attack_suite("full", EPS)) == ["PGD-20", "CW-20", "APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert {a.norm for a in attack_suite("standard", 0.5, norm="l2").values()} == {"l2"}

    model, x, y = net_and_batch(48)
    x[:, 0, 0, 0] = torch.arange(48) / 48  # a key per image
    with torch.no_grad():
        y = model(x).argmax(1)
    log: List[str] = []
    seen: Dict[str, Tensor] = {}
    small = {"APGD-CE": APGD(EPS, steps=5), "APGD-T": APGD(EPS, steps=5, loss="dlr", targeted=True, n_target_classes=2),
             "FAB-T": FAB(EPS, steps=5, n_target_classes=2), "Square": Square(EPS, n_queries=30)}
    attacks = {name: Recorder(a, log, seen, name) for name, a in small.items()}
    torch.manual_seed(0)
    report = evaluate(model, (x, y), attacks, batch_size=48, progress=False)
    assert log == list(small)
    keys = x[:, 0, 0, 0]
    before = report.clean_correct
    for name in small:
        assert torch.equal(seen[name], keys[before]), name  # exactly the images still robust
        before = report.per_attack_correct[name]
    assert report.per_attack["APGD-CE"] < report.clean_accuracy


@pytest.mark.parametrize("make, error, match", [
    (lambda: FAB(8), ValueError, "did you mean 8/255"),
    (lambda: FAB(EPS, steps=0), ValueError, "steps must be >= 1"),
    (lambda: FAB(EPS, norm="l1"), ValueError, "norm must be one of"),
    (lambda: FAB(EPS, beta=1.5), ValueError, r"beta must be a finite number in \(0, 1\]"),
    (lambda: FAB(EPS, eta=float("inf")), ValueError, "eta must be a finite number"),
    (lambda: FAB(EPS, alpha_max="0.1"), TypeError, "alpha_max must be a number"),
    (lambda: FAB(EPS, seed=-1), ValueError, "seed must be >= 0"),
    (lambda: Square(EPS, n_queries=0), ValueError, "n_queries must be >= 1"),
    (lambda: Square(EPS, p_init=0.0), ValueError, r"p_init must be a finite number in \(0, 1\]"),
    (lambda: Square(EPS, loss="dlr"), ValueError, "loss must be one of 'margin', 'ce'"),
    (lambda: Square(EPS, rescale_schedule=1), TypeError, "rescale_schedule must be a bool"),
])
def test_bad_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_calls_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="L2 Square needs images of at least 5 x 5 pixels"):
        Square(0.5, norm="l2")(model, x, y)
    with pytest.raises(ValueError, match="targeted FAB needs at least 2 classes"):
        FAB(EPS)(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1)), x, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="x must hold pixels in"):
        Square(EPS)(model, x * 2, y)

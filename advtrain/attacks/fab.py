"""FAB: the Fast Adaptive Boundary attack, targeted, in the L∞ or L2 norm.

Croce & Hein 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack" (ICML). FAB looks for the *smallest* perturbation
that changes the prediction: at each iteration it linearizes the decision
boundary between the true class and a target class, projects both the
current iterate and the clean image onto that hyperplane (inside the box
[0, 1]), and moves to a convex combination of the two projections, biased
towards the clean image. Once an iterate is adversarial it is pulled back
towards the clean image, so the search ends near the closest boundary point.
FAB-T, the targeted version over the 9 most likely wrong classes, is the
third attack of the standard AutoAttack suite; an example counts as broken
when the adversarial point it found lies within ``eps``.

Units: images are pixels in [0, 1] (N, C, H, W); ``eps`` is in pixel units
(8/255 for the standard CIFAR-10 L∞ threat model), a number or one value per
example.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import Radius, check_choice, check_interval, check_positive_int, per_example
from .base import Attack, BNMode, input_gradient

FAB_NORMS = ("linf", "l2")

NOT_FOUND = 1e10
"""Distance recorded for an example with no adversarial point yet."""


def project_linf_box(points: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Smallest L∞ step from each point onto its hyperplane, inside the box.

    For each row ``t`` of ``points`` (M, D) with hyperplane ``{z : w·z = b}``
    (``w`` (M, D), ``b`` (M,)), returns the step ``d`` of smallest L∞ norm
    with ``w·(t + d) = b`` and ``t + d`` in [0, 1]^D; when the box does not
    reach the hyperplane, the step to the box corner closest to it. Solved
    exactly: the L∞ radius ``λ`` at which the clipped step ``sign(w)·λ``
    meets the plane is found by a binary search over the sorted coordinate
    limits (``ceil(log2 D)`` rounds), all rows at once and without host
    synchronisation.
    """
    t = points
    side = torch.where((w * t).sum(1) - b >= 0, 1.0, -1.0)
    w = w * side.unsqueeze(1)
    b = b * side
    toward_zero = (w < 0).float()  # coordinates that the step moves towards 0
    nonzero = (w != 0).float()
    d = (toward_zero - t) * nonzero  # the step to the far box corner
    limit = toward_zero - t * (2 * toward_zero - 1)  # room to that corner per coordinate
    order = torch.argsort(limit, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    rev = order.flip((1,))
    w_sorted = w.gather(1, rev)
    s = torch.cumsum(w_sorted.abs(), dim=1)
    sb = torch.cumsum(-w_sorted * d.gather(1, rev), dim=1) + b0.unsqueeze(1)
    # Where even the full box does not reach the plane: unbounded λ (clipped below).
    beyond = b - (sb[:, -1] - s[:, -1] * limit.gather(1, order[:, 0:1]).squeeze(1)) > 0
    inside = (b - b0 > 0) & ~beyond
    n_cols = w.shape[1]
    lb = torch.zeros(w.shape[0], device=w.device)
    ub = torch.full_like(lb, n_cols - 1)
    for _ in range(math.ceil(math.log2(n_cols))):
        mid = torch.floor((lb + ub) / 2)
        col = mid.long().unsqueeze(1)
        idx = order.gather(1, n_cols - 1 - col)
        reached = b - (sb.gather(1, col) - s.gather(1, col) * limit.gather(1, idx)).squeeze(1) > 0
        lb = torch.where(reached, mid, lb)
        ub = torch.where(reached, ub, mid)
    col = lb.long().unsqueeze(1)
    lam_beyond = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), min=0).unsqueeze(1)
    lam_inside = torch.clamp_min((b - sb.gather(1, col).squeeze(1)) / (-s.gather(1, col).squeeze(1)),
                                 min=0).unsqueeze(1)
    d_beyond = (2 * toward_zero - 1) * lam_beyond
    d_inside = torch.min(lam_inside, d) * toward_zero + torch.max(-lam_inside, d) * (1 - toward_zero)
    d = torch.where(beyond.unsqueeze(1), d_beyond, torch.where(inside.unsqueeze(1), d_inside, d))
    return d * nonzero


def project_l2_box(points: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Smallest L2 step from each point onto its hyperplane, inside the box.

    Same contract as :func:`project_linf_box` in the L2 norm: the step is
    ``−λ·w`` clipped coordinate-wise at the box, and the ``λ`` at which it
    meets the plane is found by a binary search over the sorted coordinate
    limits; coordinates with ``|w| < 1e-8`` do not move.
    """
    t = points
    c = (w * t).sum(1) - b
    side = torch.where(c >= 0, 1.0, -1.0)
    w = w * side.unsqueeze(1)
    c = c * side
    tiny = w.abs() < 1e-8
    moves = (w.abs() > 1e-8).float()
    # λ at which each coordinate reaches the box (never, for tiny w)
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r = r.masked_fill(tiny, 1e12)
    r = torch.where(r == -1e12, -r, r)
    rs, order = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs = rs.masked_fill(rs == 1e12, 0)
    rs2 = rs2.masked_fill(rs2 == 1e12, 0)
    w2_sorted = (w ** 2).gather(1, order)
    w2_total = w2_sorted.sum(dim=1, keepdim=True)
    w2_rest = w2_total - torch.cumsum(w2_sorted, dim=1)
    d = -(r * w) * moves  # every coordinate at its box limit
    s = torch.cat((-w2_total * rs[:, 0:1], torch.cumsum((-rs2 + rs) * w2_rest, dim=1) - w2_total * rs[:, 0:1]), 1)
    unclipped = s[:, 0] + c < 0  # the plain projection stays in the box
    unreachable = (d * w).sum(dim=1) + c > 0  # even the full box does not reach the plane
    between = ~(unclipped | unreachable)
    n_cols = w.shape[1]
    lb = torch.zeros(w.shape[0], device=w.device)
    ub = torch.full_like(lb, n_cols - 1)
    for _ in range(math.ceil(math.log2(n_cols))):
        mid = torch.floor((lb + ub) / 2)
        reached = s.gather(1, mid.long().unsqueeze(1)).squeeze(1) + c > 0
        lb = torch.where(reached, mid, lb)
        ub = torch.where(reached, ub, mid)
    col = lb.long().unsqueeze(1)
    d_unclipped = -(c / w2_total.squeeze(1)).unsqueeze(1) * w
    rest = w2_rest.gather(1, col).squeeze(1)
    lam = (s.gather(1, col).squeeze(1) + c) / rest + rs.gather(1, col).squeeze(1)
    lam = torch.where(rest == 0, torch.zeros_like(lam), lam).unsqueeze(1)
    clipped = (lam > r).float()
    d_between = d * clipped - lam * w * (1 - clipped)
    d = torch.where(unclipped.unsqueeze(1), d_unclipped, torch.where(between.unsqueeze(1), d_between, d))
    return d * moves


def _norms(t: Tensor, norm: str) -> Tensor:
    """Per-row L∞ or L2 norm of a (M, D) tensor."""
    return t.abs().amax(dim=1) if norm == "linf" else (t ** 2).sum(dim=1).sqrt()


class FAB(Attack):
    """Targeted FAB (FAB-T, Croce & Hein 2020) in the L∞ or L2 norm.

    ``y`` are the *true* labels. For each of the ``n_target_classes`` most
    likely wrong classes of the clean input (the 2nd, 3rd, ... largest clean
    logit), one run of ``steps`` iterations attacks the examples classified
    correctly and not broken yet. With ``x`` the clean image, ``t`` the
    target, ``f = z_t − z_y`` at the iterate ``x_k`` and ``g = ∇f``:

    * ``d_1``, ``d_2``: the smallest steps (in the attack's norm) from
      ``x_k`` and from ``x`` onto the hyperplane ``g·z = g·x_k − f`` inside
      [0, 1] (:func:`project_linf_box`, :func:`project_l2_box`);
    * ``α = clip(‖d_1‖ / (‖d_1‖ + ‖d_2‖), 0, alpha_max)``;
    * ``x_{k+1} = clip((x_k + η·d_1)(1 − α) + (x + η·d_2)·α, 0, 1)``
      (``η = eta`` overshoots the plane a little);
    * if ``x_{k+1}`` is misclassified, it is recorded when closer to ``x``
      than the best so far, and pulled back: ``x_{k+1} = x + β·(x_{k+1} − x)``.

    An example is broken when its closest recorded point is within ``eps``;
    broken examples get that point, all others come back unperturbed.
    ``restarts > 1`` runs again per target from a random start at
    distance ε/2 (the first run starts at ``x``, as AutoAttack's FAB-T does).
    Random starts come from a CPU generator seeded with ``seed`` at every
    call, so results do not depend on the global random state.

    The iterations make no host synchronisation (recording and pulling back
    are ``torch.where``); choosing the examples for each target's run costs
    one. Input gradients come from :func:`torch.autograd.grad` only.

    Cost per target run and example: ``steps`` forward-and-input-backward
    passes of the logit difference and ``steps`` forward passes for the
    prediction; plus one clean forward pass per call to rank the classes.

    Args:
        eps: threat-model radius in pixel units (float or one value per
            example; at most 1 in L∞, at most √(C·H·W) in L2): the largest
            distance that counts as broken, and the random-start scale.
        steps: iterations per run (100 in AutoAttack).
        n_target_classes: target classes tried (9 in AutoAttack; at most
            ``num_classes - 1`` are used).
        norm: ``"linf"`` or ``"l2"``.
        restarts: runs per target (1 in AutoAttack's standard suite).
        alpha_max: largest weight of the clean image's projection (0.1).
        eta: overshoot of the projection step, > 0 (1.05: 5% past the plane).
        beta: pull-back factor towards the clean image after a success, in (0, 1] (0.9).
        seed: seed of the random starts.
        bn_mode: model mode while attacking: ``"eval"``, ``"train"`` or ``"keep"``.
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(
        self,
        eps: Radius,
        *,
        steps: int = 100,
        n_target_classes: int = 9,
        norm: str = "linf",
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(eps, norm=norm, bn_mode=bn_mode, check_inputs=check_inputs)
        self.steps = check_positive_int(steps, "steps")
        self.norm = check_choice(norm, "norm", FAB_NORMS)
        self.n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
        self.restarts = check_positive_int(restarts, "restarts")
        self.alpha_max = check_interval(alpha_max, "alpha_max", 0.0, 1.0)
        self.eta = check_interval(eta, "eta", 0.0, math.inf)
        self.beta = check_interval(beta, "beta", 0.0, 1.0)
        self.seed = check_positive_int(seed, "seed", minimum=0)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        if n == 0:
            return x
        eps = per_example(self.eps, x)
        dtype, x = x.dtype, x.float()
        with torch.no_grad():
            logits = model(x).float()
        k = min(self.n_target_classes, logits.shape[1] - 1)
        if k < 1:
            raise ValueError(f"targeted FAB needs at least 2 classes, the model returns {logits.shape[1]}")
        # Target j is the (j+2)-th largest clean logit; the largest is y on the examples attacked.
        ranked = logits.sort(dim=1)[1]
        todo = logits.argmax(1) == y
        x_adv = x.clone()
        generator = torch.Generator().manual_seed(self.seed)
        for j in range(k):
            target = ranked[:, -(j + 2)]
            for restart in range(self.restarts):
                active = todo.nonzero().squeeze(1)  # one synchronisation per run
                if active.numel() == 0:
                    return x_adv.to(dtype)
                adv, dist = self._run(model, x[active], y[active], target[active], eps[active],
                                      generator if restart > 0 else None)
                broken = dist <= eps[active].view(-1)
                x_adv[active] = torch.where(broken.view(-1, 1, 1, 1), adv, x_adv[active])
                todo[active] = ~broken
        return x_adv.to(dtype)

    def _boundary(self, model: nn.Module, x1: Tensor, y: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """``f = z_t − z_y`` at ``x1`` and its input gradient."""
        x1 = x1.detach().requires_grad_(True)
        logits = model(x1).float()
        rows = torch.arange(x1.shape[0], device=x1.device)
        diff = logits[rows, target] - logits[rows, y]
        return diff.detach(), input_gradient(diff.sum(), x1)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, eps: Tensor,
             generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        """One targeted run. Returns the closest adversarial point found per
        example and its distance (:data:`NOT_FOUND` where none was)."""
        n = x.shape[0]
        flat_x = x.reshape(n, -1)
        best = x.clone()
        best_dist = torch.full((n,), NOT_FOUND, device=x.device)
        x1 = x.clone()
        if generator is not None:
            if self.norm == "linf":
                u = (2 * torch.rand(x.shape, generator=generator) - 1).to(x.device)
            else:
                u = torch.randn(x.shape, generator=generator).to(x.device)
            scale = _norms(u.reshape(n, -1), self.norm).view(-1, 1, 1, 1)
            x1 = (x + eps * u / scale * 0.5).clamp(0.0, 1.0)
        project = project_linf_box if self.norm == "linf" else project_l2_box
        for _ in range(self.steps):
            f, g = self._boundary(model, x1, y, target)
            with torch.no_grad():
                w = g.reshape(n, -1)
                b = -f + (g * x1).reshape(n, -1).sum(dim=-1)
                # Both projections in one call, as one batch of 2n rows.
                d = project(torch.cat((x1.reshape(n, -1), flat_x), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
                size = _norms(d, self.norm).clamp_min(1e-8).view(-1, 1, 1, 1)
                d1, d2 = d[:n].view_as(x), d[n:].view_as(x)
                s1, s2 = size[:n], size[n:]
                alpha = torch.clamp(s1 / (s1 + s2), min=0.0, max=self.alpha_max)
                x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x + d2 * self.eta) * alpha).clamp(0.0, 1.0)
                wrong = model(x1).argmax(1) != y
                dist = _norms((x1 - x).reshape(n, -1), self.norm)
                closer = wrong & (dist < best_dist)
                best = torch.where(closer.view(-1, 1, 1, 1), x1, best)
                best_dist = torch.where(closer, dist, best_dist)
                x1 = torch.where(wrong.view(-1, 1, 1, 1), x + (x1 - x) * self.beta, x1)
        return best, best_dist


__all__ = ["FAB", "FAB_NORMS", "project_linf_box", "project_l2_box"]

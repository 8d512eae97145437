"""Square Attack: a score-based black-box attack by random square updates, L∞ or L2.

Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search" (ECCV).
Square uses no gradient at all, only the model's logits: starting from
vertical stripes of ±ε, it proposes at each query to set one randomly placed
square window to ±ε per channel around the clean image, and keeps the
proposal when it lowers the margin loss. The window shrinks on a fixed
schedule. Being gradient-free, it is the part of the standard AutoAttack
suite that still works when gradients are masked.

Units: images are pixels in [0, 1] (N, C, H, W); ``eps`` is in pixel units
(8/255 for the standard CIFAR-10 L∞ threat model), a number or one value per
example.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import Radius, check_bool, check_choice, check_interval, check_positive_int, per_example
from .base import Attack, BNMode

SQUARE_LOSSES = ("margin", "ce")
SQUARE_NORMS = ("linf", "l2")
SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
"""Square's window schedule as ``(last iteration, k)`` pairs: at iteration
``i`` the window covers ``p_init / k`` of the image for the first pair whose
bound ``i`` does not exceed, and ``p_init / 512`` beyond 8,000. The bounds
are those of a 10,000-query run (see ``Square.rescale_schedule``)."""


def _rectangles(rows: int, cols: int) -> Tensor:
    """Square's L2 building block: nested centred rectangles on a
    ``rows × cols`` grid, the k-th ring adding ``1/k²``, scaled to unit L2
    norm (float32, CPU)."""
    delta = torch.zeros(rows, cols)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top, 0):min(top + 2 * k + 1, rows), max(0, left):min(left + 2 * k + 1, cols)] += \
            1.0 / (torch.tensor([[float(k + 1)]]) ** 2)
        top, left = top - 1, left - 1
    return delta / (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def l2_window(side: int) -> Tensor:
    """The L2 window of side ``side``: a positive block of rectangles over a
    negative one, unit L2 norm (float32, CPU); before use it is transposed
    with probability 1/2."""
    delta = torch.zeros(side, side)
    delta[:side // 2] = _rectangles(side // 2, side)
    delta[side // 2:] = -1.0 * _rectangles(side - side // 2, side)
    return delta / (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020), untargeted, L∞ or L2.

    For the examples classified correctly (one clean forward pass), with
    ``x`` the clean image and ``x̂`` the best point so far:

    * L∞ start: ``x̂ = clip(x + ε·s, 0, 1)`` with ``s`` one random sign per
      channel and image column (vertical stripes). L∞ query: a window of
      side ``max(round(√(p_i·H·W)), 1)`` (at most ``min(H, W)``) at a
      uniformly random position; inside it the proposal adds ``2ε·r_c``
      (``r_c`` a random sign per channel) to ``x̂``, projected back onto the
      ε-ball and [0, 1];
    * L2 start: a grid of :func:`l2_window` patterns of side ``H // 5``, each
      with a random sign per channel, scaled to L2 norm ε. L2 query: an odd
      window side ``max(round(√(p_i·H·W)), 3)``; the perturbation in a first
      window is replaced by the old one plus a new signed pattern, rescaled so
      that it takes up the mass of this window and of a second random window
      (which is set to zero) plus the room left in the ε-ball; the whole
      perturbation is then scaled to norm ε and clipped to [0, 1];
    * a proposal replaces ``x̂`` when its loss is lower or it is
      misclassified; ``p_i`` follows :data:`SCHEDULE` from ``p_init`` (with
      ``rescale_schedule``, the iteration is first scaled to a 10,000-query
      budget);
    * the loss is the margin ``z_y − max_{j≠y} z_j`` (``"margin"``) or the
      negated cross-entropy (``"ce"``); an example stops being queried once
      its margin is <= 0.

    Window positions, signs and transpositions are drawn in the reference
    code's order, and positions are shared by the batch as there. Random
    draws come from a CPU generator seeded with ``seed`` at every call, so
    results do not depend on the global random state and AutoAttack's own
    runs (seeded the same way) are reproduced image by image.

    Each query only runs on the examples not broken yet (one host
    synchronisation per query to select them); there is no per-example
    Python loop. Cost per example: at most ``n_queries`` forward passes (the
    start and ``n_queries − 1`` proposals) plus the clean one, no backward pass.

    Args:
        eps: threat-model radius in pixel units (float or one value per
            example): at most 1 in L∞, at most √(C·H·W) in L2.
        n_queries: queries per example (5,000 in AutoAttack).
        p_init: initial share of the image the window covers, in (0, 1] (0.8).
        loss: ``"margin"`` (AutoAttack's) or ``"ce"``.
        norm: ``"linf"`` or ``"l2"`` (L2 needs images of at least 5 × 5 pixels).
        rescale_schedule: scale the window schedule to ``n_queries`` (off in
            AutoAttack's suites, where the schedule is that of 10,000 queries
            cut at ``n_queries``).
        seed: seed of the random draws.
        bn_mode: model mode while attacking: ``"eval"``, ``"train"`` or ``"keep"``.
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(
        self,
        eps: Radius,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        norm: str = "linf",
        rescale_schedule: bool = False,
        seed: int = 0,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(eps, norm=norm, bn_mode=bn_mode, check_inputs=check_inputs)
        self.n_queries = check_positive_int(n_queries, "n_queries")
        self.p_init = check_interval(p_init, "p_init", 0.0, 1.0)
        self.loss = check_choice(loss, "loss", SQUARE_LOSSES)
        self.norm = check_choice(norm, "norm", SQUARE_NORMS)
        self.rescale_schedule = check_bool(rescale_schedule, "rescale_schedule")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self._windows: Dict[int, Tensor] = {}

    def window_share(self, i: int) -> float:
        """The share ``p_i`` of the image the window covers at query ``i``."""
        if self.rescale_schedule:
            i = int(i / self.n_queries * 10000)
        for bound, k in SCHEDULE:
            if i <= bound:
                return self.p_init / k
        return self.p_init / 512

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        if n == 0:
            return x
        if self.norm == "l2" and min(x.shape[2:]) < 5:
            raise ValueError(f"L2 Square needs images of at least 5 x 5 pixels, got {tuple(x.shape[2:])}")
        eps = per_example(self.eps, x)
        dtype, x = x.dtype, x.float()
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        x_adv = x.clone()
        idx = correct.nonzero().squeeze(1)
        if idx.numel() > 0:
            x_adv[idx] = _Search(self, model, x[idx], y[idx], eps[idx]).run()
        return x_adv.to(dtype)

    def margin_and_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The margin ``z_y − max_{j≠y} z_j`` and the loss Square lowers, per example."""
        with torch.no_grad():
            logits = model(x).float()
        rows = torch.arange(x.shape[0], device=x.device)
        z_y = logits[rows, y]
        z_other = logits.index_put((rows, y), torch.tensor(float("-inf"), device=x.device)).amax(dim=1)
        margin = z_y - z_other
        if self.loss == "margin":
            return margin, margin
        return margin, -F.cross_entropy(logits, y, reduction="none")

    def window(self, side: int) -> Tensor:
        """:func:`l2_window` of ``side``, computed once per side."""
        if side not in self._windows:
            self._windows[side] = l2_window(side)
        return self._windows[side]


class _Search:
    """One run of Square's random search on correctly classified examples."""

    def __init__(self, attack: Square, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor) -> None:
        self.attack, self.model, self.x, self.y, self.eps = attack, model, x, y, eps
        self.generator = torch.Generator().manual_seed(attack.seed)

    def signs(self, *shape: int) -> Tensor:
        """Random ±1 of ``shape`` on the images' device."""
        return torch.sign(2 * torch.rand(shape, generator=self.generator) - 1).to(self.x.device)

    def position(self, high: int) -> int:
        """A uniform integer in [0, high); a CPU draw, so reading it does not
        synchronise the device."""
        return int((high * torch.rand(1, generator=self.generator)).long())

    def pattern(self, side: int) -> Tensor:
        """The L2 window pattern, transposed with probability 1/2."""
        delta = self.attack.window(side)
        if bool(torch.rand(1, generator=self.generator) > 0.5):
            delta = delta.permute(1, 0)
        return delta.to(self.x.device)

    def side(self, i: int, c: int, h: int, w: int) -> int:
        # p·(C·H·W)/C rather than p·H·W: the same float rounding as the reference
        side = int(round(math.sqrt(self.attack.window_share(i) * (c * h * w) / c)))
        if self.attack.norm == "linf":
            side = max(side, 1)
        else:
            side = max(side, 3)
            side += 1 - side % 2
        return min(side, h, w)

    def run(self) -> Tensor:
        x, y, eps = self.x, self.y, self.eps
        x_best = self.start_linf() if self.attack.norm == "linf" else self.start_l2()
        margin_min, loss_min = self.attack.margin_and_loss(self.model, x_best, y)
        for i in range(self.attack.n_queries - 1):
            idx = (margin_min > 0).nonzero().squeeze(1)  # one synchronisation per query
            if idx.numel() == 0:
                break
            x_curr, x_best_curr, eps_curr = x[idx], x_best[idx], eps[idx]
            propose = self.propose_linf if self.attack.norm == "linf" else self.propose_l2
            x_new = propose(i, x_curr, x_best_curr, eps_curr)
            margin, loss = self.attack.margin_and_loss(self.model, x_new, y[idx])
            improved = loss < loss_min[idx]
            loss_min[idx] = torch.where(improved, loss, loss_min[idx])
            accept = improved | (margin <= 0)
            margin_min[idx] = torch.where(accept, margin, margin_min[idx])
            x_best[idx] = torch.where(accept.view(-1, 1, 1, 1), x_new, x_best_curr)
        return x_best

    def start_linf(self) -> Tensor:
        n, c, _, w = self.x.shape
        return torch.clamp(self.x + self.eps * self.signs(n, c, 1, w), 0.0, 1.0)

    def start_l2(self) -> Tensor:
        x = self.x
        n, c, h, w = x.shape
        side = h // 5
        first = (h - side * 5) // 2
        delta = torch.zeros_like(x)
        for row in range(h // side):
            for col in range(w // side):
                top, left = first + row * side, first + col * side
                delta[:, :, top:top + side, left:left + side] += \
                    self.pattern(side).view(1, 1, side, side) * self.signs(n, c, 1, 1)
        return torch.clamp(x + _unit_l2(delta) * self.eps, 0.0, 1.0)

    def propose_linf(self, i: int, x: Tensor, x_best: Tensor, eps: Tensor) -> Tensor:
        c, h, w = x.shape[1:]
        side = self.side(i, c, h, w)
        vh, vw = self.position(h - side), self.position(w - side)
        window = torch.zeros(1, c, h, w, device=x.device)
        window[:, :, vh:vh + side, vw:vw + side] = self.signs(c, 1, 1)
        x_new = x_best + window * (2 * eps)
        return torch.min(torch.max(x_new, x - eps), x + eps).clamp(0.0, 1.0)

    def propose_l2(self, i: int, x: Tensor, x_best: Tensor, eps: Tensor) -> Tensor:
        n, c, h, w = x.shape
        delta = x_best - x
        side = self.side(i, c, h, w)
        vh, vw = self.position(h - side), self.position(w - side)
        vh2, vw2 = self.position(h - side), self.position(w - side)
        old = delta[:, :, vh:vh + side, vw:vw + side]
        mass_1 = (old ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
        mask = torch.zeros_like(x)
        mask[:, :, vh:vh + side, vw:vw + side] = 1.0
        mask[:, :, vh2:vh2 + side, vw2:vw2 + side] = 1.0
        norm_image = (delta ** 2).flatten(1).sum(-1).sqrt().view(-1, 1, 1, 1)
        mass_windows = ((delta * mask) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
        new = torch.ones(n, c, side, side, device=x.device) * (
            self.pattern(side).view(1, 1, side, side) * self.signs(n, c, 1, 1))
        new = new + old / (1e-12 + mass_1)
        room = torch.max((eps * torch.ones_like(new)) ** 2 - norm_image ** 2, torch.zeros_like(new))
        new = new / (1e-12 + (new ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * (room / c + mass_windows ** 2).sqrt()
        delta = delta.clone()
        delta[:, :, vh2:vh2 + side, vw2:vw2 + side] = 0.0
        delta[:, :, vh:vh + side, vw:vw + side] = new
        return torch.clamp(x + _unit_l2(delta) * eps, 0.0, 1.0)


def _unit_l2(delta: Tensor) -> Tensor:
    """``delta`` scaled to unit L2 norm per example."""
    norms = (delta ** 2).view(delta.shape[0], -1).sum(-1).sqrt()
    return delta / (norms.view(-1, 1, 1, 1) + 1e-12)


__all__ = ["Square", "SQUARE_LOSSES", "SQUARE_NORMS", "SCHEDULE", "l2_window"]

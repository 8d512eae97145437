"""Auto-PGD (APGD): the step-size-free attack of AutoAttack.

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (ICML). APGD is PGD with momentum
whose step size starts at 2ε and is halved, per example, at fixed checkpoints
whenever the loss stopped improving; after a halving the example restarts from
the best point found so far. APGD-CE (cross-entropy) and the targeted APGD-T
(targeted DLR loss over the 9 most likely wrong classes) together give the
AutoAttack-grade robust accuracy of the evaluation protocol.

Units: images are pixels in [0, 1] (N, C, H, W); ``eps`` is in pixel units
(8/255 for the standard CIFAR-10 L∞ threat model), a number or one value per
example.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._validation import Radius, check_bool, check_choice, check_positive_int, per_example
from .base import Attack, BNMode, clip_to_ball_and_box, input_gradient
from .losses import cross_entropy, dlr_loss, targeted_dlr_loss

APGD_LOSSES = ("ce", "dlr")
APGD_NORMS = ("linf", "l2")
MOMENTUM = 0.75
"""Weight of the new gradient step in APGD's momentum update (the paper's α)."""


def apgd_checkpoints(steps: int) -> List[int]:
    """The iterations after which APGD may halve an example's step size.

    ``w_j = ceil(p_j * steps)`` for ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, keeping the distinct
    values in ``[1, steps]`` (for 100 steps: 22, 41, 57, 70, 80, 87, 93, 99).
    Pure Python: the step loop compares its integer counter with this list
    and never reads a tensor to decide when to check.
    """
    steps = check_positive_int(steps, "steps")
    points: List[int] = []
    prev, cur = 0.0, 0.22
    while cur <= 1.0:
        w = max(1, math.ceil(cur * steps - 1e-9))
        if not points or w > points[-1]:
            points.append(w)
        prev, cur = cur, cur + max(cur - prev - 0.03, 0.06)
    return points


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020) in the L∞ or L2 norm.

    Untargeted (``targeted=False``), it ascends ``loss`` (``"ce"`` for
    APGD-CE, ``"dlr"`` for APGD-DLR) on the true labels ``y``. Targeted
    (``targeted=True``, APGD-T), ``y`` are still the *true* labels: the attack
    runs once per target class among the ``n_target_classes`` most likely
    wrong classes of the clean input (by logits, most likely first), ascending
    the targeted DLR loss (``loss="dlr"``) or the negated cross-entropy to the
    target (``loss="ce"``); each example keeps the result of the first run that
    misclassifies it. An attack succeeds on an example when the model's
    prediction differs from ``y``.

    One run: a uniform random start in the ε-ball (L∞) or on its sphere (L2);
    step size ``η = 2ε`` per example; ``steps`` iterations of

    ``z = P(x_k + η·sign(∇))`` (L2: ``η·∇/||∇||₂``),
    ``x_{k+1} = P(x_k + 0.75·(z − x_k) + 0.25·(x_k − x_{k−1}))``

    (plain ``x_1 = z`` for the first step) where ``P`` projects onto the ε-ball
    and [0, 1]. At the checkpoints of :func:`apgd_checkpoints` an example's
    step is halved, and it restarts from its best point, when the loss
    increased in fewer than a fraction ``rho`` of the steps since the last
    checkpoint, or when its step was not halved at the last checkpoint and its
    best loss has not improved since. Per example the attack keeps the point
    of highest loss and, once found, a misclassified point; it returns the
    misclassified point where there is one and the highest-loss point
    otherwise. With ``restarts > 1`` (per target when targeted) further runs
    from new random starts attack the examples not yet misclassified.

    The step loop makes no host synchronisation: the halving is a per-example
    ``torch.where`` and the checkpoint schedule is Python integers. Between
    runs, the examples still to attack are selected with one synchronisation
    per run. Input gradients come from :func:`torch.autograd.grad` only.

    Cost per run: ``steps + 1`` forward passes and ``steps`` input-gradient
    backward passes; targeted, ``n_target_classes`` runs (plus one clean
    forward pass to rank the classes) per restart.

    Args:
        eps: threat-model radius in pixel units (float or one value per
            example): at most 1 in L∞, at most √(C·H·W) in L2 (see :class:`Attack`).
        steps: iterations per run (100 in AutoAttack).
        loss: ``"ce"`` or ``"dlr"`` (DLR needs at least 3 classes, targeted
            DLR at least 4).
        targeted: run APGD-T over the most likely wrong classes (see above).
        n_target_classes: target classes tried per example when targeted
            (9 in AutoAttack; at most ``num_classes - 1`` are used).
        norm: ``"linf"`` or ``"l2"``.
        restarts: random restarts per run (>= 1).
        rho: the fraction of loss increases below which the step is halved
            (0.75 in the paper), in (0, 1].
        bn_mode: model mode while attacking: ``"eval"``, ``"train"`` or ``"keep"``.
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(
        self,
        eps: Radius,
        *,
        steps: int = 100,
        loss: str = "ce",
        targeted: bool = False,
        n_target_classes: int = 9,
        norm: str = "linf",
        restarts: int = 1,
        rho: float = 0.75,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(eps, norm=norm, bn_mode=bn_mode, check_inputs=check_inputs)
        self.steps = check_positive_int(steps, "steps")
        self.loss = check_choice(loss, "loss", APGD_LOSSES)
        self.targeted = check_bool(targeted, "targeted")
        self.n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
        self.norm = check_choice(norm, "norm", APGD_NORMS)
        self.restarts = check_positive_int(restarts, "restarts")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
        self.rho = float(rho)
        self._checkpoints = apgd_checkpoints(self.steps)

    # ----------------------------------------------------------------- runs
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        if n == 0:
            return x
        eps = per_example(self.eps, x)
        targets: List[Optional[Tensor]] = [None]
        if self.targeted:
            with torch.no_grad():
                logits = model(x).float()
            k = min(self.n_target_classes, logits.shape[1] - 1)
            if k < 1:
                raise ValueError(f"targeted APGD needs at least 2 classes, the model returns {logits.shape[1]}")
            ranked = logits.scatter(1, y.long().unsqueeze(1), float("-inf")).argsort(dim=1, descending=True)
            targets = [ranked[:, j] for j in range(k)]

        delta = torch.zeros_like(x, dtype=torch.float32)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        best = torch.full((n,), float("-inf"), device=x.device)
        for target in targets:
            for _ in range(self.restarts):
                active = (~found).nonzero().squeeze(1)  # one synchronisation per run
                if active.numel() == 0:
                    return (x + delta).to(x.dtype)
                t = None if target is None else target[active]
                d, f, obj = self._run(model, x[active], y[active], eps[active], t)
                keep = f | (obj > best[active])
                delta[active] = torch.where(keep.view(-1, 1, 1, 1), d, delta[active])
                best[active] = torch.where(keep, obj, best[active])
                found[active] = f
        return (x + delta).to(x.dtype)

    def _objective(self, logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """Per-example float32 loss to ascend (see the class docstring)."""
        if target is None:
            return dlr_loss(logits, y) if self.loss == "dlr" else cross_entropy(logits, y)
        if self.loss == "dlr":
            return targeted_dlr_loss(logits, y, target)
        return -cross_entropy(logits, target)

    def _forward(self, model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, target: Optional[Tensor],
                 need_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Loss, misclassification flags and (when ``need_grad``) the input
        gradient at ``x + delta``."""
        if not need_grad:
            with torch.no_grad():
                logits = model(x + delta)
                return self._objective(logits, y, target), logits.argmax(1) != y, None
        delta = delta.detach().requires_grad_(True)
        logits = model(x + delta)
        obj = self._objective(logits, y, target)
        grad = input_gradient(obj.sum(), delta)
        return obj.detach(), logits.detach().argmax(1) != y, grad

    def _ascent(self, delta: Tensor, grad: Tensor, step: Tensor) -> Tensor:
        if self.norm == "linf":
            return torch.addcmul(delta, step, grad.sign())
        g_norm = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return torch.addcmul(delta, step / g_norm, grad)

    def _start(self, x: Tensor, eps: Tensor) -> Tensor:
        if self.norm == "linf":
            delta = (torch.rand_like(x, dtype=torch.float32) * 2 - 1) * eps
        else:
            direction = torch.randn_like(x, dtype=torch.float32)
            delta = direction * (eps / direction.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))
        return clip_to_ball_and_box(x, delta, eps, self.norm)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor,
             target: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """One APGD run. Returns the chosen perturbation (float32, like ``x``),
        whether each example was misclassified at some iterate, and the best
        loss reached."""
        n = x.shape[0]
        delta = self._start(x, eps)
        loss, wrong, grad = self._forward(model, x, delta, y, target, need_grad=True)
        assert grad is not None
        losses = torch.empty(self.steps + 1, n, device=x.device)  # loss at every iterate, for the checks
        losses[0] = loss
        found, delta_found = wrong, delta
        best_loss, delta_best, grad_best = loss, delta, grad
        step = 2.0 * eps
        checked_at = 0
        halved_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_at_check = best_loss
        delta_prev = delta
        for k in range(1, self.steps + 1):
            z = clip_to_ball_and_box(x, self._ascent(delta, grad, step), eps, self.norm)
            if k == 1:
                new = z
            else:
                new = delta + MOMENTUM * (z - delta) + (1.0 - MOMENTUM) * (delta - delta_prev)
                new = clip_to_ball_and_box(x, new, eps, self.norm)
            delta_prev, delta = delta, new
            loss, wrong, g = self._forward(model, x, delta, y, target, need_grad=k < self.steps)
            losses[k] = loss
            found = found | wrong
            delta_found = torch.where(wrong.view(-1, 1, 1, 1), delta, delta_found)
            improved = loss > best_loss
            best_loss = torch.where(improved, loss, best_loss)
            delta_best = torch.where(improved.view(-1, 1, 1, 1), delta, delta_best)
            if g is None:
                break
            grad = g
            grad_best = torch.where(improved.view(-1, 1, 1, 1), grad, grad_best)
            if k in self._checkpoints:
                span = k - checked_at
                increases = (losses[checked_at + 1:k + 1] > losses[checked_at:k]).sum(dim=0)
                halve = (increases < self.rho * span) | (~halved_last & (best_loss <= best_at_check))
                step = torch.where(halve.view(-1, 1, 1, 1), step / 2, step)
                delta = torch.where(halve.view(-1, 1, 1, 1), delta_best, delta)
                grad = torch.where(halve.view(-1, 1, 1, 1), grad_best, grad)
                halved_last, best_at_check, checked_at = halve, best_loss, k
        chosen = torch.where(found.view(-1, 1, 1, 1), delta_found, delta_best)
        return chosen, found, best_loss


__all__ = ["APGD", "apgd_checkpoints"]

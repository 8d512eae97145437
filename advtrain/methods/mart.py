"""MART (Wang, Zou, Yi, Bailey, Ma & Gu, ICLR 2020, "Improving Adversarial
Robustness Requires Revisiting Misclassified Examples"): a boosted
cross-entropy on the adversarial input plus λ times the KL divergence from
the clean prediction, weighted per example by how badly the clean input is
classified.

Images are pixels in [0, 1]; ε and step sizes are in pixel units.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, check_radius, check_weight
from ..attacks.pgd import PGD
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, TrainingLoss
from ..training.trainer import Trainer
from ..utils.precision import at_least_float32
from .trades import EPS, kl_from_clean, perturb_from_normal_start


def log_one_minus_top_other(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example ``log(1 − max_{k≠y} p_k)`` of ``logits`` (N, K), K >= 2,
    against labels ``y`` (N,); shape (N,), in at least float32.

    Computed as the log-sum-exp of the log-probabilities of every class but
    the top other one, so it stays finite where that class's probability
    rounds to 1."""
    log_p = F.log_softmax(at_least_float32(logits), dim=1)
    idx = y.long().unsqueeze(1)
    top_other = log_p.scatter(1, idx, float("-inf")).argmax(dim=1, keepdim=True)
    return torch.logsumexp(log_p.scatter(1, top_other, float("-inf")), dim=1)


class MARTPolicy(PerturbationPolicy):
    """MART: the attack is L∞ PGD on the cross-entropy, ``steps`` steps of
    ``step_size`` from ``x + 0.001·N(0, 1)`` with BatchNorm in eval mode; the
    training loss, with both forwards in train mode, is

    ``CE(f(x_adv), y) − mean_i log(1 − max_{k≠y} p_k(x_adv_i))
    + λ · mean_i KL(p(x_i) ‖ p(x_adv_i)) · (1 − p_y(x_i))``

    with gradients through the clean prediction in the KL term and in the
    weights ``1 − p_y(x_i)`` alike. The cross-entropy takes the Trainer's
    label smoothing; the other terms do not. The logits the training
    accuracy counts are the adversarial ones.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        steps: attack steps (>= 1).
        step_size: per-step size, pixel units; ``None`` means ``eps / 4``
            (2/255 at ε = 8/255).
        lam: weight λ of the weighted KL term (>= 0).
    """

    def __init__(self, eps: float = EPS, *, steps: int = 10, step_size: Optional[float] = None,
                 lam: float = 5.0) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.steps = check_positive_int(steps, "steps")
        self.step_size = self.eps / 4 if step_size is None else float(check_radius(step_size, "step_size"))
        self.lam = check_weight(lam, "lam")
        self.attack = PGD(self.eps, steps=self.steps, step_size=self.step_size, random_start=False,
                          loss="ce", bn_mode="eval", check_inputs=False)

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        return Perturbation(x=perturb_from_normal_start(self.attack, model, batch.x, batch.y))

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        clean = context.forward(batch.x)
        adv = context.forward(perturbation.x)
        y = batch.y
        boosted = context.cross_entropy(adv, y) - log_one_minus_top_other(adv, y).mean()
        clean_log_probs = F.log_softmax(at_least_float32(clean), dim=1)
        # 1 − p_y from log p_y without cancellation where p_y is near 1
        weight = -torch.expm1(clean_log_probs.gather(1, y.long().unsqueeze(1)).squeeze(1))
        robust = (kl_from_clean(adv, clean_log_probs) * weight).mean()
        return TrainingLoss(boosted + self.lam * robust, adv)

    def __repr__(self) -> str:
        return f"MARTPolicy(eps={self.eps!r}, steps={self.steps}, step_size={self.step_size!r}, lam={self.lam!r})"


class MARTTrainer(Trainer):
    """MART adversarial training (Wang et al. 2020) with λ = 5 (the reference
    code's value for ResNet-18; its WideResNet-34-10 script uses 6) and
    PGD-10 on the cross-entropy (2/255 steps at ε = 8/255, BatchNorm in eval
    mode, see :class:`MARTPolicy`). Defaults: 30 epochs, cyclic LR to 0.2,
    momentum 0.9, weight decay 5e-4, batch 128, black crop padding — the
    schedule of the other presets, so that costs and robustness compare
    directly; the reference's ResNet-18 schedule (120 epochs, LR 0.01
    decayed ×0.1 from the 75th, 90th and 100th, weight decay 3.5e-3) is
    ``schedule=Piecewise([74, 89, 99], [0.01, 1e-3, 1e-4, 1e-5]), lr=0.01,
    epochs=120, weight_decay=3.5e-3`` (boundaries are 0-based epochs)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, steps: int = 10, step_size: Optional[float] = None,
                 lam: float = 5.0, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, MARTPolicy(eps, steps=steps, step_size=step_size, lam=lam),
                         **{**defaults, **kwargs})


__all__ = ["MARTPolicy", "MARTTrainer", "log_one_minus_top_other"]

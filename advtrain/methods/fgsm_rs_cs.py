"""FGSM-RS-CS (Zhao et al., ICCV 2023, "Fast Adversarial Training with Smooth
Convergence"): FGSM from a uniform random start, trained with the paper's
convergence-stability (CS) term on the loss at the random start.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_eps
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, TrainingLoss
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32
from ._prior import (DECAY_EPOCHS, EPS, PRIOR_FASTAT_CONFIG, ConvergenceStabilityPolicy, check_factor,
                     input_gradient, soft_cross_entropy, soft_targets)

#: The FastAT Benchmark's protocol keys of ``configs/cifar10/fgsm_rs_cs.yaml``.
FASTAT_CONFIG: Dict[str, Any] = dict(PRIOR_FASTAT_CONFIG)


class FGSMRSCSPolicy(ConvergenceStabilityPolicy):
    """FGSM-RS-CS as the FastAT Benchmark's ``fgsm_rs_cs`` runs it.

    Per batch ``(x, y)``, BatchNorm in train mode for every pass:

    1. The random start ``x_r = clip₀¹(x + η)``, ``η ~ U(−ε, ε)`` per pixel
       (torch's global generator).
    2. ``g = ∇ₓ CE(f(x_r), y)`` — an attack pass: input gradient only, hard
       labels, no label smoothing.
    3. Train on ``x_adv = clip₀¹(x_r + ε·sign(g))`` — one step of ε from the
       start, not projected back onto the ε-ball around ``x``
       (``‖x_adv − x‖∞ ≤ 2ε``) — with the loss ``CE_s(f(x_adv), t) + CS(ℓ)``:
       ``t`` the soft targets (``factor`` on the true class,
       ``(1 − factor)/(K − 1)`` on the others), ``CE_s`` the cross-entropy
       with the Trainer's label smoothing on top, ``ℓ = CE_s(f(x_r), t)`` the
       loss at the random start (the reference's "benign" loss) and ``CS``
       the convergence-stability term
       (:class:`~advtrain.methods._prior.ConvergenceStabilityPolicy`).

    Args:
        eps: L∞ radius of the random start and FGSM step, pixel units (at
            most 1: 8/255, not 8).
        factor: the soft targets' probability on the true class, in (0, 1].
        gamma: γ, the largest threshold on the clean loss's change (>= 0).
        ratio: the smallest threshold is ``γ / ratio`` (> 0).
        stride: epochs around each of ``decay_epochs`` without the CS term (>= 0).
        w2: weight of the CS term (>= 0).
        decay_epochs: increasing 0-based epochs where the learning rate
            changes (the reference's ``decay_arr``).
    """

    def __init__(self, eps: float = EPS, *, factor: float = 0.6, gamma: float = 0.03, ratio: float = 1.0,
                 stride: int = 1, w2: float = 1.0, decay_epochs: Sequence[int] = DECAY_EPOCHS) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.factor = check_factor(factor)
        self._init_cs(gamma, ratio, stride, w2, decay_epochs)

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        x, y = batch.x, batch.y
        start = torch.clamp(x + torch.empty_like(x).uniform_(-self.eps, self.eps), 0.0, 1.0)
        leaf = start.detach().requires_grad_(True)
        with model_mode(model, "train"), torch.enable_grad():
            grad = input_gradient(F.cross_entropy(at_least_float32(model(leaf)), y), leaf)
        x_adv = torch.clamp(start + self.eps * torch.sign(grad), 0.0, 1.0)
        return Perturbation(x=x_adv.detach(), extras={"start": start.detach()})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        logits = context.forward(perturbation.x)
        targets = soft_targets(batch.y, self.factor, logits.shape[1])
        start_loss = soft_cross_entropy(context.forward(perturbation.extras["start"]), targets, context.label_smoothing)
        perturbation.extras["clean_loss"] = start_loss.detach()
        loss = soft_cross_entropy(logits, targets, context.label_smoothing) + self.cs_term(start_loss)
        return TrainingLoss(loss, logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        self.record_clean_loss(perturbation.extras["clean_loss"], len(batch))

    def __repr__(self) -> str:
        return f"FGSMRSCSPolicy(eps={self.eps!r}, factor={self.factor!r}, gamma={self.gamma!r}, w2={self.w2!r})"


class FGSMRSCSTrainer(Trainer):
    """FGSM-RS-CS training (Zhao et al. 2023) with the FastAT Benchmark's
    CIFAR-10 knobs (``configs/cifar10/fgsm_rs_cs.yaml``): uniform start in the
    ε-ball, one FGSM step of ε, soft targets with 0.6 on the true class, CS
    threshold γ = 0.03 (ratio 1), weight 1, off within 1 epoch of epochs 0,
    100, 105, 110 (see :class:`FGSMRSCSPolicy`). The schedule is the other
    presets': 30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4,
    batch 128, black crop padding; the benchmark's protocol keys are in
    :data:`FASTAT_CONFIG`. Costs 3 forwards, 1 input backward and a backward
    through two forwards per batch (8F against FGSM's 5F)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, factor: float = 0.6, gamma: float = 0.03,
                 ratio: float = 1.0, stride: int = 1, w2: float = 1.0, decay_epochs: Sequence[int] = DECAY_EPOCHS,
                 **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMRSCSPolicy(eps, factor=factor, gamma=gamma, ratio=ratio, stride=stride, w2=w2,
                                decay_epochs=decay_epochs)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMRSCSPolicy", "FGSMRSCSTrainer"]

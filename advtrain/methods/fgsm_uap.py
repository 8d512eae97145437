"""FGSM-UAP (the AAAI 2024 paper the FastAT Benchmark cites,
ojs.aaai.org/index.php/AAAI/article/view/30147): FGSM training started from
one learned universal adversarial perturbation (UAP) shared by every example,
updated after each step from the gradients at the batch's starts with
momentum, plus a mean-squared consistency term between the logits at the
FGSM point and at its start.

Images are pixels in [0, 1]; ε and the UAP's radius are in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..policies.base import PolicyContext
from ..training.trainer import Trainer
from ._universal import EPS, FASTAT_CONFIG, LAM, MOMENTUM_DECAY, UAP_EPS, UniversalFGSMPolicy


class FGSMUAPPolicy(UniversalFGSMPolicy):
    """FGSM-UAP: every example starts its FGSM step from the one UAP ``u``,
    projected onto its ε-ball and [0, 1]; after each step
    ``m ← mean_i Ĝᵢ + μ·m`` (``Ĝ = G / ‖G‖₁`` over the whole batch, ``G`` the
    start's gradient) and ``u ← clip_{±uap_eps}(u + uap_eps·sign(m))``. The loss is
    ``CE(f(x_adv), y) + λ·MSE(f(x_adv), f(x₀))``. See
    :class:`~advtrain.methods._universal.UniversalFGSMPolicy` for the step
    and the arguments (``eps``, ``uap_eps``, ``lam``, ``momentum_decay``)."""

    def bank_size(self, model: nn.Module, context: PolicyContext) -> int:
        return 1

    def select(self, model: nn.Module, batch: Batch) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        groups = torch.zeros(batch.x.shape[0], dtype=torch.long, device=batch.x.device)
        return batch.x, groups, {}


class FGSMUAPTrainer(Trainer):
    """FGSM-UAP training with the FastAT Benchmark's CIFAR-10 settings of the
    method (UAP radius and step 10/255, λ = 10, momentum decay 0.3, FGSM
    step ε = 8/255) and the schedule of advtrain's other presets: 30 epochs,
    cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch 128, black crop
    padding. The benchmark's protocol (100 epochs, one-cycle LR to 0.1,
    label smoothing 0.4, weight averaging τ = 0.9995) is in
    :data:`FASTAT_CONFIG`."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, uap_eps: float = UAP_EPS, lam: float = LAM,
                 momentum_decay: float = MOMENTUM_DECAY, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMUAPPolicy(eps, uap_eps=uap_eps, lam=lam, momentum_decay=momentum_decay)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMUAPPolicy", "FGSMUAPTrainer"]

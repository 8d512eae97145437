"""NuAT (Sriramanan, Addepalli, Baburaj & Babu, NeurIPS 2021, "Towards
Efficient and Effective Adversarial Training"): single-step adversarial
training regularized by the nuclear norm of the batch's output difference,
``‖f(x) − f(x̃)‖_*`` over the (N, K) matrix of logits, whose weight λ grows
linearly over the run; the attack starts from Bernoulli noise and takes the
nuclear-norm term into its loss on every second step.

Images are pixels in [0, 1]; ε, step sizes and the start's magnitude are in
pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .._validation import check_weight
from ..training.trainer import Trainer
from ..utils.modes import BNMode
from ..utils.precision import at_least_float32
from .gat import EPS, GuidedSingleStepPolicy

#: The FastAT Benchmark's protocol settings in ``configs/cifar10/nu_at.yaml``
#: (100 epochs), for the protocol preset; ``weight_average`` is the EMA decay τ.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def nuclear_gap(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """NuAT's regularizer before its weight λ: ``‖f(x) − f(x̃)‖_* / N``, the
    nuclear norm (sum of singular values) of the (N, K) difference of the
    clean and the perturbed logits of one batch, divided by the batch size
    N; a 0-dim tensor in at least float32, differentiable in both (the
    singular values' gradient is stable, also where they repeat)."""
    if clean_logits.dim() != 2 or clean_logits.shape != adv_logits.shape:
        raise ValueError(f"nuclear_gap compares two (N, K) outputs of one batch: got shapes "
                         f"{tuple(clean_logits.shape)} and {tuple(adv_logits.shape)}")
    diff = at_least_float32(clean_logits) - at_least_float32(adv_logits)
    return torch.linalg.matrix_norm(diff, ord="nuc") / diff.shape[0]


class NuATPolicy(GuidedSingleStepPolicy):
    """NuAT: :class:`~advtrain.methods.gat.GuidedSingleStepPolicy` with the
    regularizer ``‖f(x) − f(x̃)‖_* / N`` on the logits (:func:`nuclear_gap`),
    every pass in BatchNorm train mode, and ``λ_e = lam_max · e / epochs``
    in 0-based epoch ``e``: 0 in the first epoch, rising by
    ``lam_max / epochs`` per epoch.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        lam_max: where the linear λ schedule would reach at the end of the
            run (>= 0).
        step_size: the attack's signed step η, pixel units; ``None`` means ``eps``.
        init_radius: α, the Bernoulli start's magnitude, pixel units;
            ``None`` means ``eps / 2``.
    """

    attack_bn_mode: BNMode = "train"

    def __init__(self, eps: float = EPS, *, lam_max: float = 4.0, step_size: Optional[float] = None,
                 init_radius: Optional[float] = None) -> None:
        super().__init__(eps, step_size=step_size, init_radius=init_radius)
        self.lam_max = check_weight(lam_max, "lam_max")

    def lam_at(self, epoch: int) -> float:
        return self.lam_max * epoch / self._run_epochs()

    def regularizer(self, clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
        return nuclear_gap(clean_logits, adv_logits)

    def __repr__(self) -> str:
        return (f"NuATPolicy(eps={self.eps!r}, lam_max={self.lam_max!r}, step_size={self.step_size!r}, "
                f"init_radius={self.init_radius!r})")


class NuATTrainer(Trainer):
    """NuAT training (Sriramanan et al. 2021) with the FastAT Benchmark's
    settings (``configs/cifar10/nu_at.yaml``): λ rising linearly from 0
    towards ``lam_max`` = 4 over the run, a Bernoulli start of ±ε/2 and one
    signed step of ε at ε = 8/255 (see :class:`NuATPolicy`). The schedule is
    the other presets' (30 epochs, cyclic LR to 0.2, momentum 0.9, weight
    decay 5e-4, batch 128, black crop padding); the benchmark's protocol
    (100 epochs, OneCycle to 0.1, label smoothing 0.4, weight averaging
    τ = 0.9995) is :data:`FASTAT_CONFIG`."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam_max: float = 4.0,
                 step_size: Optional[float] = None, init_radius: Optional[float] = None, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = NuATPolicy(eps, lam_max=lam_max, step_size=step_size, init_radius=init_radius)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "NuATPolicy", "NuATTrainer", "nuclear_gap"]

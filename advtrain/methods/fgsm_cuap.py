"""FGSM-CUAP (the AAAI 2024 paper the FastAT Benchmark cites,
ojs.aaai.org/index.php/AAAI/article/view/30147), the class-wise variant of
FGSM-UAP: one learned universal adversarial perturbation per class, each
example's FGSM step starting from its label's, each updated from the
gradients at its class's examples' starts.

Images are pixels in [0, 1]; ε and the UAPs' radius are in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import Tensor, nn

from ..data.batch import Batch
from ..policies.base import PolicyContext
from ..training.trainer import Trainer
from ._universal import EPS, FASTAT_CONFIG, LAM, MOMENTUM_DECAY, UAP_EPS, UniversalFGSMPolicy, num_outputs


class FGSMCUAPPolicy(UniversalFGSMPolicy):
    """FGSM-CUAP: a bank of one UAP per class (as many as the model has
    logits, found at setup); example ``i`` starts from ``u_{yᵢ}``. After each
    step, for every class ``c`` in the batch,
    ``m_c ← mean_{i: yᵢ = c} Ĝᵢ + μ·m_c`` (``Ĝ = G / ‖G‖₁`` over the whole
    batch, ``G`` the start's gradient) and ``u_c ← clip_{±uap_eps}(u_c + uap_eps·sign(m_c))``; classes
    absent from the batch keep their UAP and momentum. See
    :class:`~advtrain.methods._universal.UniversalFGSMPolicy` for the step
    and the arguments (``eps``, ``uap_eps``, ``lam``, ``momentum_decay``)."""

    def bank_size(self, model: nn.Module, context: PolicyContext) -> int:
        return num_outputs(model, context)

    def select(self, model: nn.Module, batch: Batch) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        return batch.x, batch.y.long(), {}


class FGSMCUAPTrainer(Trainer):
    """FGSM-CUAP training with the FastAT Benchmark's CIFAR-10 settings of the
    method (class-wise UAPs of radius and step 10/255, λ = 10, momentum decay
    0.3, FGSM step ε = 8/255) and the schedule of advtrain's other presets:
    30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch 128,
    black crop padding. The benchmark's protocol (100 epochs, one-cycle LR
    to 0.1, label smoothing 0.4, weight averaging τ = 0.9995) is in
    :data:`FASTAT_CONFIG`."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, uap_eps: float = UAP_EPS, lam: float = LAM,
                 momentum_decay: float = MOMENTUM_DECAY, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMCUAPPolicy(eps, uap_eps=uap_eps, lam=lam, momentum_decay=momentum_decay)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMCUAPPolicy", "FGSMCUAPTrainer"]

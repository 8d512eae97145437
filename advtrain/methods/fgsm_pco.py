"""FGSM-PCO (arXiv:2407.12443, as the FastAT Benchmark's ``fgsm_pco`` runs
it): FGSM from the example's previous-epoch
perturbation, trained on a mix of the prior point and an extrapolated FGSM
point weighted by how unsure the model is of the example, with a regularizer
that balances the FGSM prediction's distance to the two.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_eps, check_radius, check_weight
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..policies.store import resolve_store_dtype
from ..training.trainer import Trainer
from ._prior import (EPS, PRIOR_FASTAT_CONFIG, EpochPrior, check_factor, input_gradient, signed_step,
                     soft_cross_entropy, soft_targets)

#: The FastAT Benchmark's protocol keys of ``configs/cifar10/fgsm_pco.yaml``.
FASTAT_CONFIG: Dict[str, Any] = dict(PRIOR_FASTAT_CONFIG)


class FGSMPCOPolicy(PerturbationPolicy):
    """FGSM-PCO as the FastAT Benchmark's ``fgsm_pco`` runs it.

    Per batch ``(x, y)`` with soft targets ``t`` (probability ``factor`` on
    the true class, ``(1 − factor)/(K − 1)`` on the others), every pass in
    train mode through the training forward:

    1. Read the prior ``δ`` (padded coordinates, exact under crop and flip);
       ``x₀ = clip₀¹(x + δ)``; ``o₀ = f(x₀)``; the confidence weight
       ``c = clip₀¹(1 − softmax(o₀)_y)`` per example (it keeps its graph);
       ``g = ∇ₓ CE(o₀, t)`` (input gradient only, no label smoothing).
    2. ``δ' = Π(δ + ε·sign(g))`` (projection onto the ε-ball and
       ``[−x, 1 − x]``), stored as the example's next prior after the step.
    3. The training input ``x_new = c·x₀ + (1 − c)·(x + β·δ')`` — β = 1.5
       extrapolates past the ε-ball (and may leave [0, 1]), more so for
       examples the model is sure of.
    4. ``o = f(x_new)``, ``o' = f(x + δ')``; loss
       ``CE_s(o, t) + λ·|mean((o' − o₀)²) − mean((o' − o)²)|``, ``CE_s`` the
       cross-entropy with the Trainer's label smoothing on top of ``t``;
       gradients flow through all three passes and through ``c``.

    The prior is drawn as ``±ε`` of random sign per value at setup and never
    redrawn. :meth:`perturb` returns ``x₀``; the training input needs the
    first training pass and is made in :meth:`loss`.

    Args:
        eps: L∞ radius and FGSM step, pixel units (at most 1: 8/255, not 8).
        lam: weight λ of the output-consistency regularizer (>= 0).
        beta: extrapolation β of the FGSM perturbation in the training input (>= 0).
        factor: the soft targets' probability on the true class, in (0, 1].
        store_dtype: "float32", "bfloat16" or "float16", the prior store's dtype.
    """

    def __init__(self, eps: float = EPS, *, lam: float = 10.0, beta: float = 1.5, factor: float = 0.6,
                 store_dtype: Union[str, torch.dtype] = "float32") -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.lam = check_weight(lam, "lam")
        self.beta = float(check_radius(beta, "beta"))
        self.factor = check_factor(factor)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.prior: Optional[EpochPrior] = None

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.prior = EpochPrior(context, self.eps, self.store_dtype, momentum=False)
        self.prior.reset()

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.prior is not None, "FGSMPCOPolicy.setup must run before perturb"
        delta, _ = self.prior.read(batch)
        start = torch.clamp(batch.x + delta, 0.0, 1.0).to(batch.x.dtype)
        return Perturbation(x=start, extras={"delta": delta})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        x, y, delta = batch.x, batch.y, perturbation.extras["delta"]
        start = perturbation.x.detach().requires_grad_(True)
        prior_logits = context.forward(start)
        targets = soft_targets(y, self.factor, prior_logits.shape[1])
        true_prob = F.softmax(prior_logits.float(), dim=1).gather(1, y[:, None])
        confidence = torch.clamp(1.0 - true_prob, 0.0, 1.0).view(-1, 1, 1, 1)
        grad = input_gradient(soft_cross_entropy(prior_logits, targets), start, retain_graph=True)
        step = signed_step(delta, grad, x, self.eps)
        perturbation.extras["next_delta"] = step
        mixed = confidence * start.detach() + (1.0 - confidence) * (x + self.beta * step)
        logits = context.forward(mixed.to(x.dtype))
        fgsm_logits = context.forward((x + step).to(x.dtype)).float()
        consistency = (F.mse_loss(fgsm_logits, prior_logits.float()) - F.mse_loss(fgsm_logits, logits.float())).abs()
        ce = soft_cross_entropy(logits, targets, context.label_smoothing)
        return TrainingLoss(ce + self.lam * consistency, logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        assert self.prior is not None
        self.prior.write(batch, perturbation.extras["next_delta"], None)

    def state_dict(self) -> Dict[str, Any]:
        assert self.prior is not None, "FGSMPCOPolicy.setup must run before state_dict"
        return {"prior": self.prior.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.prior is not None, "FGSMPCOPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        self.prior.load_state_dict(state["prior"])

    def __repr__(self) -> str:
        return f"FGSMPCOPolicy(eps={self.eps!r}, lam={self.lam!r}, beta={self.beta!r}, factor={self.factor!r})"


class FGSMPCOTrainer(Trainer):
    """FGSM-PCO training with the FastAT Benchmark's CIFAR-10 knobs
    (``configs/cifar10/fgsm_pco.yaml``): λ = 10, β = 1.5, soft targets with
    0.6 on the true class, a random ``±ε`` prior drawn once (see
    :class:`FGSMPCOPolicy`). The schedule is the other presets': 30 epochs,
    cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch 128, black crop
    padding; the benchmark's protocol keys are in :data:`FASTAT_CONFIG`.
    Costs 3 forwards, 1 input backward and a backward through the three
    forwards per batch (10F against FGSM's 5F)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: float = 10.0, beta: float = 1.5,
                 factor: float = 0.6, store_dtype: Union[str, torch.dtype] = "float32", **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMPCOPolicy(eps, lam=lam, beta=beta, factor=factor, store_dtype=store_dtype)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMPCOPolicy", "FGSMPCOTrainer"]

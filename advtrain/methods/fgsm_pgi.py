"""FGSM-PGI (Jia et al., ECCV 2022, "Prior-Guided Adversarial Initialization
for Fast Adversarial Training"): FGSM from a
per-example prior — the perturbation the example got in the previous epoch,
moved along its gradient momentum — plus a regularizer that keeps the
prediction on the adversarial example close to the one at the prior.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_eps, check_positive_int, check_radius, check_weight
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..policies.store import resolve_store_dtype
from ..training.trainer import Trainer
from ..utils.precision import at_least_float32
from ._prior import EPS, PRIOR_FASTAT_CONFIG, EpochPrior, input_gradient, momentum_update, resets_before, signed_step

#: The FastAT Benchmark's protocol keys of ``configs/cifar10/fgsm_pgi.yaml``.
FASTAT_CONFIG: Dict[str, Any] = dict(PRIOR_FASTAT_CONFIG)


class FGSMPGIPolicy(PerturbationPolicy):
    """FGSM-PGI as the FastAT Benchmark runs it: the paper's momentum
    epoch-wise prior (its FGSM-MEP) with its prior-guided regularizer.

    Per batch ``(x, y)``, every pass in train mode through the training forward
    (the first pass is also part of the loss):

    1. Read the example's prior ``δ`` and momentum ``m`` from the per-example
       store (padded coordinates: the same pixels under this epoch's crop and
       flip); ``x₀ = clip₀¹(x + δ)``.
    2. ``o₀ = f(x₀)``, ``g = ∇ₓ CE(o₀, y)`` (input gradient only, the graph of
       ``o₀`` kept for the loss).
    3. ``x_adv = x + Π(δ + ε·sign(g))``, ``Π`` the projection onto the ε-ball
       and ``[−x, 1 − x]``; ``o = f(x_adv)``.
    4. Loss ``CE(o, y) + λ · mean((o − o₀)²)`` (the squared difference
       averaged over examples and classes, gradients through both passes);
       the cross-entropy takes the Trainer's label smoothing, the attack's
       ``g`` does not.
    5. After the model step store the next epoch's prior
       ``Π(δ + ε·sign(m'))`` and momentum ``m' = g / ‖g‖₁ + μ·m`` (the L1 norm
       over the whole batch).

    The prior is drawn as ``±ε`` of random sign per value (momentum 0) at
    setup and redrawn before every ``reset_every``-th epoch (0-based 40, 80
    for 40). :meth:`perturb` returns ``x₀``, the prior's starting point: the
    training input ``x_adv`` needs the first training pass and is made in
    :meth:`loss`.

    Args:
        eps: L∞ radius and FGSM step, pixel units (at most 1: 8/255, not 8).
        lam: weight λ of the output-distance regularizer (>= 0).
        momentum_decay: μ, the weight of the stored momentum (>= 0).
        reset_every: redraw the prior every this many epochs (0: only at setup).
        store_dtype: "float32", "bfloat16" or "float16", the dtype of the
            prior and momentum stores (16 bits halve their memory).
    """

    def __init__(self, eps: float = EPS, *, lam: float = 10.0, momentum_decay: float = 0.3, reset_every: int = 40,
                 store_dtype: Union[str, torch.dtype] = "float32") -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.lam = check_weight(lam, "lam")
        self.momentum_decay = float(check_radius(momentum_decay, "momentum_decay"))
        self.reset_every = check_positive_int(reset_every, "reset_every", minimum=0)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.prior: Optional[EpochPrior] = None

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.prior = EpochPrior(context, self.eps, self.store_dtype, momentum=True)
        self.prior.reset()

    def start_epoch(self, epoch: int) -> None:
        assert self.prior is not None, "FGSMPGIPolicy.setup must run before training"
        if resets_before(epoch, self.reset_every):
            self.prior.reset()

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.prior is not None, "FGSMPGIPolicy.setup must run before perturb"
        delta, momentum = self.prior.read(batch)
        start = torch.clamp(batch.x + delta, 0.0, 1.0).to(batch.x.dtype)
        return Perturbation(x=start, extras={"delta": delta, "momentum": momentum})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        x, y, delta = batch.x, batch.y, perturbation.extras["delta"]
        start = perturbation.x.detach().requires_grad_(True)
        prior_logits = context.forward(start)
        grad = input_gradient(F.cross_entropy(at_least_float32(prior_logits), y), start, retain_graph=True)
        momentum = momentum_update(grad, perturbation.extras["momentum"], self.momentum_decay)
        perturbation.extras["next_delta"] = signed_step(delta, momentum, x, self.eps)
        perturbation.extras["next_momentum"] = momentum
        logits = context.forward((x + signed_step(delta, grad, x, self.eps)).to(x.dtype))
        distance = F.mse_loss(logits.float(), prior_logits.float())
        return TrainingLoss(context.cross_entropy(logits, y) + self.lam * distance, logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        assert self.prior is not None
        self.prior.write(batch, perturbation.extras["next_delta"], perturbation.extras["next_momentum"])

    def state_dict(self) -> Dict[str, Any]:
        assert self.prior is not None, "FGSMPGIPolicy.setup must run before state_dict"
        return {"prior": self.prior.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.prior is not None, "FGSMPGIPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        self.prior.load_state_dict(state["prior"])

    def __repr__(self) -> str:
        return (f"FGSMPGIPolicy(eps={self.eps!r}, lam={self.lam!r}, momentum_decay={self.momentum_decay!r}, "
                f"reset_every={self.reset_every})")


class FGSMPGITrainer(Trainer):
    """FGSM-PGI training (Jia et al. 2022) with the FastAT Benchmark's CIFAR-10
    knobs (``configs/cifar10/fgsm_pgi.yaml``): λ = 10, momentum decay 0.3,
    prior redrawn every 40 epochs (see :class:`FGSMPGIPolicy`). The schedule
    is the other presets': 30 epochs, cyclic LR to 0.2, momentum 0.9, weight
    decay 5e-4, batch 128, black crop padding; the benchmark's protocol keys
    are in :data:`FASTAT_CONFIG`. Costs 2 forwards, 1 input backward and a
    backward through both forwards per batch (7F against FGSM's 5F)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: float = 10.0, momentum_decay: float = 0.3,
                 reset_every: int = 40, store_dtype: Union[str, torch.dtype] = "float32", **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMPGIPolicy(eps, lam=lam, momentum_decay=momentum_decay, reset_every=reset_every,
                               store_dtype=store_dtype)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMPGIPolicy", "FGSMPGITrainer"]

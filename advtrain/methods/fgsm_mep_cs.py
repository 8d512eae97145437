"""FGSM-MEP-CS (Zhao et al., ICCV 2023, "Fast Adversarial Training with Smooth
Convergence"): FGSM from the momentum
epoch-wise prior of FGSM-PGI (FGSM-MEP), trained with the paper's
convergence-stability (CS) term on the clean loss instead of PGI's regularizer.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._validation import check_eps, check_positive_int, check_radius
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PolicyContext, TrainingLoss
from ..policies.store import resolve_store_dtype
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ._prior import (DECAY_EPOCHS, EPS, PRIOR_FASTAT_CONFIG, ConvergenceStabilityPolicy, EpochPrior, check_factor,
                     input_gradient, momentum_update, resets_before, signed_step, soft_cross_entropy, soft_targets)

#: The FastAT Benchmark's protocol keys of ``configs/cifar10/fgsm_mep_cs.yaml``.
FASTAT_CONFIG: Dict[str, Any] = dict(PRIOR_FASTAT_CONFIG)


class FGSMMEPCSPolicy(ConvergenceStabilityPolicy):
    """FGSM-MEP-CS as the FastAT Benchmark's ``fgsm_mep_cs`` runs it.

    Per batch ``(x, y)`` with soft targets ``t`` (``factor`` on the true
    class, ``(1 − factor)/(K − 1)`` on the others), BatchNorm in train mode for
    every pass:

    1. Read the prior ``δ`` and momentum ``m`` (padded coordinates, exact
       under crop and flip); ``g = ∇ₓ CE(f(clip₀¹(x + δ)), t)`` — an attack
       pass: input gradient only, no label smoothing.
    2. ``m' = g / ‖g‖₁ + μ·m`` (L1 norm over the batch); the next epoch's
       prior ``Π(δ + ε·sign(m'))`` and ``m'`` are stored after the step
       (``Π``: projection onto the ε-ball and ``[−x, 1 − x]``).
    3. Train on ``x_adv = x + Π(δ + ε·sign(g))`` with the loss
       ``CE_s(f(x_adv), t) + CS(ℓ)``, ``ℓ = CE_s(f(x), t)`` the clean loss and
       ``CS`` the convergence-stability term
       (:class:`~advtrain.methods._prior.ConvergenceStabilityPolicy`);
       ``CE_s`` takes the Trainer's label smoothing on top of ``t``.

    The prior is drawn as ``±ε`` of random sign per value (momentum 0) at
    setup and redrawn before every ``reset_every``-th epoch.

    Args:
        eps: L∞ radius and FGSM step, pixel units (at most 1: 8/255, not 8).
        momentum_decay: μ, the weight of the stored momentum (>= 0).
        reset_every: redraw the prior every this many epochs (0: only at setup).
        factor: the soft targets' probability on the true class, in (0, 1].
        gamma: γ, the largest threshold on the clean loss's change (>= 0).
        ratio: the smallest threshold is ``γ / ratio`` (> 0).
        stride: epochs around each of ``decay_epochs`` without the CS term (>= 0).
        w2: weight of the CS term (>= 0).
        decay_epochs: increasing 0-based epochs where the learning rate
            changes (the reference's ``decay_arr``).
        store_dtype: "float32", "bfloat16" or "float16", the stores' dtype.
    """

    def __init__(self, eps: float = EPS, *, momentum_decay: float = 0.3, reset_every: int = 40, factor: float = 0.6,
                 gamma: float = 0.03, ratio: float = 1.0, stride: int = 1, w2: float = 1.0,
                 decay_epochs: Sequence[int] = DECAY_EPOCHS, store_dtype: Union[str, torch.dtype] = "float32") -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.momentum_decay = float(check_radius(momentum_decay, "momentum_decay"))
        self.reset_every = check_positive_int(reset_every, "reset_every", minimum=0)
        self.factor = check_factor(factor)
        self._init_cs(gamma, ratio, stride, w2, decay_epochs)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.prior: Optional[EpochPrior] = None

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        super().setup(model, context)
        self.prior = EpochPrior(context, self.eps, self.store_dtype, momentum=True)
        self.prior.reset()

    def start_epoch(self, epoch: int) -> None:
        assert self.prior is not None, "FGSMMEPCSPolicy.setup must run before training"
        super().start_epoch(epoch)
        if resets_before(epoch, self.reset_every):
            self.prior.reset()

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.prior is not None, "FGSMMEPCSPolicy.setup must run before perturb"
        x, y = batch.x, batch.y
        delta, momentum = self.prior.read(batch)
        start = torch.clamp(x + delta, 0.0, 1.0).to(x.dtype).requires_grad_(True)
        with model_mode(model, "train"), torch.enable_grad():
            logits = model(start)
            grad = input_gradient(soft_cross_entropy(logits, soft_targets(y, self.factor, logits.shape[1])), start)
        assert momentum is not None
        momentum = momentum_update(grad, momentum, self.momentum_decay)
        x_adv = (x + signed_step(delta, grad, x, self.eps)).to(x.dtype)
        return Perturbation(x=x_adv.detach(), extras={"next_delta": signed_step(delta, momentum, x, self.eps),
                                                      "next_momentum": momentum})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        logits = context.forward(perturbation.x)
        targets = soft_targets(batch.y, self.factor, logits.shape[1])
        clean_loss = soft_cross_entropy(context.forward(batch.x), targets, context.label_smoothing)
        perturbation.extras["clean_loss"] = clean_loss.detach()
        loss = soft_cross_entropy(logits, targets, context.label_smoothing) + self.cs_term(clean_loss)
        return TrainingLoss(loss, logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        assert self.prior is not None
        self.prior.write(batch, perturbation.extras["next_delta"], perturbation.extras["next_momentum"])
        self.record_clean_loss(perturbation.extras["clean_loss"], len(batch))

    def state_dict(self) -> Dict[str, Any]:
        assert self.prior is not None, "FGSMMEPCSPolicy.setup must run before state_dict"
        return {**super().state_dict(), "prior": self.prior.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.prior is not None, "FGSMMEPCSPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        self.prior.load_state_dict(state["prior"])

    def __repr__(self) -> str:
        return (f"FGSMMEPCSPolicy(eps={self.eps!r}, momentum_decay={self.momentum_decay!r}, "
                f"reset_every={self.reset_every}, factor={self.factor!r}, gamma={self.gamma!r}, w2={self.w2!r})")


class FGSMMEPCSTrainer(Trainer):
    """FGSM-MEP-CS training (Zhao et al. 2023) with the FastAT Benchmark's
    CIFAR-10 knobs (``configs/cifar10/fgsm_mep_cs.yaml``): momentum decay
    0.3, prior redrawn every 40 epochs, soft targets with 0.6 on the true
    class, CS threshold γ = 0.03 (ratio 1), weight 1, off within 1 epoch of
    epochs 0, 100, 105, 110 (see :class:`FGSMMEPCSPolicy`). The schedule is
    the other presets': 30 epochs, cyclic LR to 0.2, momentum 0.9, weight
    decay 5e-4, batch 128, black crop padding; the benchmark's protocol keys
    are in :data:`FASTAT_CONFIG`. Costs 3 forwards, 1 input backward and a
    backward through two forwards per batch (8F against FGSM's 5F)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, momentum_decay: float = 0.3, reset_every: int = 40,
                 factor: float = 0.6, gamma: float = 0.03, ratio: float = 1.0, stride: int = 1, w2: float = 1.0,
                 decay_epochs: Sequence[int] = DECAY_EPOCHS, store_dtype: Union[str, torch.dtype] = "float32",
                 **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMMEPCSPolicy(eps, momentum_decay=momentum_decay, reset_every=reset_every, factor=factor,
                                 gamma=gamma, ratio=ratio, stride=stride, w2=w2, decay_epochs=decay_epochs,
                                 store_dtype=store_dtype)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FGSMMEPCSPolicy", "FGSMMEPCSTrainer"]

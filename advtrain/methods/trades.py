"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019, "Theoretically
Principled Trade-off between Robustness and Accuracy"): train on the clean
cross-entropy plus β times the KL divergence between the clean and the
adversarial prediction, the adversarial input found by ascending that KL.

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
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: Standard deviation (pixel units) of the Gaussian start of the TRADES and
#: MART reference attacks: ``x + 0.001·N(0, 1)``.
START_STD = 0.001


def kl_from_clean(logits: Tensor, clean_log_probs: Tensor) -> Tensor:
    """Per-example ``KL(p(x) ‖ p(x_adv)) = Σ_k p_k(x) (log p_k(x) − log p_k(x_adv))``
    of the adversarial ``logits`` (N, K) from the clean prediction, given as
    its log-probabilities ``clean_log_probs`` (N, K); shape (N,), in at least
    float32. Gradients flow into both arguments.

    It is also the TRADES attack's loss: its second argument, where an
    attack loss takes labels, is the clean log-probabilities."""
    if clean_log_probs.shape != logits.shape:
        raise ValueError("kl_from_clean compares two predictions: clean_log_probs must have the logits' shape "
                         f"{tuple(logits.shape)} (the clean log-probabilities, not labels), "
                         f"got {tuple(clean_log_probs.shape)}")
    log_q = F.log_softmax(at_least_float32(logits), dim=1)
    return F.kl_div(log_q, clean_log_probs.to(log_q.dtype), reduction="none", log_target=True).sum(dim=1)


def perturb_from_normal_start(attack: PGD, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """``attack``'s steps from ``x + 0.001·N(0, 1)`` (projected onto the
    ε-ball and [0, 1] first), with the model in the attack's ``bn_mode``;
    ``target`` is what the attack's loss compares the logits with. Returns
    the adversarial images, detached, in ``x``'s dtype."""
    delta = START_STD * torch.randn_like(x, dtype=torch.float32)
    with model_mode(model, attack.bn_mode), torch.enable_grad():
        delta = attack.iterate(model, x, target, delta)
    return (x + delta).detach().to(x.dtype)


class TRADESPolicy(PerturbationPolicy):
    """TRADES: the attack ascends ``KL(p(x) ‖ p(x_adv))`` with ``steps`` L∞
    steps of ``step_size`` from ``x + 0.001·N(0, 1)``, BatchNorm in eval mode
    and the clean prediction computed once per batch in eval mode; the
    training loss is ``CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x_adv_i))``
    with both forwards in train mode and gradients through both
    predictions. The cross-entropy takes the Trainer's label smoothing; the
    KL term is not smoothed. The logits the training accuracy counts are the
    adversarial ones.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        steps: attack steps (>= 1).
        step_size: per-step size, pixel units; ``None`` means ``eps / 4``
            (2/255 at ε = 8/255).
        beta: weight β of the KL term (>= 0; 0 is clean training with extra
            passes).
    """

    def __init__(self, eps: float = EPS, *, steps: int = 10, step_size: Optional[float] = None,
                 beta: float = 6.0) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.steps = check_positive_int(steps, "steps")
        self.step_size = self.eps / 4 if step_size is None else float(check_radius(step_size, "step_size"))
        self.beta = check_weight(beta, "beta")
        self.attack = PGD(self.eps, steps=self.steps, step_size=self.step_size, random_start=False,
                          loss=kl_from_clean, bn_mode="eval", check_inputs=False)

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        with model_mode(model, "eval"), torch.no_grad():
            clean_log_probs = F.log_softmax(at_least_float32(model(batch.x)), dim=1)
        return Perturbation(x=perturb_from_normal_start(self.attack, model, batch.x, clean_log_probs))

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        clean = context.forward(batch.x)
        adv = context.forward(perturbation.x)
        robust = kl_from_clean(adv, F.log_softmax(at_least_float32(clean), dim=1)).mean()
        return TrainingLoss(context.cross_entropy(clean, batch.y) + self.beta * robust, adv)

    def __repr__(self) -> str:
        return f"TRADESPolicy(eps={self.eps!r}, steps={self.steps}, step_size={self.step_size!r}, beta={self.beta!r})"


class TRADESTrainer(Trainer):
    """TRADES adversarial training (Zhang et al. 2019) with β = 6 and the
    10-step KL attack (2/255 steps at ε = 8/255, BatchNorm in eval mode, see
    :class:`TRADESPolicy`). Defaults: 30 epochs, cyclic LR to 0.2, momentum
    0.9, weight decay 5e-4, batch 128, black crop padding — the schedule of
    the other presets, so that costs and robustness compare directly; the
    reference code's schedule (76 epochs, LR 0.1 decayed ×0.1 from the
    75th, weight decay 2e-4) is ``schedule=Piecewise([74], [0.1, 0.01]),
    lr=0.1, epochs=76, weight_decay=2e-4`` (boundaries are 0-based epochs)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, steps: int = 10, step_size: Optional[float] = None,
                 beta: float = 6.0, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, TRADESPolicy(eps, steps=steps, step_size=step_size, beta=beta),
                         **{**defaults, **kwargs})


__all__ = ["START_STD", "TRADESPolicy", "TRADESTrainer", "kl_from_clean", "perturb_from_normal_start"]

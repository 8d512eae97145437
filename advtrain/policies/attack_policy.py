"""Classic adversarial training: perturb each batch with a stateless Attack."""
from __future__ import annotations

from torch import nn

from ..attacks.base import Attack
from ..data.batch import Batch
from .base import Perturbation, PerturbationPolicy


class AttackPolicy(PerturbationPolicy):
    """Train on ``attack(model, x, y)`` for every batch (FGSM-AT, Fast-AT,
    PGD-AT, N-FGSM). The attack's own ``bn_mode`` decides the BatchNorm mode
    used while attacking. Input values are validated once by the loader, so the
    attack runs without per-batch value checks (no host synchronisation)."""

    def __init__(self, attack: Attack) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be an advtrain Attack, got {type(attack).__name__}")
        self.attack = attack

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        return Perturbation(x=self.attack.run(model, batch.x, batch.y, check=False))

    def __repr__(self) -> str:
        return f"AttackPolicy({self.attack!r})"


class CleanPolicy(PerturbationPolicy):
    """Standard (non-adversarial) training: the batch as it is."""

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        return Perturbation(x=batch.x)

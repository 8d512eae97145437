"""Stateful training-time perturbation policies."""
from .apart import APARTPolicy
from .atta import ATTAPolicy
from .attack_policy import AttackPolicy, CleanPolicy
from .base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from .store import PerExampleStore

__all__ = ["APARTPolicy", "ATTAPolicy", "AttackPolicy", "CleanPolicy", "LossContext", "Perturbation",
           "PerturbationPolicy", "PolicyContext", "PerExampleStore", "TrainingLoss"]

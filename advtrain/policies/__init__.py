"""Stateful training-time perturbation policies."""
from .apart import APARTPolicy
from .atta import ATTAPolicy
from .attack_policy import AttackPolicy, CleanPolicy
from .base import Perturbation, PerturbationPolicy, PolicyContext
from .store import PerExampleStore

__all__ = ["APARTPolicy", "ATTAPolicy", "AttackPolicy", "CleanPolicy", "Perturbation", "PerturbationPolicy",
           "PolicyContext", "PerExampleStore"]

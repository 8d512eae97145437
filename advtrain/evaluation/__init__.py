"""Evaluation: clean and robust accuracy, the protocol's attack suites with a
per-example worst case, the threat-model check of every adversarial batch,
and gradient-masking sanity checks."""
from .accuracy import accuracy, correct_predictions
from .evaluator import SUITES, EvaluationReport, attack_suite, evaluate
from .inputs import image_label_tensors
from .masking import CHEAP_CHECKS, CHECKS, GradientMaskingWarning, MaskingWarning, check_gradient_masking
from .threat_model import ThreatModelError

__all__ = [
    "accuracy",
    "correct_predictions",
    "evaluate",
    "attack_suite",
    "EvaluationReport",
    "SUITES",
    "check_gradient_masking",
    "MaskingWarning",
    "GradientMaskingWarning",
    "CHECKS",
    "CHEAP_CHECKS",
    "ThreatModelError",
    "image_label_tensors",
]

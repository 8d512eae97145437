"""Evaluation: clean and robust accuracy, the protocol's attack suites with a
per-example worst case, and gradient-masking sanity checks."""
from .accuracy import accuracy, correct_predictions
from .evaluator import SUITES, EvaluationReport, attack_suite, evaluate
from .masking import GradientMaskingWarning, MaskingWarning, check_gradient_masking

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
]

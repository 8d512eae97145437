"""Diagnostics of the robustness drop: a training monitor that flags
catastrophic overfitting and keeps the best-robust model, the
perturbation-strength study of APART (are a method's perturbations still
stronger than noise?), and plots (matplotlib, optional)."""
from .monitor import RobustnessDropMonitor, RobustnessDropWarning, detect_robustness_drop
from .plots import plot_accuracy_curves, plot_perturbation_grid, plot_strength_curves
from .strength import PerturbationRecorder, PerturbationStrengthStudy, StrengthResult

__all__ = [
    "RobustnessDropMonitor",
    "RobustnessDropWarning",
    "detect_robustness_drop",
    "PerturbationRecorder",
    "PerturbationStrengthStudy",
    "StrengthResult",
    "plot_accuracy_curves",
    "plot_strength_curves",
    "plot_perturbation_grid",
]

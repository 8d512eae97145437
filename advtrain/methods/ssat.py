"""SSAT (Kim, Lee & Lee, AAAI 2021, "Understanding Catastrophic Overfitting in
Single-step Adversarial Training"): FGSM-RS, but each example trains on the
smallest multiple ``k/c`` of its FGSM-RS perturbation that the model already
misclassifies, so that training never uses a perturbation larger than needed.

Images are pixels in [0, 1]; ε and the step size are in pixel units.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, check_radius
from ..attacks.base import Attack, BNMode, input_gradient
from ..policies.attack_policy import AttackPolicy
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: The protocol keys of the FastAT Benchmark's ``configs/cifar10/ssat.yaml``
#: that differ between its methods, for the FastAT protocol preset: label
#: smoothing, the weight-average decay τ (``None``: no weight averaging) and
#: the peak learning rate (its runs are 100 epochs).
FASTAT_CONFIG = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def first_misclassified(wrong: Tensor) -> Tensor:
    """For a (c − 1, N) boolean table ``wrong[k − 1, i]`` (is example ``i``
    misclassified at checkpoint ``k/c``), the 0-based index of each example's
    first misclassified checkpoint, and ``c − 1`` (the full perturbation)
    where none is; shape (N,), int64, no host synchronisation."""
    if wrong.dim() != 2:
        raise ValueError(f"wrong must be a (checkpoints, N) table, got shape {tuple(wrong.shape)}")
    last = torch.full((wrong.shape[1],), wrong.shape[0], dtype=torch.long, device=wrong.device)
    if wrong.shape[0] == 0:
        return last
    # argmax returns the first maximal index, so the first True of each column.
    first = wrong.to(torch.uint8).argmax(dim=0)
    return torch.where(wrong.any(dim=0), first, last)


class SSATAttack(Attack):
    """SSAT's training perturbation for a batch ``(x, y)``:

    1. ``x₀ = clip₀¹(x + η)``, ``η ~ U(−ε, ε)`` per pixel; ``g = ∇ CE(f(x₀), y)``
       with the model in ``bn_mode`` (train, as the reference runs it);
    2. the FGSM-RS point ``x_fgsm = clip₀¹(x + clip_ε(x₀ + α·sign(g) − x))``
       and its perturbation ``δ = x_fgsm − x``;
    3. examples that the model misclassifies at ``x₀`` (the logits of step 1)
       train on the clean ``x``;
    4. the others on the first checkpoint ``x + k·(δ/c)``, ``k = 1 … c − 1``,
       that the model in eval mode (without gradients) misclassifies, and on
       ``x_fgsm`` (``k = c``) when it classifies them all correctly.

    Every checkpoint of every example is evaluated, in forwards of at most
    ``inference_batch`` images: a fixed amount of work and no host
    synchronisation, with the same result as evaluating only the examples
    still correct (eval mode treats each example on its own).

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        step_size: α, pixel units; ``None`` means ``1.25 * eps`` (10/255 at
            8/255, the benchmark's ``alpha``).
        divisions: c, the perturbation is checked at ``k/c`` of its length
            (>= 1; 1 checks the full perturbation only).
        inference_batch: the most checkpoint images per eval forward (memory only).
        bn_mode: model mode of the gradient pass (step 1); the checkpoints
            are always evaluated in eval mode.
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(self, eps: float = EPS, *, step_size: Optional[float] = None, divisions: int = 3,
                 inference_batch: int = 1024, bn_mode: BNMode = "train", check_inputs: bool = True) -> None:
        eps = float(check_eps(eps, "linf", "eps"))
        super().__init__(eps, norm="linf", bn_mode=bn_mode, check_inputs=check_inputs)
        self.step_size = 1.25 * eps if step_size is None else float(check_radius(step_size, "step_size"))
        self.divisions = check_positive_int(divisions, "divisions")
        self.inference_batch = check_positive_int(inference_batch, "inference_batch")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        eps = float(self.eps)
        start = torch.clamp(x + torch.empty_like(x, dtype=torch.float32).uniform_(-eps, eps), 0.0, 1.0)
        start.requires_grad_(True)
        logits = model(start)
        grad = input_gradient(F.cross_entropy(at_least_float32(logits), y, reduction="sum"), start)
        stepped = start.detach() + self.step_size * grad.sign()
        full = torch.clamp(x + torch.clamp(stepped - x, -eps, eps), 0.0, 1.0)
        pert = full - x
        start_wrong = logits.detach().argmax(dim=1) != y

        c = self.divisions
        # (c, N, C, H, W): the checkpoints k = 1 … c − 1, then the full perturbation.
        ks = torch.arange(1, c, device=x.device, dtype=pert.dtype).view(-1, 1, 1, 1, 1)
        points = torch.cat([torch.clamp(x + ks * (pert / c), 0.0, 1.0), full.unsqueeze(0)])
        if c > 1:
            flat = points[:-1].flatten(0, 1)
            with model_mode(model, "eval"), torch.no_grad():
                preds = torch.cat([model(chunk).argmax(dim=1) for chunk in flat.split(self.inference_batch)])
            chosen = first_misclassified(preds.view(c - 1, -1) != y)
        else:
            chosen = torch.zeros_like(y, dtype=torch.long)
        picked = points[chosen, torch.arange(x.shape[0], device=x.device)]
        return torch.where(start_wrong.view(-1, 1, 1, 1), x.float(), picked).to(x.dtype)


class SSATTrainer(Trainer):
    """SSAT training (Kim et al. 2021): :class:`SSATAttack` (α = 1.25ε =
    10/255 at 8/255, c = 3 divisions, gradient pass in train mode,
    checkpoints in eval mode) and the cross-entropy of its output with the
    Trainer's label smoothing. Method knobs from the FastAT Benchmark's
    ``configs/cifar10/ssat.yaml``; the schedule is that of the other
    presets: 30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4,
    batch 128, black crop padding. A step costs ``c + 1`` forwards, one input
    backward and one full backward (7F at c = 3)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, step_size: Optional[float] = None, divisions: int = 3,
                 inference_batch: int = 1024, **kwargs: Any) -> None:
        attack = SSATAttack(eps, step_size=step_size, divisions=divisions, inference_batch=inference_batch,
                            bn_mode="train", check_inputs=False)
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, AttackPolicy(attack), **{**defaults, **kwargs})


__all__ = ["EPS", "FASTAT_CONFIG", "SSATAttack", "SSATTrainer", "first_misclassified"]

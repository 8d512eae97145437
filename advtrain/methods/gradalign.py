"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020, "Understanding and
Improving Fast Adversarial Training"): FGSM training plus a regularizer that
keeps the input gradient at the clean image aligned with the input gradient
at a random point of the ε-ball, which prevents catastrophic overfitting.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_weight
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, TrainingLoss
from ..training.schedules import triangular
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: λ of the paper's CIFAR-10 runs by ε in 0..255 units (its run script, ε = 1..16).
LAMBDA_BY_EPS: Dict[int, float] = {
    1: 0.027, 2: 0.036, 3: 0.047, 4: 0.063, 5: 0.084, 6: 0.112, 7: 0.150, 8: 0.200,
    9: 0.267, 10: 0.356, 11: 0.474, 12: 0.632, 13: 0.843, 14: 1.124, 15: 1.500, 16: 2.000,
}

#: Where the preset's triangular learning rate peaks, as a fraction of the run
#: (epoch 12 of 30 in the paper's code).
PEAK_AT = 0.4


def default_lambda(eps: float) -> float:
    """The paper's regularization weight λ for an L∞ radius ``eps`` (pixel
    units): the value of its CIFAR-10 runs where ``255·eps`` is an integer
    from 1 to 16 (0.2 at 8/255), otherwise the log-linear rule those values
    were chosen by, ``λ = 0.02 · 10^(255·eps / 8)``."""
    level = 255.0 * eps
    nearest = round(level)
    if abs(level - nearest) < 1e-6 and nearest in LAMBDA_BY_EPS:
        return LAMBDA_BY_EPS[nearest]
    return 0.02 * 10.0 ** (level / 8.0)


def gradient_misalignment(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, reference: Tensor) -> Tensor:
    """GradAlign's regularizer before its weight λ: ``1 − mean_i cos(r_i, g_i)``.

    ``g = ∇ₓ CE(forward(x), y)`` is the input gradient at ``x`` (pixels in
    [0, 1], (N, C, H, W)), computed with ``create_graph=True``, so the result
    is differentiable in the weights behind ``forward`` (its backward is a
    double backward). ``reference`` is a fixed gradient of ``x``'s shape
    (used detached). The cosine is taken per example over all pixels;
    examples where either gradient is zero are left out of the mean, as in
    the paper's code, and with none left the result is the constant 1. A
    0-dim tensor in at least float32; no host synchronisation.
    """
    if reference.shape != x.shape:
        raise ValueError(f"reference must have the shape of x {tuple(x.shape)}, got {tuple(reference.shape)}")
    leaf = x.detach().requires_grad_(True)
    loss = F.cross_entropy(at_least_float32(forward(leaf)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    dtype = torch.promote_types(grad.dtype, torch.float32)
    g, r = grad.flatten(1).to(dtype), reference.detach().flatten(1).to(dtype)
    g_norm, r_norm = torch.linalg.vector_norm(g, dim=1), torch.linalg.vector_norm(r, dim=1)
    valid = (g_norm > 0) & (r_norm > 0)
    # Rows left out get a unit denominator so that neither value nor gradient is 0/0.
    cos = (g * r).sum(dim=1) / torch.where(valid, g_norm * r_norm, torch.ones_like(g_norm))
    cos = torch.where(valid, cos, torch.zeros_like(cos))
    return 1.0 - cos.sum() / valid.sum().clamp_min(1)


class GradAlignPolicy(PerturbationPolicy):
    """GradAlign: FGSM from the clean image plus the gradient-alignment
    regularizer.

    Per batch ``(x, y)``, BatchNorm in train mode for every pass, as in the
    paper's code:

    1. ``g₁ = ∇ₓ CE(f(x), y)`` (no weight gradients); ``x_adv = clip₀¹(x + ε·sign(g₁))``.
    2. ``x_η = clip₀¹(x + η)``, ``η ~ U(−ε, ε)`` per pixel from the global generator.
    3. Loss ``CE(f(x_adv), y) + λ·(1 − mean_i cos(g₁ᵢ, g₂ᵢ))`` with
       ``g₂ = ∇ₓ CE(f(x_η), y)`` taken with ``create_graph=True``
       (:func:`gradient_misalignment`); ``g₁`` is held fixed. The
       cross-entropy takes the Trainer's label smoothing, the gradients'
       cross-entropies do not.

    The loss needs a double backward, so the policy cannot run under
    ``torch.compile`` (``compilable = False``).

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8); also the FGSM step.
        lam: weight λ of the regularizer (>= 0); ``None`` takes the paper's
            value for ``eps`` (:func:`default_lambda`, 0.2 at 8/255).
    """

    compilable = False

    def __init__(self, eps: float = EPS, *, lam: Optional[float] = None) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.lam = default_lambda(self.eps) if lam is None else check_weight(lam, "lam")

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        x, y = batch.x, batch.y
        leaf = x.detach().requires_grad_(True)
        with model_mode(model, "train"), torch.enable_grad():
            loss = F.cross_entropy(at_least_float32(model(leaf)), y, reduction="sum")
            (clean_grad,) = torch.autograd.grad(loss, leaf)
        x_adv = torch.clamp(x + self.eps * clean_grad.sign(), 0.0, 1.0)
        noisy = torch.clamp(x + torch.empty_like(x).uniform_(-self.eps, self.eps), 0.0, 1.0)
        return Perturbation(x=x_adv.detach(), extras={"clean_grad": clean_grad.detach(), "noisy": noisy.detach()})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        logits = context.forward(perturbation.x)
        penalty = gradient_misalignment(context.forward, perturbation.extras["noisy"], batch.y,
                                        perturbation.extras["clean_grad"])
        return TrainingLoss(context.cross_entropy(logits, batch.y) + self.lam * penalty, logits)

    def __repr__(self) -> str:
        return f"GradAlignPolicy(eps={self.eps!r}, lam={self.lam!r})"


class GradAlignTrainer(Trainer):
    """GradAlign training (Andriushchenko & Flammarion 2020) with the paper's
    CIFAR-10 run: FGSM at ε (8/255) from the clean image, λ by ε
    (:func:`default_lambda`), 30 epochs, batch 128, SGD with momentum 0.9 and
    weight decay 5e-4, learning rate triangular 0 → 0.3 at 40 % of the run
    (epoch 12) → 0, stepped per iteration, crops padded with black. The
    triangle follows whatever ``lr`` and ``epochs`` are given; a
    ``schedule`` keyword replaces it. No ``compile=True`` (double backward).
    By the cost model a step costs 11F against a single-step method's 5F;
    measured on a CPU it took 2.4–3.7× as long (docs/methods/gradalign.md)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: Optional[float] = None, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.3, weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, GradAlignPolicy(eps, lam=lam), **{**defaults, **kwargs})
        if "schedule" not in kwargs:  # built from the validated lr and epochs
            self.lr_schedule = triangular(self.lr, self.epochs, peak_at=PEAK_AT)


__all__ = ["EPS", "LAMBDA_BY_EPS", "PEAK_AT", "GradAlignPolicy", "GradAlignTrainer", "default_lambda",
           "gradient_misalignment"]

"""Sanity checks for gradient masking.

A defence that *masks* gradients (quantized or otherwise non-differentiable
inputs, saturated softmax outputs, shattered or deceptive gradients) makes
gradient attacks fail without making the model robust, so its robust accuracy
is an overestimate. :func:`check_gradient_masking` runs the symptom checks of
Carlini et al. 2019 ("On Evaluating Adversarial Robustness") and Athalye et
al. 2018 ("Obfuscated Gradients Give a False Sense of Security") that need no
extra attack machinery:

1. a stronger attack (more steps, more restarts) must not leave a higher
   robust accuracy;
2. uniform random noise in the ε-ball must not fool examples that the
   gradient attacks could not;
3. few examples may have an all-zero or non-finite input gradient;
4. the model must return logits, not probabilities.

Each finding is returned as a :class:`MaskingWarning` and emitted with
:func:`warnings.warn` as a :class:`GradientMaskingWarning`. A clean bill is no
proof of robustness; a finding means the robust accuracy is not to be trusted.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, looks_like_probabilities
from ..attacks.base import model_mode
from ..attacks.pgd import PGD
from .evaluator import _as_image_label_tensors


class GradientMaskingWarning(UserWarning):
    """Emitted by :func:`check_gradient_masking` for each symptom found."""


@dataclass(frozen=True)
class MaskingWarning:
    """One symptom of gradient masking.

    ``check``: ``"more_steps"``, ``"more_restarts"``, ``"noise_beats_attack"``,
    ``"zero_gradients"`` or ``"probability_outputs"``. ``message``: what was
    measured and what it means. ``value`` and ``threshold``: the measured
    quantity and the limit it exceeded (fractions of the examples checked).
    """

    check: str
    message: str
    value: float
    threshold: float


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def check_gradient_masking(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 8 / 255,
    steps: Tuple[int, int] = (10, 50),
    restarts: int = 5,
    noise_samples: int = 10,
    tolerance: float = 0.02,
    zero_grad_threshold: float = 0.10,
    n_examples: Optional[int] = 200,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    warn: bool = True,
) -> List[MaskingWarning]:
    """Look for the symptoms of gradient masking on a sample of examples.

    The model runs in eval mode (its flags are restored). The attacks are L∞
    PGD with a random start and cross-entropy, step size 2.5·ε/steps (Madry et
    al.'s rule, so both step counts travel the same distance). The global RNG
    is left untouched: the random starts and noise come from a fork seeded
    with ``seed``.

    Checks (accuracies are fractions of the examples checked):

    * ``more_steps``: robust accuracy under PGD-``steps[1]`` exceeds that under
      PGD-``steps[0]`` by more than ``tolerance``;
    * ``more_restarts``: PGD-``steps[0]`` with ``restarts`` random restarts
      (keeping the highest-loss restart per example) exceeds one restart by
      more than ``tolerance``;
    * ``noise_beats_attack``: more than ``tolerance`` of the examples are
      misclassified under one of ``noise_samples`` uniform draws from the
      ε-ball but survive all the PGD runs above;
    * ``zero_gradients``: more than ``zero_grad_threshold`` of the examples
      have an all-zero or non-finite cross-entropy input gradient at the clean
      image;
    * ``probability_outputs``: every output row is non-negative and sums to 1
      (within 1e-3), i.e. the model returns probabilities, whose cross-entropy
      gradients vanish.

    Cost per example: ``steps[0] * (1 + restarts) + steps[1] + 1`` forward
    and input-backward passes and about ``noise_samples + restarts + 4``
    forward passes (111 and 19 with the defaults, on ``n_examples=200``
    images).

    Args:
        model: classifier taking pixels in [0, 1] and returning logits.
        images: uint8 0..255 or float pixels in [0, 1], (N, C, H, W).
        labels: int class indices, (N,).
        eps: L∞ radius, pixel units.
        steps: (weaker, stronger) PGD step counts.
        restarts: random restarts of the weaker PGD for the restart check (>= 2).
        noise_samples: uniform noise draws per example (>= 1).
        tolerance: allowed excess accuracy / noise share, a fraction.
        zero_grad_threshold: allowed share of zero or non-finite gradients.
        n_examples: check the first ``n_examples`` only (``None``: all).
        batch_size: examples per batch.
        device: where to run (default: the model's device).
        seed: seed of the random starts and noise.
        warn: also emit each finding with :func:`warnings.warn`.

    Returns:
        The findings (empty when no symptom was found).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    eps = float(check_eps(eps, "linf", "eps"))
    if len(steps) != 2:
        raise ValueError(f"steps must be a pair (weaker, stronger), got {steps!r}")
    weak_steps, strong_steps = (check_positive_int(s, "steps") for s in steps)
    if strong_steps <= weak_steps:
        raise ValueError(f"steps must be (weaker, stronger) with stronger > weaker, got {steps!r}")
    restarts = check_positive_int(restarts, "restarts", minimum=2)
    noise_samples = check_positive_int(noise_samples, "noise_samples")
    tolerance = _check_fraction(tolerance, "tolerance")
    zero_grad_threshold = _check_fraction(zero_grad_threshold, "zero_grad_threshold")
    batch_size = check_positive_int(batch_size, "batch_size")
    images, labels = _as_image_label_tensors((images, labels))
    if n_examples is not None:
        check_positive_int(n_examples, "n_examples")
        images, labels = images[:n_examples], labels[:n_examples]
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    def batches() -> Sequence[Tuple[Tensor, Tensor]]:
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            out.append((x.float().div_(255) if x.dtype == torch.uint8 else x.float(),
                        labels[start:start + batch_size].to(device)))
        return out

    data = batches()
    findings: List[MaskingWarning] = []
    forked = [device] if device.type == "cuda" else []
    with model_mode(model, "eval"), torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        outputs = torch.cat([_no_grad_forward(model, x) for x, _ in data]).float()
        if outputs.dim() != 2:
            raise ValueError(f"model must return (N, classes) outputs, got shape {tuple(outputs.shape)}")
        if bool(looks_like_probabilities(outputs)):
            findings.append(MaskingWarning(
                "probability_outputs",
                "the model's outputs look like probabilities, not logits: every row is non-negative and sums "
                "to 1. The cross-entropy of a softmax output saturates, so input gradients vanish and "
                "gradient attacks stall (gradient masking). Return logits (drop the final softmax) for "
                "training and evaluation.", 1.0, 1.0))

        dead = torch.cat([_dead_gradients(model, x, y) for x, y in data]).float().mean().item()
        if dead > zero_grad_threshold:
            findings.append(MaskingWarning(
                "zero_gradients",
                f"{dead:.1%} of the examples have an all-zero or non-finite cross-entropy input gradient "
                f"(threshold {zero_grad_threshold:.0%}); gradient attacks cannot move them, so their robust "
                "accuracy is not evidence of robustness. Common causes: non-differentiable input processing "
                "(quantization, rounding, JPEG), a saturated softmax or float overflow, detached operations. "
                "Evaluate with BPDA or gradient-free attacks.", dead, zero_grad_threshold))

        clean = (outputs.argmax(1) == torch.cat([y for _, y in data])).cpu()
        weak = PGD(eps, steps=weak_steps, random_start=True)
        strong = PGD(eps, steps=strong_steps, random_start=True)
        restarted = PGD(eps, steps=weak_steps, random_start=True, restarts=restarts)
        robust_weak = clean & _robust(model, data, weak.run)
        robust_strong = clean & _robust(model, data, strong.run)
        robust_restarts = clean & _robust(model, data, restarted.run)
        acc_weak, acc_strong = _mean(robust_weak), _mean(robust_strong)
        acc_restarts = _mean(robust_restarts)
        if acc_strong - acc_weak > tolerance:
            findings.append(MaskingWarning(
                "more_steps",
                f"PGD-{strong_steps} leaves a higher robust accuracy ({acc_strong:.1%}) than PGD-{weak_steps} "
                f"({acc_weak:.1%}), by more than the tolerance of {tolerance:.1%}. A stronger attack must not do "
                "worse: the gradient does not lead to the adversarial examples (obfuscated, shattered or "
                "deceptive gradients).", acc_strong - acc_weak, tolerance))
        if acc_restarts - acc_weak > tolerance:
            findings.append(MaskingWarning(
                "more_restarts",
                f"PGD-{weak_steps} with {restarts} restarts leaves a higher robust accuracy ({acc_restarts:.1%}) "
                f"than with one ({acc_weak:.1%}), by more than the tolerance of {tolerance:.1%}: the restart "
                "with the highest loss is not the one that fools the model, so the loss the attack ascends does "
                "not track misclassification (gradient masking).", acc_restarts - acc_weak, tolerance))

        noise_fooled = torch.zeros_like(clean)
        for _ in range(noise_samples):
            noise_fooled |= ~_robust(model, data, _uniform_noise(eps))
        beaten = clean & noise_fooled & robust_weak & robust_strong & robust_restarts
        share = _mean(beaten)
        if share > tolerance:
            findings.append(MaskingWarning(
                "noise_beats_attack",
                f"uniform random noise in the eps-ball misclassifies {share:.1%} of the examples that every PGD "
                f"attack left correct ({noise_samples} draws per example; tolerance {tolerance:.1%}). A gradient "
                "attack should always beat random search: its gradients point away from the adversarial "
                "examples (gradient masking).", share, tolerance))

    if warn:
        for finding in findings:
            warnings.warn(f"possible gradient masking ({finding.check}): {finding.message}",
                          GradientMaskingWarning, stacklevel=2)
    return findings


def _no_grad_forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (_no_grad_forward(model, x).argmax(1) == y).cpu()


def _dead_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per example: is the cross-entropy input gradient all zero or non-finite?"""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
    flat = grad.flatten(1)
    return (~torch.isfinite(flat).all(dim=1) | (flat == 0).all(dim=1)).cpu()


def _uniform_noise(eps: float) -> Callable[..., Tensor]:
    def perturb(model: nn.Module, x: Tensor, y: Tensor, *, check: bool = True) -> Tensor:
        return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp_(0.0, 1.0)
    return perturb


def _robust(model: nn.Module, data: Sequence[Tuple[Tensor, Tensor]], attack: Callable[..., Tensor]) -> Tensor:
    """Per example: still classified correctly after ``attack``?"""
    return torch.cat([_correct(model, attack(model, x, y, check=False), y) for x, y in data])


def _mean(flags: Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0


__all__ = ["check_gradient_masking", "MaskingWarning", "GradientMaskingWarning"]

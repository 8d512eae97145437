"""Sanity checks for gradient masking.

A defence that *masks* gradients (quantized or otherwise non-differentiable
inputs, saturated softmax outputs, shattered or deceptive gradients) makes
gradient attacks fail without making the model robust, so its robust accuracy
is an overestimate. :func:`check_gradient_masking` runs the symptom checks of
Carlini et al. 2019 ("On Evaluating Adversarial Robustness"), Athalye et
al. 2018 ("Obfuscated Gradients Give a False Sense of Security") and
AutoAttack (Croce & Hein 2020) that need no extra attack machinery:

1. a stronger attack (more steps, more restarts) must not leave a higher
   robust accuracy;
2. uniform random noise in the ε-ball must not fool examples that the
   gradient attacks could not;
3. few examples may have an all-zero or non-finite input gradient;
4. the model must return logits, not probabilities;
5. the model must be deterministic in eval mode: a randomized model needs
   attacks with expectation over transformation (EOT).

Checks 3 to 5 cost a few forward passes and one backward pass per example
(:data:`CHEAP_CHECKS`); :func:`advtrain.evaluation.evaluate` runs them by
default for the AutoAttack suites.

Each finding is returned as a :class:`MaskingWarning` and emitted with
:func:`warnings.warn` as a :class:`GradientMaskingWarning`. A clean bill is no
proof of robustness; a finding means the robust accuracy is not to be trusted.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, looks_like_probabilities
from ..attacks.pgd import PGD
from ..utils.batches import Perturb, batched_correctness, device_batches
from ..utils.devices import DeviceLike, resolve_device
from ..utils.modes import model_mode
from ..utils.pixels import to_pixels
from .inputs import image_label_tensors

CHEAP_CHECKS = ("probability_outputs", "zero_gradients", "randomized_outputs")
"""The checks that run no attack: a few forward passes and one input-gradient
backward pass per example."""
ATTACK_CHECKS = ("more_steps", "more_restarts", "noise_beats_attack")
"""The checks that compare PGD runs (and random noise) with each other."""
CHECKS = CHEAP_CHECKS + ATTACK_CHECKS
RANDOMIZED_TOLERANCE = 1e-4
"""Largest L2 distance between two outputs of the same example, each scaled to
unit L2 norm, that still counts as the same output (float nondeterminism of
GPU kernels stays far below it)."""


class GradientMaskingWarning(UserWarning):
    """Emitted by :func:`check_gradient_masking` for each symptom found."""


@dataclass(frozen=True)
class MaskingWarning:
    """One symptom of gradient masking.

    ``check``: one of :data:`CHECKS` — ``"probability_outputs"``,
    ``"zero_gradients"``, ``"randomized_outputs"``, ``"more_steps"``,
    ``"more_restarts"``, ``"noise_beats_attack"``. ``message``: what was
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
    device: DeviceLike = None,
    seed: int = 0,
    warn: bool = True,
    checks: Sequence[str] = CHECKS,
    repeats: int = 5,
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
      (within 1e-3), i.e. the model returns probabilities; the attacks'
      losses (cross-entropy, margin, DLR) are defined on logits, so on
      probabilities they ascend another objective and the robust accuracy is
      measured against the wrong loss;
    * ``randomized_outputs``: ``repeats`` forward passes of the same images
      in eval mode disagree — an output, scaled to unit L2 norm, moves by
      more than :data:`RANDOMIZED_TOLERANCE`, or a prediction changes — on
      any example (AutoAttack's test for randomized defences); such a model
      needs EOT attacks.

    ``checks`` selects which run (default: all of :data:`CHECKS`;
    :data:`CHEAP_CHECKS` for the ones without attacks). Cost per example:
    one forward pass for ``probability_outputs``, one forward and
    input-backward pass for ``zero_gradients``, ``repeats - 1`` more forward
    passes for ``randomized_outputs``; any of :data:`ATTACK_CHECKS` adds
    ``steps[0] * (1 + restarts) + steps[1]`` forward and input-backward passes
    and about ``noise_samples + restarts + 3`` forward passes (110 and 18
    with the defaults), on ``n_examples=200`` images.

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
        checks: names of the checks to run, from :data:`CHECKS`.
        repeats: forward passes of the same images for ``randomized_outputs``
            (>= 2).

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
    repeats = check_positive_int(repeats, "repeats", minimum=2)
    if isinstance(checks, str) or not all(c in CHECKS for c in checks):
        raise ValueError(f"checks must be a sequence of names from {', '.join(map(repr, CHECKS))}; got {checks!r}")
    selected = set(checks)
    images, labels = image_label_tensors((images, labels))
    if n_examples is not None:
        check_positive_int(n_examples, "n_examples")
        images, labels = images[:n_examples], labels[:n_examples]
    device = resolve_device(device, model)
    # The sample is read many times, so it moves to the device once.
    images, labels = to_pixels(images.to(device)), labels.to(device)

    def batches() -> Iterator[Tuple[slice, Tensor, Tensor]]:
        return device_batches(images, labels, batch_size, device)

    def outputs_of_every_batch() -> Tensor:
        with torch.no_grad():
            return torch.cat([model(x) for _, x, _ in batches()]).float()

    def robust(perturb: Perturb) -> Tensor:
        """Per example: still classified correctly after ``perturb``?"""
        return batched_correctness(model, images, labels, perturb, batch_size=batch_size, device=device)

    findings: List[MaskingWarning] = []
    forked = [device] if device.type == "cuda" else []
    with model_mode(model, "eval"), torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        outputs = outputs_of_every_batch()
        if outputs.dim() != 2:
            raise ValueError(f"model must return (N, classes) outputs, got shape {tuple(outputs.shape)}")
        if "probability_outputs" in selected and bool(looks_like_probabilities(outputs)):
            findings.append(MaskingWarning(
                "probability_outputs",
                "the model's outputs look like probabilities, not logits: every row is non-negative and sums "
                "to 1. The attacks' losses (cross-entropy, CW margin, DLR) are defined on logits; on "
                "probabilities they ascend a different objective (the cross-entropy of a second softmax, "
                "margins between probabilities), so the robust accuracy is measured against the wrong loss and "
                "does not show what the threat model's attacks achieve. Return logits (drop the final "
                "softmax) for training and evaluation.", 1.0, 1.0))

        if "randomized_outputs" in selected:
            changed = torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)
            first = _unit_rows(outputs)
            for _ in range(repeats - 1):
                again = outputs_of_every_batch()
                changed |= (_unit_rows(again) - first).norm(dim=1) > RANDOMIZED_TOLERANCE
                changed |= again.argmax(1) != outputs.argmax(1)
            share = changed.float().mean().item()
            if share > 0:
                findings.append(MaskingWarning(
                    "randomized_outputs",
                    f"{repeats} forward passes of the same images in eval mode disagree on {share:.1%} of the "
                    "examples: the model is randomized (random input transformations, noise, stochastic "
                    "layers). Each attack step then follows the gradient of one random draw, so a plain "
                    "gradient attack underestimates what an adversary achieves against the expected "
                    "prediction. Evaluate with EOT (expectation over transformation: average the gradient "
                    "over many draws per step), e.g. AutoAttack's version='rand', and report the accuracy "
                    "over several draws.", share, 0.0))

        dead = 0.0
        if "zero_gradients" in selected:
            dead = torch.cat([_dead_gradients(model, x, y) for _, x, y in batches()]).float().mean().item()
        if dead > zero_grad_threshold:
            findings.append(MaskingWarning(
                "zero_gradients",
                f"{dead:.1%} of the examples have an all-zero or non-finite cross-entropy input gradient "
                f"(threshold {zero_grad_threshold:.0%}); gradient attacks cannot move them, so their robust "
                "accuracy is not evidence of robustness. Common causes: non-differentiable input processing "
                "(quantization, rounding, JPEG), a saturated softmax or float overflow, detached operations. "
                "Evaluate with BPDA or gradient-free attacks.", dead, zero_grad_threshold))

        if selected.isdisjoint(ATTACK_CHECKS):
            return _emitted(findings, warn)
        clean = outputs.argmax(1) == labels
        weak = PGD(eps, steps=weak_steps, random_start=True)
        strong = PGD(eps, steps=strong_steps, random_start=True)
        restarted = PGD(eps, steps=weak_steps, random_start=True, restarts=restarts)
        # The sample was checked above: the attacks skip their input checks.
        robust_weak = clean & robust(functools.partial(weak.run, check=False))
        robust_strong = clean & robust(functools.partial(strong.run, check=False))
        robust_restarts = clean & robust(functools.partial(restarted.run, check=False))
        acc_weak, acc_strong = _mean(robust_weak), _mean(robust_strong)
        acc_restarts = _mean(robust_restarts)
        if "more_steps" in selected and acc_strong - acc_weak > tolerance:
            findings.append(MaskingWarning(
                "more_steps",
                f"PGD-{strong_steps} leaves a higher robust accuracy ({acc_strong:.1%}) than PGD-{weak_steps} "
                f"({acc_weak:.1%}), by more than the tolerance of {tolerance:.1%}. A stronger attack must not do "
                "worse: the gradient does not lead to the adversarial examples (obfuscated, shattered or "
                "deceptive gradients).", acc_strong - acc_weak, tolerance))
        if "more_restarts" in selected and acc_restarts - acc_weak > tolerance:
            findings.append(MaskingWarning(
                "more_restarts",
                f"PGD-{weak_steps} with {restarts} restarts leaves a higher robust accuracy ({acc_restarts:.1%}) "
                f"than with one ({acc_weak:.1%}), by more than the tolerance of {tolerance:.1%}: the restart "
                "with the highest loss is not the one that fools the model, so the loss the attack ascends does "
                "not track misclassification (gradient masking).", acc_restarts - acc_weak, tolerance))

        if "noise_beats_attack" not in selected:
            return _emitted(findings, warn)
        noise_fooled = torch.zeros_like(clean)
        for _ in range(noise_samples):
            noise_fooled |= ~robust(functools.partial(_uniform_noise, eps=eps))
        beaten = _mean(clean & noise_fooled & robust_weak & robust_strong & robust_restarts)
        if beaten > tolerance:
            findings.append(MaskingWarning(
                "noise_beats_attack",
                f"uniform random noise in the eps-ball misclassifies {beaten:.1%} of the examples that every PGD "
                f"attack left correct ({noise_samples} draws per example; tolerance {tolerance:.1%}). A gradient "
                "attack should always beat random search: its gradients point away from the adversarial "
                "examples (gradient masking).", beaten, tolerance))
    return _emitted(findings, warn)


def _emitted(findings: List[MaskingWarning], warn: bool) -> List[MaskingWarning]:
    """``findings``, each first emitted as a warning when ``warn``."""
    if warn:
        for finding in findings:
            warnings.warn(f"possible gradient masking ({finding.check}): {finding.message}",
                          GradientMaskingWarning, stacklevel=3)
    return findings


def _unit_rows(outputs: Tensor) -> Tensor:
    """Each row scaled to unit L2 norm, so the randomness test ignores scale."""
    return outputs / (outputs.norm(dim=1, keepdim=True) + 1e-12)


def _dead_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per example: is the cross-entropy input gradient all zero or non-finite?"""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
    flat = grad.flatten(1)
    return ~torch.isfinite(flat).all(dim=1) | (flat == 0).all(dim=1)


def _uniform_noise(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Tensor:
    """``x`` moved by uniform noise in the L∞ ball of radius ``eps``, inside [0, 1]."""
    return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp_(0.0, 1.0)


def _mean(flags: Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0


__all__ = ["check_gradient_masking", "MaskingWarning", "GradientMaskingWarning", "CHECKS", "CHEAP_CHECKS",
           "ATTACK_CHECKS", "RANDOMIZED_TOLERANCE"]

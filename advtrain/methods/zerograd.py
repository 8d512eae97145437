"""ZeroGrad and MultiGrad (Golgooni, Saberi, Eskandar & Rohban, "ZeroGrad:
Mitigating and Explaining Catastrophic Overfitting in FGSM Adversarial
Training", 2021): FGSM-RS with a step of 2ε whose small or inconsistent
input-gradient components are zeroed, so those pixels do not move.

ZeroGrad zeroes, per example, the components of the input gradient whose
magnitude is below its q-quantile. MultiGrad takes the input gradient at a
few random points of the ε-ball and zeroes the components whose sign the
points do not agree on. Images are pixels in [0, 1]; ε and step sizes are in
pixel units.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_bool, check_eps, check_positive_int, check_radius
from ..attacks.base import Attack, BNMode, clip_to_ball_and_box, input_gradient
from ..policies.attack_policy import AttackPolicy
from ..training.trainer import Trainer
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: The protocol keys of the FastAT Benchmark's ``configs/cifar10/zero_grad.yaml``
#: that differ between its methods, for the FastAT protocol preset: label
#: smoothing, the weight-average decay τ (``None``: no weight averaging) and
#: the peak learning rate (its runs are 100 epochs). The benchmark has no
#: MultiGrad, so no configuration of it.
FASTAT_CONFIG = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def _check_quantile(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"quantile must be a number, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"quantile must lie in [0, 1] (a fraction of the gradient's components), got {value!r}")
    return float(value)


def _float32(value: float) -> float:
    """``value`` rounded to float32 (a product of two float32 numbers computed
    in double precision is exact, so rounding it gives the float32 product)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def per_example_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of each example's values, ``values`` (N, ...) taken
    over all dimensions but the first; shape (N,). The same number as
    ``torch.quantile(values.flatten(1), q, dim=1)`` (linear interpolation
    between the two nearest order statistics, the rank ``q·(n − 1)`` computed
    in float32 as ``torch.quantile`` does), from two ``kthvalue`` selections
    instead of a sort (and without ``torch.quantile``'s refusal of rows of
    more than 2²⁴ values).
    ``q`` in [0, 1]; the rank is a Python number, so no host synchronisation."""
    q = _check_quantile(q)
    flat = values.flatten(1)
    n = flat.shape[1]
    if n == 0:
        raise ValueError("per_example_quantile needs at least one value per example")
    rank = _float32(_float32(q) * _float32(n - 1))
    below, above = math.floor(rank), math.ceil(rank)
    low = flat.kthvalue(below + 1, dim=1).values
    if above == below:
        return low
    high = flat.kthvalue(above + 1, dim=1).values
    return torch.lerp(low, high, rank - below)


def zero_small_components(grad: Tensor, q: float) -> Tensor:
    """ZeroGrad's rule: ``grad`` (N, ...) with every component whose magnitude
    is below its example's q-quantile of ``|grad|`` set to 0 (components equal
    to the quantile are kept); a new tensor."""
    magnitude = grad.abs()
    threshold = per_example_quantile(magnitude, q).view((-1,) + (1,) * (grad.dim() - 1))
    return torch.where(magnitude < threshold, torch.zeros_like(grad), grad)


def _cross_entropy_sum(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(at_least_float32(model(x)), y, reduction="sum")


class ZeroGradAttack(Attack):
    """ZeroGrad's attack: from ``δ ~ U(−ε, ε)`` (or 0 without
    ``random_start``), clipped so that ``x + δ`` is in [0, 1], ``steps``
    times ``g = zero_small_components(∇_δ CE(f(x + δ), y), quantile)``,
    ``δ ← clip(δ + step_size·sign(g))`` to the ε-ball and [0, 1].
    The pixels whose gradient is zeroed keep their start; the cross-entropy
    is not label-smoothed.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        quantile: q in [0, 1], the fraction of each example's gradient
            components (the smallest in magnitude) that is zeroed.
        steps: gradient steps (>= 1; the reference's ``q_iters``).
        step_size: pixel units; ``None`` means ``2 * eps`` (the reference's
            ``fgsm_alpha = 2``).
        random_start: start from the uniform sample (the reference's
            ``fgsm_init='random'``) instead of ``x``.
        bn_mode: model mode while attacking (train, as the reference runs it).
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(self, eps: float = EPS, *, quantile: float = 0.35, steps: int = 1, step_size: Optional[float] = None,
                 random_start: bool = True, bn_mode: BNMode = "train", check_inputs: bool = True) -> None:
        eps = float(check_eps(eps, "linf", "eps"))
        super().__init__(eps, norm="linf", bn_mode=bn_mode, check_inputs=check_inputs)
        self.quantile = _check_quantile(quantile)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = 2.0 * eps if step_size is None else float(check_radius(step_size, "step_size"))
        self.random_start = check_bool(random_start, "random_start")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        eps = torch.full((x.shape[0], 1, 1, 1), float(self.eps), dtype=torch.float32, device=x.device)
        delta = torch.zeros_like(x, dtype=torch.float32)
        if self.random_start:
            delta = clip_to_ball_and_box(x, delta.uniform_(-float(self.eps), float(self.eps)), eps, "linf")
        for _ in range(self.steps):
            delta.requires_grad_(True)
            grad = zero_small_components(input_gradient(_cross_entropy_sum(model, x + delta, y), delta),
                                         self.quantile)
            delta = clip_to_ball_and_box(x, delta.detach() + self.step_size * grad.sign(), eps, "linf")
        return (x + delta).to(x.dtype)


class MultiGradAttack(Attack):
    """MultiGrad's attack: ``samples`` input gradients
    ``gₛ = ∇ CE(f(x + ηₛ), y)`` at independent points ``ηₛ ~ U(−ε, ε)``
    (clipped to [0, 1]), one forward and input backward each, in turn;
    ``S = Σₛ sign(gₛ)``; components with ``|S| < 2·min_agree − samples``
    (fewer than ``min_agree`` samples agreeing on the sign) are zeroed; then
    one step from the clean image: ``x_adv = clip₀¹(x + clip_ε(step_size·sign(S)))``.
    The cross-entropy is not label-smoothed.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        samples: random points (>= 1; the reference's ``multi_samps``).
        min_agree: how many samples must agree on a component's sign for it
            to move, 1 … ``samples``; ``None`` means ``samples`` (unanimity,
            the reference's ``multi_th = -1``).
        step_size: pixel units; ``None`` means ``2 * eps``, which the
            ε-clip makes a step of ε.
        bn_mode: model mode while attacking (train, as the reference runs it).
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(self, eps: float = EPS, *, samples: int = 3, min_agree: Optional[int] = None,
                 step_size: Optional[float] = None, bn_mode: BNMode = "train", check_inputs: bool = True) -> None:
        eps = float(check_eps(eps, "linf", "eps"))
        super().__init__(eps, norm="linf", bn_mode=bn_mode, check_inputs=check_inputs)
        self.samples = check_positive_int(samples, "samples")
        agree = self.samples if min_agree is None else check_positive_int(min_agree, "min_agree")
        if agree > self.samples:
            raise ValueError(f"min_agree must be at most samples = {self.samples}, got {agree}")
        self.min_agree = agree
        self.step_size = 2.0 * eps if step_size is None else float(check_radius(step_size, "step_size"))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        eps = torch.full((x.shape[0], 1, 1, 1), float(self.eps), dtype=torch.float32, device=x.device)
        votes = torch.zeros_like(x, dtype=torch.float32)
        for _ in range(self.samples):
            noise = torch.empty_like(x, dtype=torch.float32).uniform_(-float(self.eps), float(self.eps))
            delta = clip_to_ball_and_box(x, noise, eps, "linf").requires_grad_(True)
            votes += input_gradient(_cross_entropy_sum(model, x + delta, y), delta).sign()
        agreed = torch.where(votes.abs() < 2 * self.min_agree - self.samples, torch.zeros_like(votes), votes)
        delta = clip_to_ball_and_box(x, self.step_size * agreed.sign(), eps, "linf")
        return (x + delta).to(x.dtype)


def _schedule_defaults(kwargs: dict) -> dict:
    return {**dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0), **kwargs}


class ZeroGradTrainer(Trainer):
    """ZeroGrad training (Golgooni et al. 2021): :class:`ZeroGradAttack` with
    q = 0.35, one step of 2ε from a uniform start, BatchNorm in train mode,
    and the cross-entropy of its output with the Trainer's label smoothing.
    Method knobs from the FastAT Benchmark's ``configs/cifar10/zero_grad.yaml``
    (the paper's CIFAR-10 command); the schedule is that of the other
    presets and of the paper's runs: 30 epochs, cyclic LR to 0.2, momentum
    0.9, weight decay 5e-4, batch 128, black crop padding. A step costs as
    much as FGSM-RS's plus a per-example selection: ``steps + 1`` forwards,
    ``steps`` input backwards, one full backward."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, quantile: float = 0.35, steps: int = 1,
                 step_size: Optional[float] = None, random_start: bool = True, **kwargs: Any) -> None:
        attack = ZeroGradAttack(eps, quantile=quantile, steps=steps, step_size=step_size,
                                random_start=random_start, bn_mode="train", check_inputs=False)
        super().__init__(model, AttackPolicy(attack), **_schedule_defaults(kwargs))


class MultiGradTrainer(Trainer):
    """MultiGrad training (Golgooni et al. 2021): :class:`MultiGradAttack`
    with 3 samples that must all agree, a step of 2ε (clipped to ε) from the
    clean image, BatchNorm in train mode, and the cross-entropy of its
    output with the Trainer's label smoothing. Knobs from the paper's code
    and CIFAR-10 command (the FastAT Benchmark has no MultiGrad); 30 epochs,
    cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch 128, black
    crop padding. A step costs ``samples + 1`` forwards, ``samples`` input
    backwards and one full backward (9F at 3 samples)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, samples: int = 3, min_agree: Optional[int] = None,
                 step_size: Optional[float] = None, **kwargs: Any) -> None:
        attack = MultiGradAttack(eps, samples=samples, min_agree=min_agree, step_size=step_size,
                                 bn_mode="train", check_inputs=False)
        super().__init__(model, AttackPolicy(attack), **_schedule_defaults(kwargs))


__all__ = ["EPS", "FASTAT_CONFIG", "MultiGradAttack", "MultiGradTrainer", "ZeroGradAttack", "ZeroGradTrainer",
           "per_example_quantile", "zero_small_components"]

"""ELLE and ELLE-A (Rocamora, Liu, Chen, Huang & Cevher, ICLR 2024, "Efficient
local linearity regularization to overcome catastrophic overfitting"): FGSM
training plus a penalty on the local linearity error of the loss, measured at
three points of the ε-ball that lie on one line. The penalty needs only
forward passes of the model, so its gradient is an ordinary backward (no
double backward, unlike GradAlign). ELLE keeps the penalty's weight λ fixed;
ELLE-A switches it on only when the error jumps (catastrophic overfitting
detected) and lets it decay otherwise.

Images are pixels in [0, 1]; ε and step sizes are in pixel units.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_radius, check_weight
from ..attacks.pgd import PGD
from ..data.batch import Batch
from ..distributed import all_reduce_sum, is_distributed, world_size
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..training.trainer import Trainer
from ..utils.precision import at_least_float32, mixed_precision

EPS = 8 / 255

#: FGSM step of both methods as a multiple of ε (the benchmark's ``fgsm_alpha``).
STEP_FACTOR = 1.25

#: The FastAT Benchmark's protocol settings for ELLE and ELLE-A
#: (``configs/cifar10/elle.yaml``; ELLE-A is that file with
#: ``lambda_schedule: onoff``): label smoothing, the weight average's τ and
#: the peak learning rate of its 100-epoch one-cycle schedule.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def linearity_triplets(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Random triplets of points on a line through the L∞ ε-ball of each image.

    For ``x`` (N, C, H, W): ``x_a = x + ε·u_a`` and ``x_b = x + ε·u_b`` with
    ``u ~ U(−1, 1)`` per pixel, and ``x_c = (1 − α)·x_a + α·x_b`` with
    ``α ~ U(0, 1)`` per example, drawn in that order from torch's global
    generator. The points are not clipped to [0, 1] (the penalty is a
    property of the loss on the ball, as in the reference code). Returns the
    (3N, C, H, W) stack ``[x_a; x_b; x_c]`` and ``α`` (N,), in ``x``'s
    dtype widened to at least float32.
    """
    n = x.shape[0]
    ends = at_least_float32(x).repeat(2, 1, 1, 1)
    ends = ends + eps * (2 * torch.rand(ends.shape, device=x.device, dtype=ends.dtype) - 1)
    alpha = torch.rand(n, 1, 1, 1, device=x.device, dtype=ends.dtype)
    middle = (1 - alpha) * ends[:n] + alpha * ends[n:]
    return torch.cat([ends, middle]), alpha.view(n)


def local_linearity_error(losses: Tensor, alpha: Tensor) -> Tensor:
    """ELLE's penalty before its weight λ: the mean over examples of
    ``(L(x_c) − (1 − α)·L(x_a) − α·L(x_b))²``.

    ``losses`` (3N,) are the per-example losses at ``[x_a; x_b; x_c]`` as
    :func:`linearity_triplets` stacks them, ``alpha`` (N,) the mixing
    weights. For a loss that is linear on the segment the error is 0. A 0-dim
    tensor in at least float32, differentiable in ``losses``.
    """
    n = alpha.shape[0]
    if losses.shape != (3 * n,):
        raise ValueError(f"losses must hold 3 × {n} per-example losses (x_a, x_b, x_c), "
                         f"got shape {tuple(losses.shape)}")
    losses = at_least_float32(losses)
    alpha = alpha.to(losses.dtype)
    chord = (1 - alpha) * losses[:n] + alpha * losses[n:2 * n]
    return (losses[2 * n:] - chord).square().mean()


class _LinearityRegularized(PerturbationPolicy):
    """What ELLE and ELLE-A share: the FGSM perturbation and the loss
    ``CE(f(x_adv), y) + λ·LLE``; subclasses say what λ is for a step."""

    def __init__(self, eps: float, step_size: Optional[float]) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.step_size = STEP_FACTOR * self.eps if step_size is None else float(check_radius(step_size, "step_size"))
        # No projection back to the ε-ball after the step (the reference's
        # clamp=False): the input only stays in [0, 1].
        self.attack = PGD(self.eps, steps=1, step_size=self.step_size, random_start=True, project=False,
                          bn_mode="train", check_inputs=False)

    @abc.abstractmethod
    def weight(self) -> Union[float, Tensor]:
        """λ for the next training step (a number or a 0-dim tensor)."""

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        return Perturbation(x=self.attack.run(model, batch.x, batch.y, check=False))

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        logits = context.forward(perturbation.x)
        points, alpha = linearity_triplets(batch.x, self.eps)
        # One forward of all 3N points, BatchNorm in train mode over them, as
        # the reference does; the losses are not label-smoothed. It runs in
        # full precision even under autocast: the error is a small difference
        # of losses, and bf16 logits add rounding noise of its own size.
        with mixed_precision(points.device, None):
            points_logits = context.forward(points)
        losses = F.cross_entropy(at_least_float32(points_logits), batch.y.repeat(3), reduction="none")
        error = local_linearity_error(losses, alpha)
        perturbation.extras["linearity_error"] = error.detach()
        lam = self.weight()
        if isinstance(lam, Tensor):
            lam = lam.to(error.dtype)
        return TrainingLoss(context.cross_entropy(logits, batch.y) + lam * error, logits)


class ELLEPolicy(_LinearityRegularized):
    """ELLE: FGSM training plus λ times the local linearity error.

    Per batch ``(x, y)``, BatchNorm in train mode for every pass:

    1. ``δ₀ ~ U(−ε, ε)`` per pixel (kept in [0, 1]), one signed step
       ``δ = δ₀ + step_size·sign(∇ₓ CE)``, ``x_adv = clip₀¹(x + δ)``: no
       projection onto the ε-ball, so ``|x_adv − x| ≤ ε + step_size``.
    2. ``x_a, x_b`` uniform in the ε-box of ``x``, ``x_c = (1 − α)x_a + αx_b``,
       ``α ~ U(0, 1)`` (:func:`linearity_triplets`).
    3. Loss ``CE(f(x_adv), y) + λ · mean_i (L(x_c) − (1 − α)L(x_a) − αL(x_b))²``
       with ``L`` the per-example cross-entropy
       (:func:`local_linearity_error`); the first term takes the Trainer's
       label smoothing, ``L`` does not.

    The forward of the 3N points runs in full precision under a Trainer's
    autocast (bf16 rounding is of the error's own size). Only forward passes
    enter the penalty, so the step runs under ``torch.compile``.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        lam: weight λ of the linearity error (>= 0).
        step_size: FGSM step, pixel units; ``None`` means ``1.25 · eps``.
    """

    def __init__(self, eps: float = EPS, *, lam: float = 1.0, step_size: Optional[float] = None) -> None:
        super().__init__(eps, step_size)
        self.lam = check_weight(lam, "lam")

    def weight(self) -> float:
        return self.lam

    def __repr__(self) -> str:
        return f"ELLEPolicy(eps={self.eps!r}, lam={self.lam!r}, step_size={self.step_size!r})"


class ELLEAPolicy(_LinearityRegularized):
    """ELLE-A: ELLE with λ switched on when the linearity error jumps.

    The perturbation and loss are :class:`ELLEPolicy`'s with λ starting at
    0. After each step the step's linearity error ``e`` (averaged over
    processes in a distributed run) joins the record of every error so far;
    with ``n`` errors recorded, their mean ``μ`` and population standard
    deviation ``σ`` (``e`` included),

    * ``λ ← lam_aux`` if ``n > 2`` and ``e > μ + sensitivity·σ``
      (catastrophic overfitting detected),
    * ``λ ← lam_decay·λ`` otherwise.

    The record is kept as running statistics (count, mean, sum of squared
    deviations, float64 tensors), updated without host synchronisation; they
    and the current λ are in :meth:`state_dict`.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        lam_aux: λ set when a jump is detected (>= 0).
        lam_decay: per-step factor of λ between jumps, in [0, 1].
        sensitivity: how many standard deviations above the mean an error
            must be to count as a jump (>= 0).
        step_size: FGSM step, pixel units; ``None`` means ``1.25 · eps``.
    """

    def __init__(self, eps: float = EPS, *, lam_aux: float = 10.0, lam_decay: float = 0.99,
                 sensitivity: float = 2.0, step_size: Optional[float] = None) -> None:
        super().__init__(eps, step_size)
        self.lam_aux = check_weight(lam_aux, "lam_aux")
        self.lam_decay = check_weight(lam_decay, "lam_decay")
        if self.lam_decay > 1:
            raise ValueError(f"lam_decay must be in [0, 1] (λ's factor per step between jumps), got {lam_decay!r}")
        self.sensitivity = check_weight(sensitivity, "sensitivity")
        self._reset(torch.device("cpu"))

    def _reset(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        #: λ of the next step (float64, 0-dim).
        self.lam = zero.clone()
        #: How many linearity errors have been recorded (int64, 0-dim).
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        #: Their mean and the sum of their squared deviations from it (float64, 0-dim).
        self.mean = zero.clone()
        self.m2 = zero.clone()

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self._reset(context.device)

    def weight(self) -> Tensor:
        return self.lam

    def observe(self, error: Tensor) -> Tensor:
        """Record one step's linearity error (a 0-dim tensor) and update λ by
        the rule above; returns whether a jump was detected (a 0-dim bool
        tensor). No host synchronisation."""
        if error.dim() != 0:
            raise ValueError("error must be one step's linearity error, a 0-dim tensor; "
                             f"got shape {tuple(error.shape)}")
        e = error.detach().to(device=self.mean.device, dtype=torch.float64)
        count = self.count + 1
        # Welford's update: the mean and squared deviations of every error so
        # far without keeping the errors themselves.
        shift = e - self.mean
        mean = self.mean + shift / count
        m2 = self.m2 + shift * (e - mean)
        std = torch.sqrt(m2 / count)
        jump = (count > 2) & (e > mean + self.sensitivity * std)
        self.lam = torch.where(jump, torch.full_like(self.lam, self.lam_aux), self.lam * self.lam_decay)
        self.count, self.mean, self.m2 = count, mean, m2
        return jump

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        error = perturbation.extras.get("linearity_error")
        if error is None:
            raise RuntimeError("ELLE-A records the linearity error of its loss: call loss before after_step")
        if is_distributed():  # every process follows the same λ
            error = all_reduce_sum(error.clone()) / world_size()
        self.observe(error)

    def metrics(self) -> Dict[str, float]:
        return {"lam": float(self.lam)}

    def state_dict(self) -> Dict[str, Any]:
        return {"lam": self.lam.clone(), "count": self.count.clone(), "mean": self.mean.clone(),
                "m2": self.m2.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.mean.device
        self.lam = state["lam"].to(device=device, dtype=torch.float64).clone()
        self.count = state["count"].to(device=device, dtype=torch.int64).clone()
        self.mean = state["mean"].to(device=device, dtype=torch.float64).clone()
        self.m2 = state["m2"].to(device=device, dtype=torch.float64).clone()

    def __repr__(self) -> str:
        return (f"ELLEAPolicy(eps={self.eps!r}, lam_aux={self.lam_aux!r}, lam_decay={self.lam_decay!r}, "
                f"sensitivity={self.sensitivity!r}, step_size={self.step_size!r})")


class ELLETrainer(Trainer):
    """ELLE training (Rocamora et al. 2024) with the FastAT Benchmark's
    method settings: FGSM from a random start with step 1.25ε and no
    projection, λ = 1 on the local linearity error of one triplet per
    example (see :class:`ELLEPolicy`). Defaults: 30 epochs, cyclic LR to
    0.2, momentum 0.9, weight decay 5e-4, batch 128, black crop padding —
    the schedule of the other presets; the benchmark's protocol (100
    epochs, one-cycle to 0.1, label smoothing 0.4, weight averaging τ =
    0.9995) is in :data:`FASTAT_CONFIG`."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: float = 1.0, step_size: Optional[float] = None,
                 **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, ELLEPolicy(eps, lam=lam, step_size=step_size), **{**defaults, **kwargs})


class ELLEATrainer(Trainer):
    """ELLE-A training (Rocamora et al. 2024): ELLE with λ = 0 until the
    linearity error exceeds its running mean by ``sensitivity`` = 2
    standard deviations, then λ = ``lam_aux`` = 10, decaying by
    ``lam_decay`` = 0.99 per step (see :class:`ELLEAPolicy`). Defaults as
    :class:`ELLETrainer`'s: 30 epochs, cyclic LR to 0.2, momentum 0.9,
    weight decay 5e-4, batch 128, black crop padding."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam_aux: float = 10.0, lam_decay: float = 0.99,
                 sensitivity: float = 2.0, step_size: Optional[float] = None, **kwargs: Any) -> None:
        policy = ELLEAPolicy(eps, lam_aux=lam_aux, lam_decay=lam_decay, sensitivity=sensitivity,
                             step_size=step_size)
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["EPS", "FASTAT_CONFIG", "STEP_FACTOR", "ELLEAPolicy", "ELLEATrainer", "ELLEPolicy", "ELLETrainer",
           "linearity_triplets", "local_linearity_error"]

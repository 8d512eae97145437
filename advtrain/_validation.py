"""Input checks shared by attacks, policies and trainers.

Each check runs once per call, outside any step loop, and raises a
``ValueError`` or ``TypeError`` that names the offending argument. Checks that
must read tensor values (pixel range, label range) synchronise with the device
once; hot paths call them only at their entry point.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

Radius = Union[float, Tensor]
"""An attack radius in pixel units: a Python number or a tensor broadcastable
to the batch (one value per example)."""

RADIUS_NORMS = ("linf", "l2")
"""The norms whose perturbation radii :func:`check_eps` knows how to bound."""


def check_images(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating NCHW batch of pixels in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of pixels in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.numel() > 0:
        lo, hi = torch.aminmax(x.detach())
        lo_v, hi_v = float(lo), float(hi)
        if not (lo_v >= 0.0 and hi_v <= 1.0):
            raise ValueError(
                f"{name} must hold pixels in [0, 1] (normalization belongs inside the model), "
                f"got values in [{lo_v:.4g}, {hi_v:.4g}]"
            )
    return x


def check_labels(y: object, batch_size: int, num_classes: Optional[int] = None, name: str = "y") -> Tensor:
    """Check that ``y`` is an integer vector of ``batch_size`` class indices."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape ({batch_size},) to match the batch, got {tuple(y.shape)}")
    if y.numel() > 0:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
            raise ValueError(f"{name} holds labels in [{lo}, {hi}], outside the valid range {bound}")
    return y


def check_radius(eps: object, name: str = "eps") -> Radius:
    """Check that a step size, learning rate, decay or other scalar (which may
    exceed 1) is finite and non-negative; a perturbation radius ε goes through
    :func:`check_eps`, which also bounds it."""
    if isinstance(eps, Tensor):
        if not eps.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {eps.dtype}")
        if eps.numel() > 0:
            lo = float(eps.detach().min())
            if not (lo >= 0.0) or not bool(torch.isfinite(eps).all()):
                raise ValueError(f"{name} must be finite and >= 0 (pixel units), got a minimum of {lo}")
        return eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(eps).__name__}")
    if not (eps >= 0.0) or eps == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0 (pixel units), got {eps}")
    return float(eps)


def check_eps(eps: object, norm: str = "linf", name: str = "eps") -> Radius:
    """Check a perturbation radius ε in pixel units (images are pixels in [0, 1]).

    ε must be finite and >= 0. An L∞ radius must also be <= 1: no pixel can
    move further, so a larger value is a radius in 0..255 units (``8`` meant
    as 8/255). An L2 radius may exceed 1; its bound, √(C·H·W), depends on the
    input size and is checked by :func:`check_l2_radius` where the input is
    first seen. A tensor ``eps`` (one radius per example) is read once here
    (one host synchronisation), so check it outside step loops.
    """
    norm = check_choice(norm, "norm", RADIUS_NORMS)
    if isinstance(eps, Tensor):
        if not eps.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {eps.dtype}")
        if eps.numel() == 0:
            return eps
        lo, hi = torch.stack(torch.aminmax(eps.detach().float())).tolist()
        # NaN fails both comparisons, so it is refused here too.
        if not (lo >= 0.0 and hi < math.inf):
            raise ValueError(f"{name} must be finite and >= 0 (pixel units), got values in [{lo:g}, {hi:g}]")
        if norm == "linf" and hi > 1.0:
            raise ValueError(f"{name} is an L∞ radius in pixel units (images are pixels in [0, 1]), so it must be "
                             f"<= 1; got values up to {hi:g} (did you mean {name} / 255?)")
        return eps
    value = float(check_radius(eps, name))
    if norm == "linf" and value > 1.0:
        raise ValueError(f"{name} is an L∞ radius in pixel units (images are pixels in [0, 1]), so it must be "
                         f"<= 1; got {value:g} (did you mean {value:g}/255?)")
    return value


def largest_radius(eps: Radius) -> float:
    """The largest value of a checked radius, as a Python number (one host
    synchronisation for a tensor; 0 for an empty one)."""
    if isinstance(eps, Tensor):
        return float(eps.detach().max()) if eps.numel() > 0 else 0.0
    return float(eps)


def check_l2_radius(largest: float, x: Tensor, name: str = "eps") -> None:
    """Check that an L2 radius of at most ``largest`` (pixel units) fits images
    shaped like ``x`` (N, C, H, W): at most √(C·H·W), the radius of a ball
    around any image in [0, 1]^(C·H·W) that already holds every image of the
    box. A Python comparison: no tensor is read."""
    bound = math.sqrt(math.prod(x.shape[1:]))
    if largest > bound:
        raise ValueError(
            f"{name} is an L2 radius in pixel units (images are pixels in [0, 1]); for images of shape "
            f"{tuple(x.shape[1:])} it must be <= √(C·H·W) = {bound:.4g}, where the ball already holds every "
            f"image, but got {largest:g} (was it given in 0..255 units? divide it by 255)")


def looks_like_probabilities(outputs: Tensor, tolerance: float = 1e-3) -> Tensor:
    """Whether (N, classes) model outputs are probabilities rather than logits:
    every row is non-negative and sums to 1 within ``tolerance``. Returns a
    0-dim bool tensor on ``outputs``' device, so the caller decides when to
    read it."""
    outputs = outputs.detach().float()
    rows_ok = (outputs >= 0).all(dim=1) & ((outputs.sum(dim=1) - 1).abs() < tolerance)
    return rows_ok.all()


def check_weight(value: object, name: str) -> float:
    """Check a loss weight (TRADES's β, MART's and GradAlign's λ): a finite
    real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_interval(value: object, name: str, low: float, high: float) -> float:
    """Check that ``value`` is a real number in the interval (low, high]
    (``high = inf``: any finite number above ``low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low < value <= high and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number in ({low:g}, {high:g}], got {value!r}")
    return float(value)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """Check that ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Check that ``value`` is a bool (not merely truthy: ``1`` or ``"no"``
    is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(value: object, name: str, choices: tuple) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def per_example(value: Radius, x: Tensor) -> Tensor:
    """Return ``value`` as a float32 tensor of shape (N, 1, 1, 1) on ``x``'s device.

    A scalar is broadcast to every example; a tensor must hold one value per
    example (shape (N,) or (N, 1, 1, 1)) or a single value.
    """
    n = x.shape[0]
    if not isinstance(value, Tensor):
        # torch.full fills on the device; as_tensor of a Python number would
        # copy from the host and synchronise the stream on CUDA.
        return torch.full((n, 1, 1, 1), float(value), dtype=torch.float32, device=x.device)
    t = value.to(device=x.device, dtype=torch.float32)
    if t.numel() == 1:
        return t.reshape(1, 1, 1, 1).expand(n, 1, 1, 1)
    if t.numel() != n:
        raise ValueError(f"a per-example radius needs {n} values (one per example), got shape {tuple(t.shape)}")
    return t.reshape(n, 1, 1, 1)

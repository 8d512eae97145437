"""Mixed precision: entering :func:`torch.autocast` for a device, and asking
which autocast dtype is in effect."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Union

import torch


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect for ``device_type`` (``"cpu"``,
    ``"cuda"``, ...), or ``None`` when autocast is off there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_dtype(device_type) if enabled else None


def mixed_precision(device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> ContextManager[None]:
    """A context in which forward passes on ``device`` run under
    :func:`torch.autocast` with ``dtype`` (e.g. ``torch.bfloat16``); with
    ``dtype=None`` they run in full precision: an enclosing autocast is
    switched off for the block, and with none in effect nothing is entered."""
    device_type = torch.device(device).type
    if dtype is not None:
        return torch.autocast(device_type, dtype=dtype)
    if active_autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


__all__ = ["active_autocast_dtype", "mixed_precision"]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: bf16/fp16 widened, float32 and float64 kept.
    Losses, softmaxes and logarithms of logits are computed in it."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def precision_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype a ``precision`` setting (``"auto"``, ``"fp32"``,
    ``"bf16"``) means on ``device``: bf16 for ``"bf16"``, and for ``"auto"``
    on CUDA; ``None`` (full precision) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


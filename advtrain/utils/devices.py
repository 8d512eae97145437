"""Where to run when the caller does not say."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

DeviceLike = Union[str, torch.device, None]
"""A device, its name (``"cuda:1"``), or ``None`` for the default."""


def default_device() -> torch.device:
    """The current CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer, for a model
    without parameters); the CPU for a model holding no tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_device(device: DeviceLike, model: nn.Module) -> torch.device:
    """``device`` when given, else the device ``model`` lives on."""
    if device is None:
        return model_device(model)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device, a device name or None, got {type(device).__name__}")
    return torch.device(device)


__all__ = ["DeviceLike", "default_device", "model_device", "resolve_device"]

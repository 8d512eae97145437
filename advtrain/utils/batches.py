"""The batched evaluation loop: images and labels in batches on a device,
optionally through an attack, with the per-example correctness kept on the
device.

Images are uint8 levels 0..255 or float pixels in [0, 1], (N, C, H, W),
wherever they are stored; each batch is moved to the device before uint8 is
widened (a quarter of the transfer). Nothing here reads a tensor back to the
host: a caller that wants numbers syncs once, on the result.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from .devices import DeviceLike, resolve_device
from .modes import model_mode
from .pixels import to_pixels
from .precision import mixed_precision

Perturb = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``perturb(model, x, y) -> x_adv``: an attack, or anything called like one."""


def device_batches(images: Tensor, labels: Tensor, batch_size: int,
                   device: torch.device) -> Iterator[Tuple[slice, Tensor, Tensor]]:
    """``(rows, x, y)`` for consecutive batches of ``batch_size`` examples, in
    order: ``rows`` the batch's positions in ``images`` (a slice), ``x``
    float32 pixels in [0, 1] and ``y`` int64 class indices, both on
    ``device``. Checks its arguments when called, before the first batch."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _batches(images, labels, batch_size, device)


def _batches(images: Tensor, labels: Tensor, batch_size: int,
             device: torch.device) -> Iterator[Tuple[slice, Tensor, Tensor]]:
    for start in range(0, images.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        yield (rows, to_pixels(images[rows].to(device, non_blocking=True)),
               labels[rows].to(device, non_blocking=True).long())


def batched_correctness(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    perturb: Optional[Perturb] = None,
    *,
    batch_size: int = 256,
    device: DeviceLike = None,
    autocast_dtype: Optional[torch.dtype] = None,
    delta: Optional[Tensor] = None,
) -> Tensor:
    """Whether ``model`` (in eval mode; its train/eval flags are restored)
    classifies each example correctly, as a bool (N,) tensor on ``device``.

    Each batch runs on ``device`` (default: the model's) under
    :func:`~advtrain.utils.precision.mixed_precision` with ``autocast_dtype``
    (``None``: full precision). With ``delta`` (pixel units, the images'
    shape) the model sees ``clip(x + delta, 0, 1)``; with ``perturb`` it sees
    ``perturb(model, x, y)`` of those images (an attack runs under the same
    autocast and may enable gradients itself); the prediction itself runs
    without gradients.
    """
    device = resolve_device(device, model)
    if delta is not None and delta.shape != images.shape:
        raise ValueError(f"delta must have the images' shape {tuple(images.shape)}, got {tuple(delta.shape)}")
    batches = device_batches(images, labels, batch_size, device)
    parts = []
    with model_mode(model, "eval"), mixed_precision(device, autocast_dtype):
        for rows, x, y in batches:
            if delta is not None:
                x = (x + delta[rows].to(device, torch.float32, non_blocking=True)).clamp_(0.0, 1.0)
            if perturb is not None:
                x = perturb(model, x, y)
            with torch.no_grad():
                parts.append(model(x).argmax(1) == y)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=device)


__all__ = ["Perturb", "device_batches", "batched_correctness"]

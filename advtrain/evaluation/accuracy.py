"""Clean and robust accuracy of a classifier on tensors of images."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..attacks.base import Attack, model_mode


def correct_predictions(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Optional[Attack] = None,
    *,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-example correctness (bool tensor on the CPU) of ``model`` in eval mode
    on ``images`` (uint8 0..255 or float pixels in [0,1], NCHW), optionally
    after ``attack``. The model's train/eval flags are restored afterwards."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else images.device
    out = []
    with model_mode(model, "eval"):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            y = labels[start:start + batch_size].to(device, non_blocking=True).long()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                if attack is not None:
                    x = attack(model, x, y)
                with torch.no_grad():
                    pred = model(x).argmax(1)
            out.append((pred == y).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, attack: Optional[Attack] = None, **kwargs) -> float:
    """Fraction of ``images`` classified correctly (after ``attack`` if given);
    keyword arguments as for :func:`correct_predictions`."""
    correct = correct_predictions(model, images, labels, attack, **kwargs)
    return float(correct.float().mean()) if correct.numel() else float("nan")

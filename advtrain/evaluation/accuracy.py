"""Clean and robust accuracy of a classifier on tensors of images."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..attacks.base import Attack
from ..utils.batches import batched_correctness
from ..utils.devices import DeviceLike


def correct_predictions(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Optional[Attack] = None,
    *,
    batch_size: int = 256,
    device: DeviceLike = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-example correctness (bool tensor on the CPU) of ``model`` in eval mode
    on ``images`` (uint8 0..255 or float pixels in [0,1], NCHW), optionally
    after ``attack``, on ``device`` (default: the model's) under autocast with
    ``autocast_dtype`` (``None``: full precision). The model's train/eval
    flags are restored afterwards."""
    return batched_correctness(model, images, labels, attack, batch_size=batch_size, device=device,
                               autocast_dtype=autocast_dtype).cpu()


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, attack: Optional[Attack] = None, **kwargs) -> float:
    """Fraction of ``images`` classified correctly (after ``attack`` if given);
    keyword arguments as for :func:`correct_predictions`."""
    correct = correct_predictions(model, images, labels, attack, **kwargs)
    return float(correct.float().mean()) if correct.numel() else float("nan")

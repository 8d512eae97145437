"""The evaluation functions' data argument as a pair of tensors."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor

from .._validation import check_images
from ..data.loader import as_tensors


def image_label_tensors(data: Any) -> Tuple[Tensor, Tensor]:
    """``(images, labels)``: images uint8 or float pixels in [0, 1] as given for
    a pair of tensors, otherwise through :func:`advtrain.data.as_tensors`."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        images, labels = data
        if images.dtype != torch.uint8:
            check_images(images, "images")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},) to match the images, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0, got a minimum of {int(labels.min())}")
        return images, labels.long()
    return as_tensors(data)


__all__ = ["image_label_tensors"]

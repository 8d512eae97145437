"""Images as float pixels in [0, 1]."""
from __future__ import annotations

import torch
from torch import Tensor


def to_pixels(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``images`` as floating-point pixels in [0, 1] of ``dtype``: uint8
    levels 0..255 are divided by 255, floating-point images (already pixels in
    [0, 1]) are only cast. A floating-point input of ``dtype`` is returned
    itself, not copied, so callers must not modify the result in place."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 levels 0..255 or floating-point pixels in [0, 1], "
                        f"got dtype {images.dtype}")
    return images.to(dtype)


__all__ = ["to_pixels"]

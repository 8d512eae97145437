"""The training batch and the augmentation record that travels with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """Where each image of a batch was cut from its padded original.

    A batch image ``i`` equals ``pad(original, padding, fill)[:, top[i]:top[i]+H,
    left[i]:left[i]+W]``, mirrored left-right when ``flip[i]`` is true (the crop
    is taken first, the flip second); ``fill`` is the loader's constant border
    pixel value (``DeviceLoader(pad_fill=...)``). ``top`` and ``left`` are
    int64 offsets in ``[0, 2 * padding]``; ``flip`` is a bool tensor. All three
    have shape (N,) and live on the batch's device.
    """

    top: Tensor
    left: Tensor
    flip: Tensor
    padding: int


@dataclass(frozen=True)
class Batch:
    """One training batch.

    ``x``: images, float (N, C, H, W), pixels in [0, 1]. ``y``: int64 labels
    (N,). ``index``: int64 dataset indices of the examples (N,), the key of any
    per-example store. ``aug``: the crop/flip each image went through, or
    ``None`` when the images are the originals (no augmentation).
    """

    x: Tensor
    y: Tensor
    index: Tensor
    aug: Optional[Augmentation] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

"""Batched pad-and-crop / horizontal-flip augmentation and its inverse.

Every function here works on a whole batch with index arithmetic (``gather``
and ``scatter``), on any device and any dtype, with no per-example Python
loop and no host synchronisation. Coordinates follow
:class:`~advtrain.data.batch.Augmentation`: image ``i`` of a batch is the
``H x W`` window at rows ``top[i]..top[i]+H-1`` and columns
``left[i]..left[i]+W-1`` of the padded original (size ``H+2p x W+2p``, the
border filled with one constant pixel value), mirrored left-right when
``flip[i]``.

Per-example stores (ATTA, APART) keep one tensor per training example in
padded coordinates; :func:`crop_padded` reads a batch's window out of such a
store and :func:`paste_padded` writes one back, the two being exact inverses
on the window.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import Augmentation


def _check_padding(padding: object) -> int:
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise TypeError(f"padding must be an int (pixels), got {type(padding).__name__}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0 pixels, got {padding}")
    return padding


def check_fill(fill: object, name: str = "fill") -> float:
    """Check a padding fill: a pixel value in [0, 1] (0 black, 0.5 grey)."""
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"{name} must be a number (a pixel value in [0, 1]), got {type(fill).__name__}")
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"{name} must be a pixel value in [0, 1] (0.5 is grey), got {fill}")
    return float(fill)


def _fill_value(x: Tensor, fill: float) -> float:
    """``fill`` (pixel units) in the units of ``x``: as is for floating
    images, the 8-bit level ``fill * 255`` for integer (uint8) images."""
    if x.is_floating_point():
        return fill
    level = fill * 255.0
    if abs(level - round(level)) > 1e-6:
        raise ValueError(
            f"fill {fill} is not a level k/255 that {x.dtype} images can hold; "
            "convert the images to float pixels in [0, 1] first"
        )
    return float(round(level))


def _check_batch(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    return x


def _check_aug(aug: object, n: int, device: torch.device) -> Augmentation:
    if not isinstance(aug, Augmentation):
        raise TypeError(f"aug must be an Augmentation, got {type(aug).__name__}")
    for field in ("top", "left", "flip"):
        t = getattr(aug, field)
        if t.shape != (n,):
            raise ValueError(
                f"aug.{field} must have shape ({n},) to match the batch, got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"aug.{field} is on {t.device} but the batch is on {device}")
    return aug


def random_augmentation(
    n: int,
    padding: int = 4,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Augmentation:
    """Draw crop offsets and flips for ``n`` images.

    ``top`` and ``left`` are uniform integers in ``[0, 2 * padding]`` (pixels,
    padded coordinates), ``flip`` is true with probability 0.5. Draws come
    from ``generator`` (which must live on ``device``; the default generator
    of ``device`` when None), in the order top, left, flip.
    """
    padding = _check_padding(padding)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the draws are for {device}; "
            "create it with torch.Generator(device=...)"
        )
    top = torch.randint(
        0, 2 * padding + 1, (n,), generator=generator, device=device, dtype=torch.int64
    )
    left = torch.randint(
        0, 2 * padding + 1, (n,), generator=generator, device=device, dtype=torch.int64
    )
    flip = torch.randint(0, 2, (n,), generator=generator, device=device, dtype=torch.int64).bool()
    return Augmentation(top=top, left=left, flip=flip, padding=padding)


def _window(aug: Augmentation, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Padded-coordinate rows (N, H) and columns (N, W) of each example's
    window, columns already mirrored for flipped examples: output pixel
    ``(i, j)`` of example ``n`` comes from padded pixel ``(rows[n, i], cols[n, j])``."""
    device = aug.top.device
    r = torch.arange(height, device=device, dtype=torch.int64)
    c = torch.arange(width, device=device, dtype=torch.int64)
    rows = aug.top.unsqueeze(1) + r
    cols = aug.left.unsqueeze(1) + torch.where(aug.flip.unsqueeze(1), width - 1 - c, c)
    return rows, cols


def _inner_size(padded: Tensor, padding: int, name: str) -> Tuple[int, int]:
    height, width = padded.shape[2] - 2 * padding, padded.shape[3] - 2 * padding
    if height < 1 or width < 1:
        raise ValueError(
            f"{name} of shape {tuple(padded.shape)} is too small for padding {padding}"
        )
    return height, width


def crop_padded(padded: Tensor, aug: Augmentation) -> Tensor:
    """Read each example's crop window out of a padded tensor.

    ``padded``: (N, C, H + 2p, W + 2p) in padded coordinates, ``p =
    aug.padding``. Returns (N, C, H, W), mirrored where ``aug.flip``, with
    ``padded``'s dtype and device. Differentiable with respect to ``padded``.
    """
    _check_batch(padded, "padded")
    _check_aug(aug, padded.shape[0], padded.device)
    n, ch = padded.shape[:2]
    height, width = _inner_size(padded, aug.padding, "padded")
    rows, cols = _window(aug, height, width)
    picked_rows = padded.gather(
        2, rows.view(n, 1, height, 1).expand(n, ch, height, padded.shape[3])
    )
    return picked_rows.gather(3, cols.view(n, 1, 1, width).expand(n, ch, height, width))


def paste_padded(padded: Tensor, values: Tensor, aug: Augmentation) -> Tensor:
    """Write each example's window back into a padded tensor: the inverse of
    :func:`crop_padded`.

    ``padded``: (N, C, H + 2p, W + 2p); ``values``: (N, C, H, W), as
    :func:`crop_padded` would return them (flipped where ``aug.flip``). Each
    value is un-flipped and written at its window position; pixels outside
    the window keep ``padded``'s values. Returns a new tensor with
    ``padded``'s dtype (``values`` is cast to it) and device; ``padded`` is not
    modified. ``crop_padded(paste_padded(s, v, aug), aug)`` equals ``v``
    exactly.
    """
    _check_batch(padded, "padded")
    _check_batch(values, "values")
    n, ch, hp, wp = padded.shape
    _check_aug(aug, n, padded.device)
    height, width = _inner_size(padded, aug.padding, "padded")
    if values.shape != (n, ch, height, width):
        raise ValueError(
            f"values must have shape {(n, ch, height, width)} to fill the windows of padded "
            f"{tuple(padded.shape)} "
            f"(padding {aug.padding}), got {tuple(values.shape)}"
        )
    rows, cols = _window(aug, height, width)
    flat = (rows.view(n, height, 1) * wp + cols.view(n, 1, width)).view(n, 1, height * width)
    out = padded.reshape(n, ch, hp * wp).scatter(
        2,
        flat.expand(n, ch, height * width),
        values.to(padded.dtype).reshape(n, ch, height * width),
    )
    return out.view(n, ch, hp, wp)


def apply_augmentation(x: Tensor, aug: Augmentation, fill: float = 0.0) -> Tensor:
    """Crop and flip originals ``x`` (N, C, H, W) as recorded in ``aug``.

    Pads by ``aug.padding`` pixels of value ``fill`` and reads each window
    with :func:`crop_padded`; the result has ``x``'s shape, dtype and device.
    ``fill`` is a pixel value in [0, 1] (0 black, 0.5 grey); integer (uint8)
    images hold it as the level ``fill * 255``, so for them it must be a
    multiple of 1/255 (0.5 grey needs float images).
    """
    _check_batch(x, "x")
    _check_aug(aug, x.shape[0], x.device)
    value = _fill_value(x, check_fill(fill))
    p = aug.padding
    return crop_padded(F.pad(x, (p, p, p, p), value=value) if p else x, aug)


def random_crop_flip(
    x: Tensor, padding: int = 4, generator: Optional[torch.Generator] = None, fill: float = 0.0
) -> Tuple[Tensor, Augmentation]:
    """Random pad-and-crop plus horizontal flip of a batch.

    ``x``: (N, C, H, W), any dtype. Pads by ``padding`` pixels of value
    ``fill`` (see :func:`apply_augmentation`), cuts a random H x W window
    (offsets uniform in ``[0, 2 * padding]``) and mirrors it left-right with
    probability 0.5, independently per example. Random draws come from
    ``generator`` (on ``x``'s device). Returns the augmented batch (same
    shape, dtype, device) and the :class:`Augmentation` that
    :func:`apply_augmentation` turns ``x`` into it with.
    """
    _check_batch(x, "x")
    aug = random_augmentation(x.shape[0], padding, generator, x.device)
    return apply_augmentation(x, aug, fill), aug


__all__ = [
    "random_augmentation",
    "random_crop_flip",
    "apply_augmentation",
    "crop_padded",
    "paste_padded",
]

"""A data loader that keeps a whole split on the device.

:class:`DeviceLoader` stores the images once as uint8 (a CIFAR-10 training
split is 150 MiB), and per batch gathers the examples, crops and flips them
with batched tensor ops and converts them to the compute dtype in [0, 1]. It
yields :class:`~advtrain.data.batch.Batch` objects whose ``index`` and ``aug``
let per-example stores stay aligned with the examples.

:func:`as_tensors` turns any supported source into ``(uint8 images, int64
labels)``: an :class:`~advtrain.data.cifar.ArrayDataset`, a pair of tensors, or
any map-style dataset of ``(image, label)`` items (PIL images, numpy HWC
arrays or CHW tensors; torchvision datasets included), the last through a
slower one-off pass over the items.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .._validation import check_positive_int
from ..utils.devices import default_device
from ..utils.pixels import to_pixels
from .augment import apply_augmentation, check_fill, random_augmentation
from .batch import Augmentation, Batch
from .cifar import ArrayDataset

DataSource = Union[ArrayDataset, Tuple[Any, Any], Dataset]
"""What :func:`as_tensors` and :class:`DeviceLoader` accept."""

_QUANTIZATION_TOLERANCE = 1e-6
"""Largest change (pixel units) that turning float pixels into 8-bit levels
may make before a warning says the data was not 8-bit to begin with (or the
float dtype's epsilon, if larger)."""


def as_tensors(data: DataSource) -> Tuple[Tensor, Tensor]:
    """Return a split as ``(images, labels)``: uint8 (N, C, H, W) pixel values
    0..255 and int64 (N,) class indices.

    ``data`` is an :class:`ArrayDataset` (its tensors are returned as they
    are); a pair ``(images, labels)`` of tensors or numpy arrays, images NCHW
    either uint8 or floating point in [0, 1] (kept on their device); a
    ``TensorDataset`` of such a pair; or any map-style dataset whose items
    are ``(image, label)`` with the image a PIL image (mode ``L`` gives one
    channel, other modes are converted to RGB), a numpy array HWC or HW
    (uint8, or float in [0, 1]) or a tensor CHW or HW (uint8, or float in
    [0, 1]), and the label an integer. Float pixels are rounded to the
    nearest of the 256 levels k/255: exact for data that came from 8-bit
    images (e.g. ``ToTensor()`` output), and a ``UserWarning`` reports the
    largest change otherwise.
    """
    if isinstance(data, ArrayDataset):
        return data.images, data.labels
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, np.ndarray))
    ):
        return _from_pair(data[0], data[1])
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return _from_pair(*data.tensors)
    if (
        isinstance(data, (Dataset, Sequence))
        and not isinstance(data, (str, bytes))
        and hasattr(data, "__len__")
        and hasattr(data, "__getitem__")
    ):
        return _from_items(data)
    raise TypeError(
        "data must be an ArrayDataset, a pair (images, labels) of tensors, or a map-style "
        f"Dataset of (image, label) items; got {type(data).__name__}"
    )


def _from_pair(images: Any, labels: Any) -> Tuple[Tensor, Tensor]:
    images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    labels = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if (
        labels.dim() != 1
        or labels.dtype == torch.bool
        or labels.is_floating_point()
        or labels.is_complex()
    ):
        raise TypeError(
            "labels must be a 1-D integer tensor of class indices, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"images and labels differ in length: {images.shape[0]} images, "
            f"{labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise ValueError("the split is empty (0 images)")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got a minimum of {int(labels.min())}")
    return _to_uint8(images, "images"), labels.to(device=images.device, dtype=torch.int64)


def _to_uint8(images: Tensor, name: str) -> Tensor:
    """uint8 pixels from uint8 (returned as is) or float [0, 1] ``images``."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be uint8 (0..255) or floating point in [0, 1], got dtype {images.dtype}"
        )
    lo, hi = torch.aminmax(images)
    if not (float(lo) >= 0.0 and float(hi) <= 1.0):
        raise ValueError(
            f"{name} must hold pixels in [0, 1] (or be uint8 0..255; "
            "normalization belongs inside the model), "
            f"got values in [{float(lo):.4g}, {float(hi):.4g}]"
        )
    levels = images.to(torch.float32).mul(255.0).round_()
    change = float((levels.to(images.dtype) / 255.0 - images).abs().max())
    if change > max(_QUANTIZATION_TOLERANCE, torch.finfo(images.dtype).eps):
        warnings.warn(
            f"{name} are not 8-bit pixel values; stored as uint8 (levels k/255), which changes "
            f"pixels by up to {change:.3g}",
            UserWarning,
            stacklevel=3,
        )
    return levels.to(torch.uint8)


def _item_image(image: Any, i: int) -> Tensor:
    """One dataset item's image as a CHW tensor (uint8 or float)."""
    if type(image).__module__.startswith("PIL."):
        mode = "L" if image.mode in ("L", "1") else "RGB"
        image = np.asarray(image if image.mode == mode else image.convert(mode))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return torch.tensor(image).unsqueeze(0)
        if image.ndim == 3:
            return torch.tensor(np.moveaxis(image, -1, 0))
        raise ValueError(f"dataset[{i}]: a numpy image must be HWC or HW, got shape {image.shape}")
    if isinstance(image, Tensor):
        if image.dim() == 2:
            return image.unsqueeze(0)
        if image.dim() == 3:
            return image
        raise ValueError(
            f"dataset[{i}]: a tensor image must be CHW or HW, got shape {tuple(image.shape)}"
        )
    raise TypeError(
        f"dataset[{i}]: image must be a PIL image, numpy array or tensor, "
        f"got {type(image).__name__}"
    )


def _item_label(label: Any, i: int) -> int:
    if isinstance(label, (bool, np.bool_)) or (
        isinstance(label, Tensor) and label.dtype == torch.bool
    ):
        raise TypeError(f"dataset[{i}]: label must be an integer class index, got a bool")
    try:
        return operator.index(label)
    except TypeError:
        raise TypeError(
            f"dataset[{i}]: label must be an integer class index, got {label!r:.80}"
        ) from None


def _from_items(dataset: Any) -> Tuple[Tensor, Tensor]:
    """Materialise a map-style dataset of (image, label) items."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty (0 items)")
    images: List[Tensor] = []
    labels: List[int] = []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"dataset[{i}] must be an (image, label) pair, got {type(item).__name__}"
            )
        image = _item_image(item[0], i).cpu()
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"dataset[{i}] has image shape {tuple(image.shape)}, "
                f"dataset[0] has {tuple(images[0].shape)}"
            )
        images.append(image)
        labels.append(_item_label(item[1], i))
    if all(t.dtype == torch.uint8 for t in images):
        stacked = torch.stack(images)
    else:
        stacked = torch.stack([to_pixels(t) for t in images])
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if int(label_tensor.min()) < 0:
        raise ValueError(
            f"labels must be class indices >= 0, got a minimum of {int(label_tensor.min())}"
        )
    return _to_uint8(stacked, "dataset images"), label_tensor


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed for one epoch of one loader seed."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def _resolve_device(device: Union[None, str, torch.device], images: Tensor) -> torch.device:
    if device is not None:
        return torch.device(device)
    if images.device.type != "cpu":
        return images.device
    return default_device()


class DeviceLoader:
    """Iterate over a split kept whole on the device, in shuffled, augmented batches.

    Args:
        data: the split, in any form :func:`as_tensors` accepts.
        batch_size: examples per batch.
        shuffle: draw a new order every epoch (otherwise dataset order).
        augment: pad by ``padding`` pixels of value ``pad_fill``, random-crop
            back to H x W and mirror with probability 0.5, per example
            (``Batch.aug`` records it); otherwise batches hold the originals
            and ``aug`` is None.
        padding: crop padding in pixels; also the padding per-example stores
            use (reported by :attr:`padding` even when ``augment`` is off).
        pad_fill: value of the padded border, a pixel value in [0, 1]: 0
            (black) as in Wong et al.'s and Rice et al.'s code, 0.5 (grey) as
            in ATTA's and APART's reference code. Recorded in
            :meth:`state_dict`; resuming with another fill is refused.
        drop_last: skip the final partial batch of each epoch.
        pad_last: fill the final partial batch with examples from the start of
            the epoch's order (wrap-around), so every batch has ``batch_size``
            examples — static shapes for ``torch.compile``; those few examples
            are seen twice in that epoch.
        device: where the split lives and batches are produced. None keeps
            tensors already on an accelerator there, and otherwise uses the
            current CUDA device when there is one, else the CPU.
        dtype: floating dtype of ``Batch.x`` (pixels in [0, 1]).
        seed: non-negative int; epoch ``e``'s order and augmentation are a
            function of ``(seed, e)`` only.
        num_shards: split the examples into this many fixed shards by index
            (shard ``s`` holds the indices ``i`` with ``i % num_shards == s``),
            each shuffled on its own and padded by wrap-around to the size of
            the largest, so every shard yields the same number of batches.
        shard: yield only this shard's examples, ``batch_size`` per batch (one
            process of a distributed run: ``shard = rank``). With
            ``shard=None`` and ``num_shards > 1`` every batch takes
            ``batch_size / num_shards`` examples from each shard: the global
            batch of a distributed run, in one process.

    Each epoch draws its permutation and every example's crop and flip at
    once from a generator seeded with ``(seed, epoch)``, so epochs are
    reproducible and :meth:`set_epoch` / :meth:`load_state_dict` resume a
    run exactly, also mid-epoch. Iterating continues from the current
    position: a fresh ``iter`` after a completed epoch starts the next one,
    after an interrupted one it yields the epoch's remaining batches. Use one
    iterator at a time.
    """

    def __init__(
        self,
        data: DataSource,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = True,
        padding: int = 4,
        drop_last: bool = False,
        device: Union[None, str, torch.device] = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        num_shards: int = 1,
        shard: Optional[int] = None,
        pad_last: bool = False,
        pad_fill: float = 0.0,
    ) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.num_shards = check_positive_int(num_shards, "num_shards")
        if shard is not None and not 0 <= check_positive_int(shard, "shard", minimum=0) < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards - 1}], got {shard}")
        self.shard = shard
        if shard is None and self.batch_size % self.num_shards:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by num_shards {self.num_shards} "
                             "when one loader yields the batches of all shards")
        self.padding = check_positive_int(padding, "padding", minimum=0)
        self.pad_fill = check_fill(pad_fill, "pad_fill")
        self._seed = check_positive_int(seed, "seed", minimum=0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.pad_last = bool(pad_last)
        if self.drop_last and self.pad_last:
            raise ValueError("drop_last and pad_last exclude each other")
        self.dtype = dtype
        images, labels = as_tensors(data)
        self.device = _resolve_device(device, images)
        self.images: Tensor = images.to(self.device)
        """The stored split: uint8 (N, C, H, W), pixel values 0..255."""
        self.labels: Tensor = labels.to(self.device)
        """int64 (N,) class indices."""
        classes = getattr(data, "classes", None)
        self.classes: Optional[List[str]] = (
            [str(c) for c in classes] if classes is not None and len(classes) else None
        )
        if self.num_examples < self.num_shards:
            raise ValueError(f"{self.num_examples} examples cannot be split into {self.num_shards} shards")
        if self.drop_last and self._shard_length < self._shard_batch:
            raise ValueError(
                f"drop_last=True with {self.num_examples} examples and batch_size "
                f"{self.batch_size} yields no batch"
            )
        self._epoch = 0
        self._position = 0

    @property
    def num_examples(self) -> int:
        """Size of the split (dataset indices run over ``[0, num_examples)``)."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image, in pixels."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (0-based)."""
        return self._epoch

    @property
    def _shard_length(self) -> int:
        """Examples per shard and epoch (the largest shard's size)."""
        return math.ceil(self.num_examples / self.num_shards)

    @property
    def _shard_batch(self) -> int:
        """Examples each shard contributes to one batch."""
        return self.batch_size if self.shard is not None else self.batch_size // self.num_shards

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self._shard_length // self._shard_batch
        return math.ceil(self._shard_length / self._shard_batch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run epoch ``epoch`` from its first batch."""
        self._epoch = check_positive_int(epoch, "epoch", minimum=0)
        self._position = 0

    def _plan(self, epoch: int) -> Tuple[Tensor, Optional[Augmentation]]:
        """One epoch's example order per shard, shape (num_shards, shard
        length), and every example's augmentation (indexed by dataset index)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_epoch_seed(self._seed, epoch))
        n, shards, length = self.num_examples, self.num_shards, self._shard_length
        if self.pad_last:
            length = len(self) * self._shard_batch
        rows = []
        for s in range(shards):
            members = torch.arange(s, n, shards, device=self.device)
            if self.shuffle:
                members = members[torch.randperm(members.numel(), generator=generator, device=self.device)]
            rows.append(members.repeat(math.ceil(length / members.numel()))[:length])
        order = torch.stack(rows)
        aug = random_augmentation(n, self.padding, generator, self.device) if self.augment else None
        return order, aug

    def _to_float(self, x: Tensor) -> Tensor:
        work = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        return to_pixels(x, work).to(self.dtype)

    def __iter__(self) -> Iterator[Batch]:
        if self._position >= len(self):
            self._epoch += 1
            self._position = 0
        epoch = self._epoch
        order, aug = self._plan(epoch)
        if self.shard is not None:
            order = order[self.shard:self.shard + 1]
        step = self._shard_batch
        for b in range(self._position, len(self)):
            index = order[:, b * step:(b + 1) * step].reshape(-1)
            x = self.images[index]
            batch_aug = None
            if aug is None:
                x = self._to_float(x)
            else:
                batch_aug = Augmentation(aug.top[index], aug.left[index], aug.flip[index], self.padding)
                # uint8 holds a black border exactly and moves a quarter of the
                # bytes; any other fill (0.5 grey) is padded in the float image
                x = (self._to_float(apply_augmentation(x, batch_aug)) if self.pad_fill == 0.0
                     else apply_augmentation(self._to_float(x), batch_aug, self.pad_fill))
            self._position = b + 1
            yield Batch(x, self.labels[index], index, batch_aug)
        self._epoch = epoch + 1
        self._position = 0

    def state_dict(self) -> Dict[str, Union[int, float]]:
        """Seed, epoch and position within the epoch: enough to resume the
        exact sequence of batches; and the settings that must match to do
        so. Plain numbers (safe with ``weights_only``)."""
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "num_shards": self.num_shards,
            "shard": -1 if self.shard is None else self.shard,
            "pad_fill": self.pad_fill,
        }

    def load_state_dict(self, state: Mapping[str, Union[int, float]]) -> None:
        """Continue from a :meth:`state_dict`, taken from a loader over the
        same split with the same batch size and padding fill."""
        expected = {"seed", "epoch", "position", "num_examples", "batch_size", "num_shards", "shard"}
        # a state without "pad_fill" comes from a loader that padded with 0
        if not expected <= set(state) <= expected | {"pad_fill"}:
            raise ValueError(f"loader state must have keys {sorted(expected | {'pad_fill'})}, got {sorted(state)}")
        mine = {"num_examples": self.num_examples, "batch_size": self.batch_size, "num_shards": self.num_shards,
                "shard": -1 if self.shard is None else self.shard}
        for key in mine:
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"loader state is for {key}={int(state[key])}, "
                    f"this loader has {mine[key]}"
                )
        fill = float(state.get("pad_fill", 0.0))
        if fill != self.pad_fill:
            raise ValueError(f"loader state is for pad_fill={fill}, this loader has {self.pad_fill}; "
                             f"build the loader with pad_fill={fill} to resume exactly")
        self._seed = check_positive_int(int(state["seed"]), "seed", minimum=0)
        self._epoch = check_positive_int(int(state["epoch"]), "epoch", minimum=0)
        self._position = check_positive_int(int(state["position"]), "position", minimum=0)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader({self.num_examples} examples of shape {self.image_shape} "
            f"on {self.device}, "
            f"batch_size={self.batch_size}, shuffle={self.shuffle}, augment={self.augment}, "
            f"padding={self.padding}, pad_fill={self.pad_fill}, drop_last={self.drop_last}, dtype={self.dtype})"
        )


__all__ = ["DeviceLoader", "as_tensors", "DataSource"]

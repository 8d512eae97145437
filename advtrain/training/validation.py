"""A held-out validation split of the training data, and the attack the
FastAT Benchmark validates with.

The benchmark holds out 1,000 of CIFAR-10's 50,000 training images, measures
clean and PGD-10 accuracy on them after every epoch, and keeps the
checkpoint with the best validation PGD accuracy. :func:`train_val_split`
carves such a split (fixed by a seed) and :func:`pgd10` is its attack;
``Trainer(val_examples=N)`` uses both.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from .._validation import check_positive_int
from ..attacks.pgd import PGD
from ..data.cifar import ArrayDataset
from ..data.loader import as_tensors


def pgd10(eps: float = 8 / 255) -> PGD:
    """The validation attack of the FastAT Benchmark: L∞ PGD, 10 steps of
    ε/4 (2/255 at ε = 8/255, pixel units), random start, BatchNorm in eval
    mode."""
    return PGD(eps, steps=10, step_size=eps / 4, random_start=True, bn_mode="eval")


def train_val_split(data: Any, n: int, seed: int = 0) -> Tuple[ArrayDataset, ArrayDataset]:
    """Split ``data`` (anything :func:`~advtrain.data.as_tensors` accepts)
    into a training part and ``n`` held-out validation examples.

    The validation examples are a uniformly random subset drawn with a
    generator seeded by ``seed`` alone (the global RNG is not touched): the
    same data, ``n`` and ``seed`` give the same split on every machine and
    every process of a distributed run. Both parts keep the examples in their
    original order, so the training part's indices ``0 .. len - 1`` — those
    that :class:`~advtrain.data.DeviceLoader` batches and per-example stores
    carry — follow the remaining examples' order. Class names are kept.

    Returns ``(train, val)`` as :class:`~advtrain.data.ArrayDataset` objects
    (uint8 images on the data's device).
    """
    images, labels = as_tensors(data)
    total = int(labels.shape[0])
    n = check_positive_int(n, "n")
    if n >= total:
        raise ValueError(f"n must be less than the {total} examples of the data (some must remain to train on), "
                         f"got {n}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(total, dtype=torch.bool)
    held_out[torch.randperm(total, generator=generator)[:n]] = True
    held_out = held_out.to(images.device)
    classes = list(getattr(data, "classes", None) or ())
    return (ArrayDataset(images[~held_out], labels[~held_out], classes),
            ArrayDataset(images[held_out], labels[held_out], classes))


__all__ = ["pgd10", "train_val_split"]

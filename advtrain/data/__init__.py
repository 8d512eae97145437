"""Data: CIFAR readers, the device-resident loader and batched augmentation.

``Batch`` and ``Augmentation`` are what the loader yields and what
per-example perturbation stores align with; :func:`crop_padded` and
:func:`paste_padded` read and write such stores through a batch's crop/flip.
"""

from .augment import (
    apply_augmentation,
    crop_padded,
    paste_padded,
    random_augmentation,
    random_crop_flip,
)
from .batch import Augmentation, Batch
from .cifar import ArrayDataset, DatasetNotFoundError, DownloadError, cifar10, cifar100
from .loader import DeviceLoader, as_tensors

__all__ = [
    "Batch",
    "Augmentation",
    "ArrayDataset",
    "cifar10",
    "cifar100",
    "DatasetNotFoundError",
    "DownloadError",
    "DeviceLoader",
    "as_tensors",
    "random_crop_flip",
    "random_augmentation",
    "apply_augmentation",
    "crop_padded",
    "paste_padded",
]

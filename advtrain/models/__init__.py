"""Models for 32×32 images that take pixels in [0, 1] and normalize inside,
their registry (:data:`MODELS`, :func:`build_model`, :func:`model_record`),
and the perturbation-site mechanism (named points where an additive
perturbation can be injected and whose activation gradient can be read)."""
from __future__ import annotations

from .normalize import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, Normalize
from .preact_resnet import PreActResNet18
from .registry import MODELS, ModelEntry, ModelRecord, build_model, model_names, model_record
from .resnet import ResNet18
from .sites import ScaledDirection, Site, SiteModule, attach_sites, capture_sites, find_sites, perturb_sites
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet

__all__ = [
    "MODELS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ModelEntry",
    "ModelRecord",
    "Normalize",
    "PreActResNet18",
    "ResNet18",
    "ScaledDirection",
    "Site",
    "SiteModule",
    "SmallCNN",
    "WideResNet",
    "attach_sites",
    "build_model",
    "capture_sites",
    "find_sites",
    "model_names",
    "model_record",
    "perturb_sites",
]

"""Models for 32×32 images that take pixels in [0, 1] and normalize inside,
and the perturbation-site mechanism (named points where an additive
perturbation can be injected and whose activation gradient can be read)."""
from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from .normalize import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, Normalize
from .preact_resnet import PreActResNet18
from .sites import ScaledDirection, Site, SiteModule, attach_sites, capture_sites, find_sites, perturb_sites
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet

_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "preactresnet18": PreActResNet18,
    "wideresnet": WideResNet,
    "smallcnn": SmallCNN,
}


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a model by name (case-insensitive).

    Names: ``"preactresnet18"`` (kwargs ``normalize``, ``width``, ``shortcut``),
    ``"wideresnet"`` (kwargs ``depth``, ``widen``, ``normalize``,
    ``dropout``), ``"smallcnn"`` (kwargs ``width``, ``normalize``). Every
    model takes (N, 3, 32, 32) pixels in [0, 1] and returns (N, num_classes)
    logits.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(_MODELS))}")
    return _MODELS[key](num_classes=num_classes, **kwargs)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Normalize",
    "PreActResNet18",
    "ScaledDirection",
    "Site",
    "SiteModule",
    "SmallCNN",
    "WideResNet",
    "attach_sites",
    "build_model",
    "capture_sites",
    "find_sites",
    "perturb_sites",
]

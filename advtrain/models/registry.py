"""The model registry: advtrain's models by name, and the record — registry
name and constructor arguments — that rebuilds a model from a checkpoint.

A model's weights do not say everything about it (``PreActResNet18``'s two
shortcut variants share every parameter name and shape, ``WideResNet``'s
dropout leaves no trace), so checkpoints carry :func:`model_record`'s output
and the command line rebuilds the model with :func:`build_model` from it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Type

from torch import nn

from .preact_resnet import PreActResNet18
from .resnet import ResNet18
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its registry name, its class, a one-line
    description, and its constructor arguments' defaults (read from the
    class's signature, so they cannot drift from it)."""

    name: str
    cls: Type[nn.Module]
    description: str
    defaults: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.cls).parameters.values()
        object.__setattr__(self, "defaults", MappingProxyType({p.name: p.default for p in params}))


_ENTRIES = (
    ModelEntry("preactresnet18", PreActResNet18,
               "pre-activation ResNet-18, the network of Fast-AT and APART (11.2 M parameters)"),
    ModelEntry("resnet18", ResNet18, "post-activation ResNet-18, the FastAT Benchmark's network (11.2 M parameters)"),
    ModelEntry("wideresnet", WideResNet, "wide ResNet, WRN-28-10 by default (36.5 M parameters)"),
    ModelEntry("smallcnn", SmallCNN, "three conv-BatchNorm-ReLU stages (24 k parameters), for CPU tests and examples"),
)
#: The registered models by registry name, in the order the command line lists them.
MODELS: Mapping[str, ModelEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})
# One entry per class: a model's exact class says which entry built it.
_BY_CLASS: Dict[type, ModelEntry] = {entry.cls: entry for entry in _ENTRIES}


class ModelRecord(NamedTuple):
    """What rebuilds a model: ``build_model(name, **kwargs)``. ``name`` is
    None (and ``kwargs`` empty) for a model outside the registry."""

    name: Optional[str]
    kwargs: Dict[str, Any]


def model_names() -> Tuple[str, ...]:
    """The registry names, in table order."""
    return tuple(MODELS)


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (case-insensitive) with
    ``num_classes`` outputs and the given constructor arguments (the others
    keep their defaults, :attr:`ModelEntry.defaults`).

    Names: ``"preactresnet18"`` (kwargs ``normalize``, ``width``,
    ``shortcut``), ``"resnet18"`` (``normalize``, ``width``),
    ``"wideresnet"`` (``depth``, ``widen``, ``normalize``, ``dropout``),
    ``"smallcnn"`` (``width``, ``normalize``). Every model takes
    (N, 3, 32, 32) pixels in [0, 1] and returns (N, num_classes) logits.
    An unknown name is a ``ValueError``, an argument the model does not take
    a ``TypeError``, each naming the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    entry = MODELS.get(name.lower())
    if entry is None:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}")
    unknown = sorted(set(kwargs) - set(entry.defaults))
    if unknown:
        raise TypeError(f"{entry.name} takes no argument {', '.join(map(repr, unknown))}; "
                        f"its arguments: {', '.join(entry.defaults)}")
    return entry.cls(num_classes=num_classes, **kwargs)


def model_record(model: nn.Module) -> ModelRecord:
    """The registry name and constructor arguments of ``model``, as plain
    values, or ``ModelRecord(None, {})`` when it cannot be rebuilt from the
    registry: its class is not a registered one (a subclass counts as
    another model), or an argument is not a plain value (a ``normalize``
    module other than :class:`~advtrain.models.Normalize`)."""
    entry = _BY_CLASS.get(type(model))
    kwargs = dict(getattr(model, "init_kwargs", {}))
    if entry is None or set(kwargs) != set(entry.defaults):
        return ModelRecord(None, {})
    return ModelRecord(entry.name, kwargs)


__all__ = ["MODELS", "ModelEntry", "ModelRecord", "build_model", "model_names", "model_record"]

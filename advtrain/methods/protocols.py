"""Protocol presets: a published training recipe applied to any method.

A method preset holds the method's own knobs (step sizes, λ, ...) and a
default schedule; a :class:`Protocol` holds everything else a paper or a
benchmark fixes for every method it trains — the network, epochs, optimizer
and learning-rate schedule, label smoothing, weight averaging, the validation
split and how the reported model is chosen — so that methods compare under
one recipe. Two protocols are known (:data:`PROTOCOLS`):

* ``"fastat"``: the FastAT Benchmark's CIFAR-10 recipe (its
  ``configs/cifar10/common.yaml``, the per-method yaml files and
  ``main.py``): ResNet-18, 100 epochs, ``OneCycleLR`` to 0.1 stepped per
  epoch, label smoothing and weight averaging as each method's yaml says,
  1,000 of the 50,000 training images held out and the model of best
  validation PGD-10 accuracy kept.
* ``"apart"``: the APART paper's recipe (its ``train.py``):
  PreActResNet18, 30 epochs, a triangular LR 0 → 0.2 → 0 per iteration with
  momentum cycled against it, weight decay 2e-4, crops padded with grey.

A protocol sets the recipe; a run size (``advtrain train --scale``) shrinks
the model, data and epochs; explicit arguments override both.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional

from torch import nn

from .._validation import check_positive_int
from ..models import build_model
from ..training.schedules import cyclic_momentum, one_cycle_momentum_per_epoch, one_cycle_per_epoch, triangular
from ..training.trainer import Trainer, pgd20
from .registry import get_method

SCHEDULES = ("onecycle-per-epoch", "cyclic")
"""The schedule kinds a :class:`Protocol` names: ``"onecycle-per-epoch"``
(:func:`~advtrain.training.schedules.one_cycle_per_epoch` with its momentum
partner) and ``"cyclic"`` (a per-iteration triangle with
:func:`~advtrain.training.schedules.cyclic_momentum`)."""

_METHOD_KEYS = ("label_smoothing", "weight_average", "lr", "total_epoch")


@dataclass(frozen=True)
class Protocol:
    """A training recipe shared by every method it trains.

    ``name``: the registry and ``--protocol`` name. ``title``: what it is,
    for docs and the startup line. ``model``: a model registry name and
    ``model_kwargs`` its constructor arguments. ``epochs``, ``lr`` (the peak
    rate), ``schedule`` (one of :data:`SCHEDULES`), ``momentum`` (SGD's, the
    cycle's high end), ``momentum_low`` (the cycle's low end),
    ``weight_decay``, ``batch_size``, ``pad_fill`` (crop padding, pixel
    value). ``label_smoothing`` and ``weight_average`` (EMA decay τ per
    step, or None): the defaults for methods without their own entry.
    ``val_examples``: training images held out for validation (None: none).
    ``keep_best``: report the model (raw or averaged) of best validation PGD
    accuracy. ``eval_attack``: the attack of the per-epoch test evaluation,
    by name (``"pgd20"``). ``per_method``: the settings a method's own config
    changes, by registry name: keys ``label_smoothing``, ``weight_average``,
    ``lr``, ``total_epoch``. ``source``: where the settings come from.
    """

    name: str
    title: str
    model: str
    model_kwargs: Mapping[str, Any]
    epochs: int
    lr: float
    schedule: str
    momentum: float
    momentum_low: float
    weight_decay: float
    batch_size: int
    pad_fill: float
    label_smoothing: float
    weight_average: Optional[float]
    val_examples: Optional[int]
    keep_best: bool
    eval_attack: str
    source: str
    per_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.keep_best and self.val_examples is None:
            raise ValueError("keep_best needs val_examples (the split the best model is chosen on)")
        for method, settings in self.per_method.items():
            unknown = sorted(set(settings) - set(_METHOD_KEYS))
            if unknown:
                raise ValueError(f"per_method[{method!r}] has unknown keys {unknown}; known: {', '.join(_METHOD_KEYS)}")
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))
        object.__setattr__(self, "per_method", MappingProxyType({k: MappingProxyType(dict(v))
                                                                 for k, v in self.per_method.items()}))


#: The FastAT Benchmark's per-method settings that differ between its CIFAR-10
#: configs (ε = 8/255), for the registered methods whose modules carry no
#: ``FASTAT_CONFIG`` of their own; the benchmark's yaml file in each comment.
FASTAT_METHOD_CONFIG: Mapping[str, Mapping[str, Any]] = {
    "fgsm": {"label_smoothing": 0.4, "weight_average": 0.9995},  # fgsm_at.yaml
    "fgsm-rs": {"label_smoothing": 0.4, "weight_average": 0.9995},  # fgsm_rs.yaml
    "nfgsm": {"label_smoothing": 0.4, "weight_average": 0.9995},  # n_fgsm.yaml
    "pgd": {"label_smoothing": 0.4, "weight_average": None},  # pgd_at.yaml: weight_average false
    "free-at": {"label_smoothing": 0.4, "weight_average": 0.9995, "total_epoch": 200},  # free_at.yaml
    "gradalign": {"label_smoothing": 0.4, "weight_average": 0.9995},  # grad_align.yaml
}

FASTAT = Protocol(
    name="fastat", title="FastAT Benchmark (CIFAR-10)",
    model="resnet18", model_kwargs={"normalize": False},
    epochs=100, lr=0.1, schedule="onecycle-per-epoch", momentum=0.95, momentum_low=0.85,
    weight_decay=5e-4, batch_size=128, pad_fill=0.0,
    label_smoothing=0.4, weight_average=0.9995,
    val_examples=1000, keep_best=True, eval_attack="pgd20",
    source="FastAT Benchmark: configs/cifar10/common.yaml and <method>.yaml, main.py, fast_at/at_base.py",
    per_method=FASTAT_METHOD_CONFIG,
)

APART = Protocol(
    name="apart", title="APART paper (CIFAR-10)",
    model="preactresnet18", model_kwargs={"normalize": False},
    epochs=30, lr=0.2, schedule="cyclic", momentum=0.9, momentum_low=0.8,
    weight_decay=2e-4, batch_size=128, pad_fill=0.5,
    label_smoothing=0.0, weight_average=None,
    val_examples=None, keep_best=False, eval_attack="pgd20",
    source="APART: train.py, cifar_dataloader.py",
    # the averaged weights are what PGD-AT-WA is, whatever the recipe
    per_method={"pgd-at-wa": {"weight_average": 0.9995}},
)

PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({p.name: p for p in (FASTAT, APART)})
"""The known protocols, by name: ``"fastat"`` and ``"apart"``."""

_EVAL_ATTACKS = {"pgd20": pgd20}


def get_protocol(protocol: Any) -> Protocol:
    """``protocol`` itself when it is a :class:`Protocol`, else the known
    protocol of that name; ``ValueError`` naming the known ones otherwise."""
    if isinstance(protocol, Protocol):
        return protocol
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def method_settings(protocol: Any, method_name: str) -> Dict[str, Any]:
    """The protocol's per-method settings for the registered method
    ``method_name``: its module's ``FASTAT_CONFIG`` (for ``"fastat"``) or
    the protocol's own table, over the protocol's defaults. Keys:
    ``label_smoothing``, ``weight_average``, ``lr``, ``total_epoch``."""

    protocol = get_protocol(protocol)
    method = get_method(method_name)
    settings: Dict[str, Any] = {"label_smoothing": protocol.label_smoothing,
                                "weight_average": protocol.weight_average,
                                "lr": protocol.lr, "total_epoch": protocol.epochs}
    own = getattr(importlib.import_module(method.trainer.__module__), "FASTAT_CONFIG", None)
    if protocol.name == "fastat" and isinstance(own, Mapping):
        settings.update({k: v for k, v in own.items() if k in _METHOD_KEYS})
    else:
        settings.update(protocol.per_method.get(method_name, {}))
    return settings


def protocol_kwargs(protocol: Any, method_name: str) -> Dict[str, Any]:
    """The :class:`Trainer` keywords of ``protocol`` for the registered
    method ``method_name`` (the epochs and learning rate its config gives;
    the schedules are set on the built trainer by
    :func:`apply_protocol_schedule`, since a preset may turn ``epochs`` into
    a different number of passes). ``"callbacks"`` is absent: with
    ``keep_best`` the best-model monitor is added by
    :func:`build_protocol_trainer`."""
    protocol = get_protocol(protocol)
    settings = method_settings(protocol, method_name)
    return dict(epochs=settings["total_epoch"], lr=settings["lr"], momentum=protocol.momentum,
                weight_decay=protocol.weight_decay, batch_size=protocol.batch_size, pad_fill=protocol.pad_fill,
                label_smoothing=settings["label_smoothing"], weight_average=settings["weight_average"],
                val_examples=protocol.val_examples, eval_attack=_EVAL_ATTACKS[protocol.eval_attack]())


def apply_protocol_schedule(trainer: Trainer, protocol: Any) -> Trainer:
    """Set ``trainer``'s learning-rate and momentum schedules to the
    protocol's, over the trainer's own peak rate and number of epochs (its
    passes over the data); returns ``trainer``."""
    protocol = get_protocol(protocol)
    epochs = check_positive_int(trainer.epochs, "epochs")
    if protocol.schedule == "onecycle-per-epoch":
        trainer.lr_schedule = one_cycle_per_epoch(trainer.lr, epochs)
        trainer.momentum_schedule = one_cycle_momentum_per_epoch(epochs, high=protocol.momentum,
                                                                 low=protocol.momentum_low)
    else:
        trainer.lr_schedule = triangular(trainer.lr, epochs)
        trainer.momentum_schedule = cyclic_momentum(epochs, high=protocol.momentum, low=protocol.momentum_low)
    return trainer


def build_protocol_trainer(protocol: Any, method_name: str, model: Optional[nn.Module] = None, *,
                           num_classes: int = 10, **overrides: Any) -> Trainer:
    """The registered method ``method_name``'s Trainer under ``protocol``
    (a name in :data:`PROTOCOLS` or a :class:`Protocol`).

    ``model``: the network to train; ``None`` builds the protocol's
    (``protocol.model`` with ``protocol.model_kwargs`` and ``num_classes``
    outputs). ``overrides``: Trainer or method keywords that win over the
    protocol (``epochs=10``, ``eps=...``). The protocol's schedule is
    rebuilt for the final epochs and peak rate; a ``schedule`` or
    ``momentum_schedule`` in ``overrides`` replaces it (a ``schedule`` alone
    leaves momentum constant at ``momentum``). With ``keep_best`` the
    trainer gets a :class:`~advtrain.diagnostics.RobustnessDropMonitor` that
    keeps the model of best validation PGD accuracy (``best.pt`` in
    ``run_dir``, or in memory), unless ``callbacks`` is overridden.
    """

    protocol = get_protocol(protocol)
    method = get_method(method_name)
    if model is None:
        model = build_model(protocol.model, num_classes=num_classes, **protocol.model_kwargs)
    kwargs = protocol_kwargs(protocol, method_name)
    if protocol.keep_best:
        from ..diagnostics import RobustnessDropMonitor

        kwargs["callbacks"] = [RobustnessDropMonitor()]
    kwargs.update(overrides)
    trainer = method.build(model, **kwargs)
    if "schedule" not in overrides and "momentum_schedule" not in overrides:
        apply_protocol_schedule(trainer, protocol)
    return trainer


def describe_protocol(protocol: Any, method_name: str) -> str:
    """One line saying what ``protocol`` sets for ``method_name`` beyond the
    run's size (model and epochs, which a scale or an argument may change and
    the Trainer's startup line reports), for the start of a run."""
    protocol = get_protocol(protocol)
    s = method_settings(protocol, method_name)
    wa = "none" if s["weight_average"] is None else f"tau {s['weight_average']}"
    val = (f"{protocol.val_examples} held-out validation images, best by validation PGD-10"
           if protocol.val_examples else "no validation split")
    return (f"protocol {protocol.name} ({protocol.title}): {protocol.schedule} lr {s['lr']}, momentum {protocol.momentum}/{protocol.momentum_low}, "
            f"weight decay {protocol.weight_decay}, batch {protocol.batch_size}, label smoothing "
            f"{s['label_smoothing']}, weight average {wa}, {val}")


__all__ = ["FASTAT_METHOD_CONFIG", "PROTOCOLS", "Protocol", "SCHEDULES", "apply_protocol_schedule",
           "build_protocol_trainer", "describe_protocol", "get_protocol", "method_settings", "protocol_kwargs"]

"""The one table of training methods: each method's name, its Trainer preset
(which holds the paper's defaults), its docs page and its cost model.

The command line's ``--method`` choices, ``advtrain bench``, the benchmark
suite and the docs tests all read :data:`METHODS`. Adding a method is one
module (its policy and preset) plus one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from ..training import presets
from ..training.trainer import Trainer
from .free_at import FreeATTrainer
from .gradalign import GradAlignTrainer
from .mart import MARTTrainer
from .trades import TRADESTrainer


@dataclass(frozen=True)
class Passes:
    """Passes through the model per training example and optimizer step, the
    inputs of the cost model: ``forward`` passes, ``input_backward`` passes
    (gradients to the input or perturbation sites only, no weight gradients)
    and ``full_backward`` passes (weight gradients too)."""

    forward: float
    input_backward: float
    full_backward: float

    @property
    def cost(self) -> float:
        """The step's cost in units of one forward pass F: a forward and an
        input-only backward cost about F each, a full backward about 2F."""
        return self.forward + self.input_backward + 2 * self.full_backward


@dataclass(frozen=True)
class Method:
    """One registered training method.

    ``name``: the registry and command-line name. ``title``: how docs and
    tables name it. ``trainer``: its preset, a :class:`Trainer` subclass (or
    ``Trainer`` itself) whose constructor holds the paper's defaults.
    ``doc``: its docs page, relative to the repository root. ``passes``: the
    cost model, a function of the method's options (e.g. PGD's ``steps``)
    giving :class:`Passes`. ``options``: the preset keywords beyond the
    Trainer's that the command line may set (``"steps"``, ``"eps"``).
    ``compiles``: whether ``compile=True`` is supported.
    """

    name: str
    title: str
    trainer: Callable[..., Trainer]
    doc: str
    passes: Callable[..., Passes]
    options: Tuple[str, ...] = ("eps",)
    compiles: bool = True

    def build(self, model: Any, **kwargs: Any) -> Trainer:
        """The method's Trainer for ``model``; ``kwargs`` override the defaults."""
        return self.trainer(model, **kwargs)


def _single_step(**_: Any) -> Passes:
    return Passes(forward=2, input_backward=1, full_backward=1)


def _multi_step(steps: int = 10, **_: Any) -> Passes:
    return Passes(forward=steps + 1, input_backward=steps, full_backward=1)


def _atta(steps: int = 1, **_: Any) -> Passes:
    return _multi_step(steps)


def _trades(steps: int = 10, **_: Any) -> Passes:
    # attack: the clean prediction once (eval mode), then a forward and an
    # input backward per step; loss: clean and adversarial forwards, and the
    # one backward runs through both of them
    return Passes(forward=steps + 3, input_backward=steps, full_backward=2)


def _mart(steps: int = 10, **_: Any) -> Passes:
    # attack: a forward and an input backward per step; loss: clean and
    # adversarial forwards, and the one backward runs through both of them
    return Passes(forward=steps + 2, input_backward=steps, full_backward=2)


def _gradalign(**_: Any) -> Passes:
    # attack: the clean forward and its input backward (whose gradient is also
    # the cosine's fixed side); loss: the training forward, the noisy point's
    # forward and input backward with create_graph; the one backward runs
    # through the training pass (a full backward) and through the noisy
    # point's forward-and-backward graph, the double backward, which costs
    # about two full backward passes
    return Passes(forward=3, input_backward=2, full_backward=3)


def _free_at(**_: Any) -> Passes:
    # per optimizer step, `replays` of them per batch: one forward and one
    # backward that gives the weight gradients and the input gradient at once
    return Passes(forward=1, input_backward=0, full_backward=1)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("standard", "Standard training", Trainer, "docs/concepts.md",
           lambda **_: Passes(forward=1, input_backward=0, full_backward=1), options=()),
    Method("fgsm", "FGSM", presets.FGSMTrainer, "docs/methods/fgsm.md", _single_step),
    Method("fgsm-rs", "FGSM-RS (Fast-AT)", presets.FastATTrainer, "docs/methods/fgsm_rs.md", _single_step),
    Method("nfgsm", "N-FGSM", presets.NFGSMTrainer, "docs/methods/nfgsm.md", _single_step),
    Method("pgd", "PGD-k", presets.PGDTrainer, "docs/methods/pgd.md", _multi_step, options=("eps", "steps")),
    Method("atta", "ATTA-k", presets.ATTATrainer, "docs/methods/atta.md", _atta,
           options=("eps", "steps", "reset_every", "store_dtype")),
    Method("apart", "APART", presets.APARTTrainer, "docs/methods/apart.md", _single_step,
           options=("eps", "step_lr", "step_lr_rule", "step_weight_decay", "init_step", "init_scale",
                    "layerwise", "sites", "store_dtype")),
    Method("gradalign", "GradAlign", GradAlignTrainer, "docs/methods/gradalign.md", _gradalign,
           options=("eps", "lam"), compiles=False),
    Method("free-at", "Free-AT", FreeATTrainer, "docs/methods/free_at.md", _free_at, options=("eps", "replays")),
    Method("trades", "TRADES", TRADESTrainer, "docs/methods/trades.md", _trades, options=("eps", "steps")),
    Method("mart", "MART", MARTTrainer, "docs/methods/mart.md", _mart, options=("eps", "steps")),
)}
"""Every training method, by name."""


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` naming the known
    ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> List[str]:
    """The registered methods' names, in registry order."""
    return list(METHODS)


__all__ = ["METHODS", "Method", "Passes", "get_method", "method_names"]

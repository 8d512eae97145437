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
from .aaer import NAAERTrainer, RSAAERTrainer
from .elle import ELLEATrainer, ELLETrainer
from .fgsm_cuap import FGSMCUAPTrainer
from .fgsm_fuap import FGSMFUAPTrainer
from .fgsm_mep_cs import FGSMMEPCSTrainer
from .fgsm_pco import FGSMPCOTrainer
from .fgsm_pgi import FGSMPGITrainer
from .fgsm_rs_cs import FGSMRSCSTrainer
from .fgsm_uap import FGSMUAPTrainer
from .free_at import FreeATTrainer
from .gat import GATTrainer
from .gradalign import GradAlignTrainer
from .liet import LIETTrainer
from .mart import MARTTrainer
from .pgd_at_wa import PGDATWATrainer
from .nuat import NuATTrainer
from .ssat import SSATTrainer
from .trades import TRADESTrainer
from .zerograd import MultiGradTrainer, ZeroGradTrainer


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
    giving :class:`Passes`; every one also takes the epoch's ``batch_size``
    and ``examples``, which matter where a pass runs once per several steps
    (LIET's). ``options``: the preset keywords beyond the
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


def _elle(**_: Any) -> Passes:
    # attack: FGSM's forward and input backward; loss: the training forward
    # and one forward of the 3 linearity points per example; the one backward
    # runs through all four (no double backward)
    return Passes(forward=5, input_backward=1, full_backward=4)


def _guided_single_step(**_: Any) -> Passes:
    # NuAT and GAT. attack: the clean forward (no graph), the forward at the
    # Bernoulli start and its input backward; loss: adversarial and clean
    # forwards, and the one backward runs through both of them
    return Passes(forward=4, input_backward=1, full_backward=2)


def _ssat(divisions: int = 3, **_: Any) -> Passes:
    # attack: the forward at the random start and its input backward, then
    # one eval-mode forward (no graph) per checkpoint k/c, k < c, of every
    # example; loss: the training forward and its full backward
    return Passes(forward=divisions + 1, input_backward=1, full_backward=1)


def _zerograd(steps: int = 1, **_: Any) -> Passes:
    return _multi_step(steps)


def _multigrad(samples: int = 3, **_: Any) -> Passes:
    # attack: a forward and an input backward per random sample; loss: the
    # training forward and its full backward
    return _multi_step(samples)


def _universal_fgsm(**_: Any) -> Passes:
    # FGSM-UAP and FGSM-CUAP. attack: the forward at the UAP start and its
    # input backward; loss: the start's and the FGSM point's forwards, and
    # the one backward runs through both (the consistency term)
    return Passes(forward=3, input_backward=1, full_backward=2)


def _fgsm_fuap(**_: Any) -> Passes:
    # FGSM-UAP's passes plus the feature forward (no graph) at the random
    # start that picks each example's UAP
    return Passes(forward=4, input_backward=1, full_backward=2)


def _fgsm_pgi(**_: Any) -> Passes:
    # loss: the training forward at the prior (its input backward, graph
    # kept, gives the FGSM direction) and at the FGSM point; the one backward
    # runs through both (the output-distance term)
    return Passes(forward=2, input_backward=1, full_backward=2)


def _fgsm_pco(**_: Any) -> Passes:
    # loss: the training forwards at the prior (with its input backward, graph
    # kept), at the confidence-weighted mix and at the FGSM point; the one
    # backward runs through all three (the consistency term and the weights)
    return Passes(forward=3, input_backward=1, full_backward=3)


def _cs(**_: Any) -> Passes:
    # FGSM-MEP-CS and FGSM-RS-CS. attack: the forward at the prior or random
    # start and its input backward; loss: the adversarial and the clean (start)
    # forwards, and the one backward runs through both (the CS term, weight 0
    # in the steps where it is off)
    return Passes(forward=3, input_backward=1, full_backward=2)


def _liet(li_every: int = 20, num_classes: int = 10, batch_size: int = 128, examples: int = 50_000,
          **_: Any) -> Passes:
    # per step: the attack's start and the training forward (the attack's
    # input backward runs through the first), and the one backward through
    # both; per epoch of `examples` in batches of `batch_size`, every
    # li_every-th step, a forward and an input backward of the num_classes
    # grey images, spread over the epoch's examples
    steps = -(-examples // batch_size)
    probes = num_classes * -(-steps // li_every) / examples
    return Passes(forward=2 + probes, input_backward=1 + probes, full_backward=2)


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
    Method("pgd-at-wa", "PGD-AT-WA", PGDATWATrainer, "docs/methods/pgd_at_wa.md", _multi_step,
           options=("eps", "steps")),
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
    Method("n-aaer", "N-AAER", NAAERTrainer, "docs/methods/n_aaer.md", _single_step,
           options=("eps", "step_size", "lam1", "lam2", "lam3")),
    Method("rs-aaer", "RS-AAER", RSAAERTrainer, "docs/methods/rs_aaer.md", _single_step,
           options=("eps", "step_size", "lam1", "lam2", "lam3")),
    Method("liet", "LIET", LIETTrainer, "docs/methods/liet.md", _liet, options=("eps", "lam", "li_every")),
    Method("nuat", "NuAT", NuATTrainer, "docs/methods/nuat.md", _guided_single_step, options=("eps", "lam_max")),
    Method("gat", "GAT", GATTrainer, "docs/methods/gat.md", _guided_single_step, options=("eps", "lam")),
    Method("elle", "ELLE", ELLETrainer, "docs/methods/elle.md", _elle, options=("eps", "lam")),
    Method("elle-a", "ELLE-A", ELLEATrainer, "docs/methods/elle_a.md", _elle,
           options=("eps", "lam_aux", "lam_decay", "sensitivity")),
    Method("ssat", "SSAT", SSATTrainer, "docs/methods/ssat.md", _ssat, options=("eps", "step_size", "divisions")),
    Method("zerograd", "ZeroGrad", ZeroGradTrainer, "docs/methods/zerograd.md", _zerograd,
           options=("eps", "quantile", "steps", "step_size", "random_start")),
    Method("multigrad", "MultiGrad", MultiGradTrainer, "docs/methods/multigrad.md", _multigrad,
           options=("eps", "samples", "min_agree", "step_size")),
    Method("fgsm-uap", "FGSM-UAP", FGSMUAPTrainer, "docs/methods/fgsm_uap.md", _universal_fgsm,
           options=("eps", "uap_eps", "lam", "momentum_decay")),
    Method("fgsm-cuap", "FGSM-CUAP", FGSMCUAPTrainer, "docs/methods/fgsm_cuap.md", _universal_fgsm,
           options=("eps", "uap_eps", "lam", "momentum_decay")),
    Method("fgsm-fuap", "FGSM-FUAP", FGSMFUAPTrainer, "docs/methods/fgsm_fuap.md", _fgsm_fuap,
           options=("eps", "uap_eps", "lam", "momentum_decay", "uap_num", "feature_lr")),
    Method("fgsm-pgi", "FGSM-PGI", FGSMPGITrainer, "docs/methods/fgsm_pgi.md", _fgsm_pgi,
           options=("eps", "lam", "momentum_decay", "reset_every", "store_dtype")),
    Method("fgsm-pco", "FGSM-PCO", FGSMPCOTrainer, "docs/methods/fgsm_pco.md", _fgsm_pco,
           options=("eps", "lam", "factor", "store_dtype")),
    Method("fgsm-mep-cs", "FGSM-MEP-CS", FGSMMEPCSTrainer, "docs/methods/fgsm_mep_cs.md", _cs,
           options=("eps", "momentum_decay", "reset_every", "factor", "gamma", "w2", "store_dtype")),
    Method("fgsm-rs-cs", "FGSM-RS-CS", FGSMRSCSTrainer, "docs/methods/fgsm_rs_cs.md", _cs,
           options=("eps", "factor", "gamma", "w2")),
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

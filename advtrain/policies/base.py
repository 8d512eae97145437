"""The :class:`PerturbationPolicy` interface: how a Trainer gets the input (and
optional layer perturbations) to train on for each batch, and the training
loss computed from it."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.sites import SiteDelta
from ..utils.precision import at_least_float32


@dataclass(frozen=True)
class PolicyContext:
    """What a policy learns about the training run before the first batch.

    ``num_examples``: size of the training split (per-example stores are indexed
    by dataset index in ``[0, num_examples)``). ``image_shape``: (C, H, W).
    ``padding``: crop padding of the loader's augmentation (stores live in
    padded coordinates). ``epochs`` and ``steps_per_epoch``: for schedules.
    ``device``: where batches arrive. ``shard`` / ``num_shards``: in a
    distributed run this process only sees the examples with
    ``index % num_shards == shard`` and keeps per-example state for those only.
    """

    num_examples: int
    image_shape: Tuple[int, int, int]
    padding: int
    epochs: int
    steps_per_epoch: int
    device: torch.device
    shard: int = 0
    num_shards: int = 1


@dataclass
class Perturbation:
    """What to train on for one batch.

    ``x``: the (perturbed) input, pixels in [0, 1], shape of the batch. It may
    carry an autograd graph back to the policy's learnable parameters (APART).
    ``sites``: additive perturbations for named perturbation sites (tensors or
    :class:`~advtrain.models.ScaledDirection`), applied in the training
    forward pass (empty for input-only policies).
    ``extras``: anything the policy wants handed back in :meth:`after_step`.
    """

    x: Tensor
    sites: Dict[str, SiteDelta] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossContext:
    """What :meth:`PerturbationPolicy.loss` computes the training loss with.

    ``forward(x, sites=None)``: the training forward pass — the model in train
    mode (compiled or data-parallel as the Trainer is configured, under its
    autocast), with the given site perturbations applied for this call only.
    Every pass whose weight gradients should count goes through it; it may be
    called several times per step (TRADES: clean and adversarial).
    ``label_smoothing``: the Trainer's label smoothing, which
    :meth:`cross_entropy` applies.
    """

    forward: Callable[..., Tensor]
    label_smoothing: float = 0.0

    def cross_entropy(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of ``logits`` against class indices ``y`` with the
        run's label smoothing, computed in at least float32 (bf16 logits are
        widened, float64 ones kept)."""
        return F.cross_entropy(at_least_float32(logits), y, reduction=reduction, label_smoothing=self.label_smoothing)


@dataclass
class TrainingLoss:
    """A policy's training loss for one step: ``loss`` (a scalar the Trainer
    backpropagates) and ``logits`` (the (N, classes) outputs on the training
    input that the epoch's training accuracy counts)."""

    loss: Tensor
    logits: Tensor


class PerturbationPolicy(abc.ABC):
    """Stateful training-time perturbation and the training objective.

    Call order, per training run: :meth:`setup` once (with the plain model:
    never a compiled or data-parallel wrapper, so site names are the model's
    own); then per epoch :meth:`start_epoch`; per batch, :attr:`replays` times
    (1 for every method but Free-AT): :meth:`perturb`, :meth:`loss`, the
    backward of that loss (the Trainer averages the gradients of
    :meth:`parameters` across processes in a distributed run), the model's
    optimizer step, then :meth:`after_step`. When ``after_step`` runs, the
    gradients of the training loss with respect to ``Perturbation.x`` (if it
    required grad and called ``retain_grad``) and to :meth:`parameters` are
    populated.

    ``perturb`` and ``after_step`` get the module to run attack passes
    through: it shares the plain model's parameters and sites, but may be a
    compiled view whose backward computes no weight gradients. Address sites
    on the plain model given to :meth:`setup`.

    A policy owns its learnable parameters, their optimizer and any per-example
    state; everything needed to resume is in :meth:`state_dict`.
    Per-example state is keyed by ``Batch.index`` (dataset index), never by
    position in a batch.
    """

    #: Optimizer steps per batch: each replays perturb, loss, step and
    #: after_step on the same batch (Free-AT's m); the Trainer's schedules
    #: count every replay as an iteration.
    replays: int = 1
    #: Whether the training step can run under ``torch.compile``; a policy
    #: whose loss needs a double backward says False, and
    #: ``Trainer(compile=True)`` refuses it.
    compilable: bool = True


    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        """Allocate state for a training run (called by the Trainer before the
        first batch, and again before loading a checkpoint)."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch (0-based)."""

    @abc.abstractmethod
    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        """Return what to train on for ``batch``. Must leave the model's
        parameters' ``.grad`` untouched and its train/eval flags as found."""

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        """The training loss of ``batch`` given its ``perturbation``. The
        default: cross-entropy (with the run's label smoothing) of the
        training forward on ``perturbation.x`` with ``perturbation.sites``
        applied. Methods with another objective (TRADES, MART, GradAlign)
        override it."""
        logits = context.forward(perturbation.x, perturbation.sites)
        return TrainingLoss(context.cross_entropy(logits, batch.y), logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        """Update the policy's own state after the model step."""

    def parameters(self) -> List[Tensor]:
        """The policy's learnable tensors (empty for fixed policies)."""
        return []

    def metrics(self) -> Dict[str, float]:
        """Scalars to record in the per-epoch history (e.g. learned step sizes)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the policy exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after :meth:`setup`).

        This base version checks that ``state`` has exactly the keys of this
        policy's :meth:`state_dict` and raises a ``ValueError`` naming the
        missing and unexpected ones (a state of another policy type, or an
        incomplete one); policies with state call it before loading."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{type(self).__name__} state must be a mapping, got {type(state).__name__}")
        expected, given = set(self.state_dict()), set(state)
        problems = []
        if expected - given:
            problems.append(f"missing keys {sorted(map(str, expected - given))}")
        if given - expected:
            problems.append(f"unexpected keys {sorted(map(str, given - expected))}")
        if problems:
            raise ValueError(f"the state does not fit {type(self).__name__} ({'; '.join(problems)}): "
                             "it was saved by another perturbation policy, or is incomplete")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


__all__ = ["LossContext", "PolicyContext", "Perturbation", "PerturbationPolicy", "TrainingLoss"]

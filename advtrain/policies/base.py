"""The :class:`PerturbationPolicy` interface: how a Trainer gets the input (and
optional layer perturbations) to train on for each batch."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.sites import SiteDelta


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


class PerturbationPolicy(abc.ABC):
    """Stateful training-time perturbation.

    Call order, per training run: :meth:`setup` once; then per epoch
    :meth:`start_epoch`; per batch :meth:`perturb`, the Trainer's forward (with
    ``Perturbation.sites`` applied) and backward on the training loss, the
    model's optimizer step, then :meth:`after_step`. When ``after_step`` runs,
    the gradients of the training loss with respect to ``Perturbation.x`` (if it
    required grad and called ``retain_grad``) and to :meth:`parameters` are
    populated.

    A policy owns its learnable parameters, their optimizer and any per-example
    state; everything needed to resume is in :meth:`state_dict`.
    Per-example state is keyed by ``Batch.index`` (dataset index), never by
    position in a batch.
    """


    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        """Allocate state for a training run (called by the Trainer before the
        first batch, and again before loading a checkpoint)."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch (0-based)."""

    @abc.abstractmethod
    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        """Return what to train on for ``batch``. Must leave the model's
        parameters' ``.grad`` untouched and its train/eval flags as found."""

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


__all__ = ["PolicyContext", "Perturbation", "PerturbationPolicy"]

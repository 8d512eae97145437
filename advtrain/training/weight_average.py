"""Weight averaging: an exponential moving average (EMA) of a model's weights,
updated after every optimizer step, as the FastAT Benchmark trains every
method (τ = 0.9995 per step).

:class:`WeightAverage` keeps the averaged copy of the model;
:func:`evaluation_weights` picks the weights of a checkpoint that an
evaluation should use (the averaged ones when the run kept an average).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

#: The weights a checkpoint can hand to an evaluation.
WEIGHTS = ("raw", "averaged")


class WeightAverage:
    """An EMA of a model's parameters and floating-point buffers, for
    ``Trainer(weight_average=...)``.

    :meth:`attach` makes the averaged copy (:attr:`module`, in eval mode,
    without gradients); :meth:`update`, called after every optimizer step,
    moves it towards the live model::

        avg ← τ_t · avg + (1 − τ_t) · live

    The first update copies the live weights: the average starts from the
    weights after the first step, as in the FastAT Benchmark's code. After
    that, τ_t = ``tau`` (``warmup=False``: the benchmark's rule), or
    τ_t = min(``tau``, (1 + t) / (10 + t)) with t the number of updates so far
    (``warmup=True``: the rule of TensorFlow's ``ExponentialMovingAverage``),
    which lets a short run's average forget its first weights sooner.

    BatchNorm running mean and variance are *averaged* like the weights, as
    the benchmark averages every entry of the model's state: the averaged
    statistics then cover the same horizon (about 1 / (1 − τ) steps) as the
    averaged weights they normalize, where the live model's follow its last
    few batches. Integer buffers (BatchNorm's ``num_batches_tracked``) are
    copied from the live model.

    ``torch.optim.swa_utils.AveragedModel`` is not used: its update reads its
    update counter on the host twice per call (a device synchronisation every
    step on a GPU) and averages integer buffers in floating point, which
    truncates them. Here the counter is a Python int and each update is two
    fused ``torch._foreach`` kernels per dtype, with no host synchronisation.

    Args:
        tau: the per-step decay τ, in (0, 1); the average's horizon is about
            1 / (1 − τ) steps (2,000 at 0.9995).
        warmup: use τ_t = min(τ, (1 + t) / (10 + t)) instead of τ.
    """

    def __init__(self, tau: float = 0.9995, *, warmup: bool = False) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and 0 < tau < 1):
            raise ValueError(f"tau must be a number in (0, 1) (the per-step decay, e.g. 0.9995), got {tau!r}")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be a bool, got {type(warmup).__name__}")
        self.tau = float(tau)
        self.warmup = warmup
        self.updates = 0
        self.module: Optional[nn.Module] = None
        """The averaged model (after :meth:`attach`), in eval mode, without gradients."""

    def attach(self, model: nn.Module) -> None:
        """Make the averaged copy of ``model`` (its current weights, until
        the first :meth:`update` copies the live ones) and restart the count."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        module = copy.deepcopy(model)
        for p in module.parameters():
            p.grad = None
            p.requires_grad_(False)
        self.module = module.eval()
        self.updates = 0

    def decay(self) -> float:
        """τ_t of the next :meth:`update` (0 for the first: it copies)."""
        t = self.updates
        if t == 0:
            return 0.0
        return min(self.tau, (1 + t) / (10 + t)) if self.warmup else self.tau

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the attached model, after an
        optimizer step). No host synchronisation."""
        floats, ints = self._pairs(model)
        decay = self.decay()
        if floats[0]:
            if decay == 0.0:
                torch._foreach_copy_(floats[0], floats[1])
            else:
                torch._foreach_lerp_(floats[0], floats[1], 1.0 - decay)
        if ints[0]:
            torch._foreach_copy_(ints[0], ints[1])
        self.updates += 1

    def _pairs(self, model: nn.Module) -> Tuple[Tuple[List[Tensor], List[Tensor]], Tuple[List[Tensor], List[Tensor]]]:
        """(averaged, live) tensor lists: floating-point parameters and
        buffers, then the other buffers."""
        if self.module is None:
            raise RuntimeError("WeightAverage.update needs attach(model) first")
        mine = list(self.module.parameters()) + list(self.module.buffers())
        live = list(model.parameters()) + list(model.buffers())
        if len(mine) != len(live):
            raise ValueError(f"model has {len(live)} parameters and buffers, the average {len(mine)}: "
                             "update the model that was attached")
        floats: Tuple[List[Tensor], List[Tensor]] = ([], [])
        ints: Tuple[List[Tensor], List[Tensor]] = ([], [])
        for a, b in zip(mine, live):
            target = floats if a.is_floating_point() or a.is_complex() else ints
            target[0].append(a.detach())
            target[1].append(b.detach())
        return floats, ints

    # ------------------------------------------------------------------ state
    def config(self) -> Dict[str, Any]:
        """The settings as plain values (recorded in ``Trainer.config()``)."""
        return {"tau": self.tau, "warmup": self.warmup}

    def state_dict(self) -> Dict[str, Any]:
        """The averaged model's state and the update count."""
        if self.module is None:
            raise RuntimeError("WeightAverage.state_dict needs attach(model) first")
        return {"updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after :meth:`attach`)."""
        if self.module is None:
            raise RuntimeError("WeightAverage.load_state_dict needs attach(model) first")
        if set(state) != {"updates", "model"}:
            raise ValueError(f"weight-average state must have keys ['model', 'updates'], got {sorted(state)}")
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return f"WeightAverage(tau={self.tau}, warmup={self.warmup})"


def as_weight_average(value: Union[None, float, WeightAverage]) -> Optional[WeightAverage]:
    """``Trainer(weight_average=...)``: None, a τ, or a :class:`WeightAverage`
    whose settings the Trainer's own (fresh) average takes, so that one
    object can configure several trainers."""
    if value is None:
        return None
    if isinstance(value, WeightAverage):
        return WeightAverage(value.tau, warmup=value.warmup)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"weight_average must be None, a decay tau in (0, 1) or a WeightAverage, "
                        f"got {type(value).__name__}")
    try:
        return WeightAverage(value)
    except ValueError:
        raise ValueError(f"weight_average must be a decay tau in (0, 1) (e.g. 0.9995), got {value!r}") from None


def evaluation_weights(state: Mapping[str, Any], weights: Optional[str] = None) -> Tuple[Dict[str, Tensor], str]:
    """The model weights of a Trainer checkpoint ``state`` that an evaluation
    should use, and which they are (``"raw"`` or ``"averaged"``).

    ``weights=None`` takes the checkpoint's own choice (``eval_weights``):
    ``"averaged"`` in a run with weight averaging, and in a ``best.pt`` the
    weights that scored best; ``"raw"`` when the checkpoint records none.
    ``"averaged"`` from a checkpoint without an average raises ``ValueError``."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS} or None, got {weights!r}")
    choice = weights or str(state.get("eval_weights", "raw"))
    if choice == "averaged":
        average = state.get("weight_average")
        if average is None:
            raise ValueError("the checkpoint holds no weight average (the run trained without weight_average): "
                             "evaluate its raw weights")
        return average["model"], choice
    return state["model"], "raw"


__all__ = ["WEIGHTS", "WeightAverage", "as_weight_average", "evaluation_weights"]

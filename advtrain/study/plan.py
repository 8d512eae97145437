"""In which order a study trains its methods, and how long each will take.

Costs come from the method registry's counted passes (a forward pass F, an
input-only backward F, a full backward 2F, per example and optimizer step)
and are turned into seconds by what this study has measured so far: the
seconds per F of every epoch already trained, and the seconds of every final
evaluation already run. Before anything is measured nothing is predicted, and
the first method simply starts.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from torch import nn

from .spec import REFERENCE_METHOD

ORDERS = ("cost", "given")
"""``cost``: cheapest first, PGD-10 last (the most methods within a budget,
and the reference when there is time). ``given``: the order of the list."""

# Passes of the per-epoch PGD-20 curve per test image (21 forwards, 20 input
# backwards) and of the final evaluation's attacks before any is measured:
# PGD-20 and CW-20 on every image, APGD-CE's 100 steps on those still robust
# and APGD-T's 9 × 100 on those left (taken as a third of the images each).
CURVE_PASSES = 41.0
FINAL_EVAL_PASSES = 2 * 41.0 + 201.0 / 3 + 9 * 201.0 / 3


def epoch_cost(name: str) -> float:
    """Cost in F of one training example per epoch for the registered method
    ``name`` with its defaults: its passes per optimizer step times its
    optimizer steps per batch (Free-AT's replays)."""
    from ..methods import get_method

    method = get_method(name)
    replays = method.build(nn.Linear(1, 1), device="cpu", progress=False, verbose=False).replays
    return method.passes().cost * replays


def planned_order(methods: Sequence[str], order: str = "cost") -> List[str]:
    """``methods`` in the order a study trains them (see :data:`ORDERS`)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "given":
        return list(methods)
    costs = {name: epoch_cost(name) for name in methods}
    # PGD-10 last even when a method costs more: it is the reference row
    return sorted(methods, key=lambda n: (n == REFERENCE_METHOD, costs[n]))


@dataclass
class Estimator:
    """Seconds per F of training, from the epochs measured so far, and the
    seconds of the final evaluations measured so far."""

    train_examples: int
    eval_examples: int
    seconds_per_f: Optional[float] = None
    final_eval_seconds: Optional[float] = None

    @classmethod
    def from_measurements(cls, train_examples: int, eval_examples: int, epoch_times: Dict[str, List[float]],
                          eval_times: Sequence[float]) -> "Estimator":
        """``epoch_times``: method -> the training seconds of its epochs;
        ``eval_times``: seconds of the final evaluations done."""
        spent = sum(sum(times) for times in epoch_times.values())
        work = sum(len(times) * epoch_cost(name) * train_examples for name, times in epoch_times.items())
        return cls(train_examples, eval_examples, spent / work if work > 0 and spent > 0 else None,
                   statistics.median(eval_times) if eval_times else None)

    def epoch_seconds(self, name: str) -> Optional[float]:
        """Predicted seconds of one epoch of ``name`` with its curve point."""
        if self.seconds_per_f is None:
            return None
        work = epoch_cost(name) * self.train_examples + CURVE_PASSES * self.eval_examples
        return work * self.seconds_per_f

    def final_eval(self) -> Optional[float]:
        """Predicted seconds of one final evaluation."""
        if self.final_eval_seconds is not None:
            return self.final_eval_seconds
        if self.seconds_per_f is None:
            return None
        return FINAL_EVAL_PASSES * self.eval_examples * self.seconds_per_f

    def method_seconds(self, name: str, epochs_left: int) -> Optional[float]:
        """Predicted seconds to finish ``name``: its remaining epochs and its
        final evaluation (None before anything was measured)."""
        epoch, final = self.epoch_seconds(name), self.final_eval()
        if epoch is None or final is None:
            return None
        return epochs_left * epoch + final


__all__ = ["ORDERS", "Estimator", "epoch_cost", "planned_order"]

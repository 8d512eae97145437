"""Learning-rate (and momentum) schedules, stepped per iteration.

A schedule is a pure function of training progress measured in epochs (a
float: 2.5 is half way through the third epoch), so resuming needs nothing but
the global step count.
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence, Union

import numpy as np


class Schedule:
    """Piecewise-linear schedule through ``(epoch, value)`` knots.

    Between knots the value is interpolated linearly; before the first and after
    the last knot it is held constant.
    """

    def __init__(self, epochs: Sequence[float], values: Sequence[float]) -> None:
        if len(epochs) != len(values) or len(epochs) == 0:
            raise ValueError("a schedule needs as many knot epochs as values, at least one")
        if any(b < a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"schedule knots must be non-decreasing in epoch, got {list(epochs)}")
        self.knots = [float(e) for e in epochs]
        self.values = [float(v) for v in values]

    def __call__(self, epoch: float) -> float:
        return float(np.interp(epoch, self.knots, self.values))

    def __repr__(self) -> str:
        return f"Schedule(epochs={self.knots}, values={self.values})"


class Piecewise:
    """Step schedule: ``values[i]`` from ``boundaries[i-1]`` (epoch) on;
    ``len(values) == len(boundaries) + 1``."""

    def __init__(self, boundaries: Sequence[float], values: Sequence[float]) -> None:
        if len(values) != len(boundaries) + 1:
            raise ValueError("a piecewise schedule needs one more value than boundaries")
        if any(b < a for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"piecewise boundaries must be increasing, got {list(boundaries)}")
        self.boundaries = [float(b) for b in boundaries]
        self.steps = [float(v) for v in values]

    def __call__(self, epoch: float) -> float:
        return self.steps[bisect.bisect_right(self.boundaries, epoch)]

    def __repr__(self) -> str:
        return f"Piecewise(boundaries={self.boundaries}, values={self.steps})"


def triangular(peak: float, epochs: float, *, peak_at: float = 0.5, start: float = 0.0, end: float = 0.0) -> Schedule:
    """Cyclic (one-cycle triangle) schedule: ``start`` → ``peak`` at
    ``peak_at·epochs`` → ``end`` at ``epochs`` (Smith 2017; Wong et al. 2020)."""
    if not 0.0 < peak_at < 1.0:
        raise ValueError(f"peak_at must be in (0, 1), got {peak_at}")
    return Schedule([0.0, peak_at * epochs, epochs], [start, peak, end])


def cyclic_momentum(epochs: float, *, high: float = 0.9, low: float = 0.8, low_at: float = 0.5) -> Schedule:
    """Momentum cycled opposite to a triangular LR: ``high`` → ``low`` → ``high``."""
    return Schedule([0.0, low_at * epochs, epochs], [high, low, high])


def multistep(base: float, epochs: float, *, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> Piecewise:
    """Piecewise-constant decay by ``gamma`` at each milestone (given as a
    fraction of ``epochs``), as in Madry et al. and Rice et al."""
    return Piecewise([m * epochs for m in milestones], [base * gamma**i for i in range(len(milestones) + 1)])


ScheduleLike = Union[str, float, Schedule, Callable[[float], float]]


def make_schedule(spec: ScheduleLike, peak: float, epochs: float) -> Callable[[float], float]:
    """Resolve a schedule spec: ``"cyclic"`` (triangle to ``peak`` at mid-run),
    ``"piecewise"`` (``peak`` decayed ×0.1 at 50% and 75%), ``"constant"``, a
    number (constant), or any callable ``epoch -> value``."""
    if isinstance(spec, str):
        if spec == "cyclic":
            return triangular(peak, epochs)
        if spec == "piecewise":
            return multistep(peak, epochs)
        if spec == "constant":
            return Schedule([0.0], [peak])
        raise ValueError(f"schedule must be 'cyclic', 'piecewise', 'constant', a number or a callable; got {spec!r}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Schedule([0.0], [float(spec)])
    if callable(spec):
        return spec
    raise TypeError(f"schedule must be a string, a number or a callable, got {type(spec).__name__}")

"""Learning-rate (and momentum) schedules, stepped per iteration.

A schedule is a pure function of training progress measured in epochs (a
float: 2.5 is half way through the third epoch), so resuming needs nothing but
the global step count.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence, Tuple, Union

import numpy as np

from .._validation import check_positive_int


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


class CosineSchedule(Schedule):
    """Schedule through ``(epoch, value)`` knots that moves from each knot's
    value to the next along a half cosine, ``a + (b - a)·(1 − cos(π·t))/2``
    at fraction ``t`` of the way (flat at both knots), as the ``"cos"``
    anneal strategy of ``torch.optim.lr_scheduler.OneCycleLR`` does; held
    constant before the first and after the last knot."""

    def __call__(self, epoch: float) -> float:
        knots, values = self.knots, self.values
        if epoch <= knots[0]:
            return values[0]
        if epoch >= knots[-1]:
            return values[-1]
        i = bisect.bisect_right(knots, epoch) - 1
        t = (epoch - knots[i]) / (knots[i + 1] - knots[i])
        return values[i + 1] + (values[i] - values[i + 1]) / 2.0 * (math.cos(math.pi * t) + 1.0)

    def __repr__(self) -> str:
        return f"CosineSchedule(epochs={self.knots}, values={self.values})"


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
    fraction of ``epochs``), as in Madry et al. and Rice et al.; for
    milestones in epochs use :class:`MultiStep`."""
    return Piecewise([m * epochs for m in milestones], [base * gamma**i for i in range(len(milestones) + 1)])


def _positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def one_cycle(peak: float, epochs: float, *, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> CosineSchedule:
    """One-cycle learning rate (Smith & Topin, "Super-Convergence") as
    ``torch.optim.lr_scheduler.OneCycleLR(max_lr=peak)`` with its defaults
    (two phases, cosine anneal) shapes it: ``peak / div_factor`` at epoch 0,
    up along a half cosine to ``peak`` at ``pct_start·epochs``, down along a
    half cosine to ``peak / (div_factor · final_div_factor)`` at ``epochs``.

    A pure function of the fractional epoch. Against ``OneCycleLR`` with
    ``total_steps`` = epochs × steps per epoch, stepped every iteration, it
    lags by less than one step: torch ends its phases one step early (at
    steps ``pct_start·total_steps − 1`` and ``total_steps − 1``), so from the
    peak on iteration ``k`` here has torch's value of iteration ``k − 1``."""
    peak = _positive_number(peak, "peak")
    peak_at = _fraction(pct_start, "pct_start") * _positive_number(epochs, "epochs")
    initial = peak / _positive_number(div_factor, "div_factor")
    final = initial / _positive_number(final_div_factor, "final_div_factor")
    return CosineSchedule([0.0, peak_at, float(epochs)], [initial, peak, final])


def one_cycle_momentum(epochs: float, *, high: float = 0.95, low: float = 0.85,
                       pct_start: float = 0.3) -> CosineSchedule:
    """Momentum cycled against :func:`one_cycle`'s learning rate, ``high`` →
    ``low`` at ``pct_start·epochs`` → ``high`` along half cosines: what
    ``OneCycleLR``'s default ``cycle_momentum=True`` does to SGD's momentum
    (0.95 → 0.85 → 0.95, whatever momentum the optimizer was built with)."""
    low_at = _fraction(pct_start, "pct_start") * _positive_number(epochs, "epochs")
    return CosineSchedule([0.0, low_at, float(epochs)], [_fraction(high, "high"), _fraction(low, "low"), high])


class PerEpoch:
    """A schedule stepped once per epoch: through the whole of epoch ``e``
    (0-based; progress ``e <= epoch < e + 1``) it holds ``schedule(e)``, as a
    torch LR scheduler whose ``step()`` is called at each epoch's end sets
    the rate. Pass it as ``Trainer(schedule=...)`` or
    ``Trainer(momentum_schedule=...)``."""

    def __init__(self, schedule: Callable[[float], float]) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable of the epoch, got {type(schedule).__name__}")
        self.schedule = schedule

    def __call__(self, epoch: float) -> float:
        return float(self.schedule(float(math.floor(epoch))))

    def __repr__(self) -> str:
        return f"PerEpoch({self.schedule!r})"


def _per_epoch_cycle(start: float, middle: float, end: float, epochs: float, pct_start: float) -> PerEpoch:
    # OneCycleLR(total_steps=epochs) ends its first phase at step
    # pct_start·epochs − 1 and its second at epochs − 1; a first phase that
    # ends before step 0 (fewer than 1 / pct_start epochs) is never seen.
    turn = pct_start * epochs - 1.0
    if turn > 0.0:
        return PerEpoch(CosineSchedule([0.0, turn, epochs - 1.0], [start, middle, end]))
    return PerEpoch(CosineSchedule([turn, epochs - 1.0], [middle, end]))


def one_cycle_per_epoch(peak: float, epochs: int, *, pct_start: float = 0.3, div_factor: float = 25.0,
                        final_div_factor: float = 1e4) -> PerEpoch:
    """One-cycle learning rate stepped once per epoch, as the FastAT
    Benchmark runs it: ``torch.optim.lr_scheduler.OneCycleLR(max_lr=peak,
    total_steps=epochs)`` with ``step()`` after every epoch. Epoch ``e`` gets
    torch's rate of step ``e``: ``peak / div_factor`` in epoch 0, up along a
    half cosine to ``peak`` in epoch ``pct_start·epochs − 1``, down along a
    half cosine to ``peak / (div_factor · final_div_factor)`` in the last
    epoch, ``epochs − 1``; constant within each epoch."""
    peak = _positive_number(peak, "peak")
    epochs = check_positive_int(epochs, "epochs")
    initial = peak / _positive_number(div_factor, "div_factor")
    final = initial / _positive_number(final_div_factor, "final_div_factor")
    return _per_epoch_cycle(initial, peak, final, float(epochs), _fraction(pct_start, "pct_start"))


def one_cycle_momentum_per_epoch(epochs: int, *, high: float = 0.95, low: float = 0.85,
                                 pct_start: float = 0.3) -> PerEpoch:
    """The momentum that ``OneCycleLR(total_steps=epochs)`` stepped once per
    epoch gives SGD (its default ``cycle_momentum=True``, whatever momentum
    the optimizer was built with): ``high`` in epoch 0, along half cosines
    to ``low`` in epoch ``pct_start·epochs − 1`` and back to ``high`` in the
    last epoch; constant within each epoch. The partner of
    :func:`one_cycle_per_epoch`."""
    epochs = check_positive_int(epochs, "epochs")
    high, low = _fraction(high, "high"), _fraction(low, "low")
    return _per_epoch_cycle(high, low, high, float(epochs), _fraction(pct_start, "pct_start"))


class MultiStep:
    """Learning-rate spec: the peak rate ``lr`` until the first milestone,
    then ``lr · gamma**i`` from the ``i``-th milestone on, milestones in
    (fractional) epochs — ``torch.optim.lr_scheduler.MultiStepLR``'s curve
    with ``milestones`` in epochs. Pass it as ``Trainer(schedule=...)``;
    :func:`make_schedule` turns it into a :class:`Piecewise` of that ``lr``.
    A milestone at or past the last epoch is never reached.

    Args:
        milestones: increasing epochs, each > 0 (e.g. ``(100, 150)``).
        gamma: the factor applied at each milestone, > 0 (default 0.1).
    """

    def __init__(self, milestones: Sequence[float], gamma: float = 0.1) -> None:
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence) or not milestones:
            raise TypeError(f"milestones must be a non-empty sequence of epochs, got {milestones!r}")
        values = tuple(_positive_number(m, "milestones") for m in milestones)
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.milestones: Tuple[float, ...] = values
        self.gamma = _positive_number(gamma, "gamma")

    def resolve(self, lr: float) -> Piecewise:
        """The schedule of peak rate ``lr``."""
        return Piecewise(self.milestones, [lr * self.gamma**i for i in range(len(self.milestones) + 1)])

    def __repr__(self) -> str:
        return f"MultiStep(milestones={list(self.milestones)}, gamma={self.gamma})"


NAMES = ("cyclic", "piecewise", "constant", "onecycle")
"""The schedules :func:`make_schedule` knows by name."""

ScheduleLike = Union[str, float, Schedule, MultiStep, Callable[[float], float]]


def make_schedule(spec: ScheduleLike, peak: float, epochs: float) -> Callable[[float], float]:
    """Resolve a schedule spec: ``"cyclic"`` (triangle to ``peak`` at mid-run),
    ``"piecewise"`` (``peak`` decayed ×0.1 at 50% and 75%), ``"constant"``,
    ``"onecycle"`` (:func:`one_cycle` with ``OneCycleLR``'s defaults), a
    :class:`MultiStep` (``peak`` × γ at epoch milestones), a number
    (constant), or any callable ``epoch -> value``."""
    if isinstance(spec, str):
        if spec == "cyclic":
            return triangular(peak, epochs)
        if spec == "piecewise":
            return multistep(peak, epochs)
        if spec == "constant":
            return Schedule([0.0], [peak])
        if spec == "onecycle":
            return one_cycle(peak, epochs)
        raise ValueError(f"schedule must be one of {', '.join(map(repr, NAMES))}, a MultiStep, a number or a "
                         f"callable; got {spec!r}")
    if isinstance(spec, MultiStep):
        return spec.resolve(peak)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Schedule([0.0], [float(spec)])
    if callable(spec):
        return spec
    raise TypeError(f"schedule must be a string, a MultiStep, a number or a callable, got {type(spec).__name__}")

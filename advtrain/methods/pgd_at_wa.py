"""PGD-AT-WA: PGD-10 adversarial training (Madry et al. 2018) with an
exponential moving average of the weights (τ = 0.9995 per step), the
FastAT Benchmark's strongest multi-step baseline (its
``configs/cifar10/pgd_at_wa.yaml``, trained by the same code as PGD-AT).

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from torch import nn

from ..training.presets import EPS, PGDTrainer
from ..training.weight_average import WeightAverage

TAU = 0.9995
"""The benchmark's weight-average decay per optimizer step (horizon ≈ 2,000 steps)."""

#: The protocol-level settings of the benchmark's pgd_at_wa.yaml (ε = 8/255)
#: that differ between its methods, for the ``fastat`` protocol.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": TAU}


class PGDATWATrainer(PGDTrainer):
    """PGD-AT-WA: :class:`~advtrain.training.PGDTrainer` (random start,
    ``steps`` steps of ``step_size``, default ε/4, projection each step,
    BatchNorm in train mode while attacking) with weight averaging on:
    after every optimizer step the averaged copy moves as
    ``avg ← τ·avg + (1 − τ)·live`` (``weight_average`` = τ, default
    0.9995; a :class:`~advtrain.training.WeightAverage` for other rules),
    and evaluations report the raw and the averaged model. Defaults
    otherwise as the PGD preset: 10 steps, 30 epochs, cyclic LR to 0.2,
    momentum 0.9, weight decay 5e-4, ``pad_fill=0.0``; the benchmark's own
    recipe is the ``fastat`` protocol
    (:func:`~advtrain.methods.protocols.build_protocol_trainer`)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, steps: int = 10, step_size: Optional[float] = None,
                 weight_average: Union[float, WeightAverage] = TAU, **kwargs: Any) -> None:
        if weight_average is None:
            raise ValueError("weight_average must be a decay tau in (0, 1) or a WeightAverage: PGD-AT-WA averages "
                             "the weights (PGDTrainer is PGD-AT without an average)")
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, weight_average=weight_average, **kwargs)


__all__ = ["FASTAT_CONFIG", "PGDATWATrainer", "TAU"]

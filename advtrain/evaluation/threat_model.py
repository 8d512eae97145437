"""Checking adversarial examples against the declared threat model: inside the
ε-ball of the norm around the clean images, and inside the [0, 1] pixel box.

Distances are measured in float32, the precision the attacks keep their
perturbations in. One rounding of ``x + δ`` near a pixel value of 1 moves it
by up to half a float32 ulp (6e-8), so a perturbation projected exactly onto
the ball may measure slightly longer than ε; the check allows a relative
``RTOL`` of ε plus ``ATOL`` per pixel (``ATOL·√(C·H·W)`` in L2): about
3e-5/255 in L∞ at ε = 8/255, far below any real excursion.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from .._validation import check_choice

NORMS = ("linf", "l2")
RTOL = 1e-6
"""Allowed excess over ε, relative to ε."""
ATOL = float(torch.finfo(torch.float32).eps)
"""Allowed excess per pixel, in pixel units: one float32 ulp at 1 (1.2e-7)."""


class ThreatModelError(ValueError):
    """An attack returned images outside the declared ε-ball or outside [0, 1]."""


def threat_model_stats(x: Tensor, x_adv: Tensor, norm: str) -> Tensor:
    """``(largest distance, smallest pixel, largest pixel)`` of ``x_adv``
    against clean images ``x`` (both (N, C, H, W), pixel units), as a float32
    (3,) tensor on their device: nothing is read back to the host. The
    distance is per example in ``norm`` (``"linf"`` or ``"l2"``); NaNs
    propagate, so a non-finite ``x_adv`` fails :func:`check_threat_model`."""
    check_choice(norm, "norm", NORMS)
    if x_adv.shape != x.shape:
        raise ThreatModelError(f"the attack returned images of shape {tuple(x_adv.shape)} "
                               f"for inputs of shape {tuple(x.shape)}")
    x_adv = x_adv.detach().float()
    delta = (x_adv - x.detach().float()).flatten(1)
    distance = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(p=2, dim=1)
    lo, hi = torch.aminmax(x_adv)
    return torch.stack([distance.amax(), lo, hi])


def check_threat_model(stats: Dict[str, Tensor], eps: float, norm: str, n_pixels: int) -> None:
    """Raise :class:`ThreatModelError` if any attack's batch statistics
    (name -> :func:`threat_model_stats`) leave the threat model ``eps``
    (pixel units) in ``norm`` for images of ``n_pixels`` values each, or
    [0, 1]. Reads all of them back in one host synchronisation."""
    if not stats:
        return
    atol = ATOL if norm == "linf" else ATOL * math.sqrt(n_pixels)
    label = "L∞" if norm == "linf" else "L2"
    declared = f"{label} eps = {eps * 255:.6g}/255 ({eps:.6g})"
    for name, (distance, lo, hi) in zip(stats, torch.stack(list(stats.values())).tolist()):
        problems = []
        # written as "not <=" so that a NaN fails too
        if not distance <= eps * (1 + RTOL) + atol:
            problems.append(f"moved an example by {distance * 255:.6g}/255 ({distance:.6g}) in {label}")
        if not (lo >= -ATOL and hi <= 1 + ATOL):
            problems.append(f"returned pixels in [{lo:.6g}, {hi:.6g}], outside [0, 1]")
        if problems:
            raise ThreatModelError(
                f"attack {name!r} {' and '.join(problems)}: its adversarial examples leave the declared threat "
                f"model ({declared}, pixels in [0, 1]), so they are not counted. Give the attack the same eps and "
                "norm with projection onto the ball, or declare the threat model it attacks in")


__all__ = ["ThreatModelError", "threat_model_stats", "check_threat_model", "RTOL", "ATOL", "NORMS"]

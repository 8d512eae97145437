"""Free adversarial training (Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer,
Davis, Taylor & Goldstein, NeurIPS 2019, "Adversarial Training for Free!"):
each batch is replayed m times, and the one backward pass of every replay
gives both the weight gradients and the input gradient that grows the
perturbation, which is carried from replay to replay and from batch to batch.

Images are pixels in [0, 1]; ε and the step are in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, check_radius
from ..data.batch import Batch
from ..policies.base import Perturbation, PerturbationPolicy, PolicyContext
from ..training.trainer import Trainer

EPS = 8 / 255


class FreeATPolicy(PerturbationPolicy):
    """Free-AT's perturbation: one tensor δ of the batch's shape, zero at the
    start of training and never reset.

    Per optimizer step (``replays`` = m of them per batch, see
    :attr:`PerturbationPolicy.replays`): the Trainer trains on
    ``x' = clip₀¹(x + δ)`` (``x'`` requires grad), its one backward gives the
    weight gradients and ``g = ∇ₓ' CE``, then :meth:`after_step` sets
    ``δ ← clip(δ + step_size·sign(g), −ε, ε)``. A batch smaller than δ (the
    last of an epoch) uses and updates δ's first rows; a larger one extends δ
    with zero rows. δ is kept in the dtype of the first batch and is in
    :meth:`state_dict`, so a resumed run continues it exactly.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        replays: m, optimizer steps per batch (8 in the paper's CIFAR-10 runs).
        step_size: the step of δ, pixel units; ``None`` means ``eps``.
    """

    def __init__(self, eps: float = EPS, *, replays: int = 8, step_size: Optional[float] = None) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.replays = check_positive_int(replays, "replays")
        self.step_size = self.eps if step_size is None else float(check_radius(step_size, "step_size"))
        self.delta: Optional[Tensor] = None
        self.device = torch.device("cpu")

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.delta = None  # allocated with the first batch, whose size the context does not know
        self.device = context.device

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        x = batch.x
        n = x.shape[0]
        if self.delta is None:
            self.delta = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        elif n > self.delta.shape[0]:
            extra = self.delta.new_zeros((n - self.delta.shape[0],) + tuple(self.delta.shape[1:]))
            self.delta = torch.cat([self.delta, extra])
        return Perturbation(x=torch.clamp(x + self.delta[:n], 0.0, 1.0).requires_grad_(True))

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        grad = perturbation.x.grad
        if grad is None or self.delta is None:
            raise RuntimeError("Free-AT needs the training loss's backward pass through its input before after_step")
        n = grad.shape[0]
        with torch.no_grad():
            step = self.delta[:n] + self.step_size * grad.sign()
            self.delta[:n] = torch.clamp(step, -self.eps, self.eps)

    def state_dict(self) -> Dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        delta = state["delta"]
        self.delta = None if delta is None else delta.detach().to(self.device).clone()

    def __repr__(self) -> str:
        return f"FreeATPolicy(eps={self.eps!r}, replays={self.replays}, step_size={self.step_size!r})"


class FreeATTrainer(Trainer):
    """Free-AT training (Shafahi et al. 2019) with the paper's CIFAR-10
    settings: m = ``replays`` = 8, δ stepped by ε (8/255), batch 128, SGD with
    momentum 0.9 and weight decay 2e-4, learning rate 0.1 decayed ×0.1 at 50 %
    and ×0.01 at 75 % of the steps (``schedule="piecewise"``), crops padded
    with black.

    ``epochs`` is the budget in epochs' worth of optimizer steps, as in the
    paper (which trains Free-m for the natural-training budget divided by m):
    the Trainer makes ⌈epochs / replays⌉ passes over the data
    (:attr:`Trainer.epochs`), each of ``replays`` steps per batch, kept in
    :attr:`epoch_budget`. The default 205 is the reference code's 80,000
    steps of 128 examples (204.8 epochs of CIFAR-10): 26 passes for m = 8.
    Schedules, checkpoints and the history count passes.
    """

    def __init__(self, model: nn.Module, *, eps: float = EPS, replays: int = 8, step_size: Optional[float] = None,
                 epochs: int = 205, **kwargs: Any) -> None:
        policy = FreeATPolicy(eps, replays=replays, step_size=step_size)
        budget = check_positive_int(epochs, "epochs")
        defaults = dict(lr=0.1, schedule="piecewise", weight_decay=2e-4, pad_fill=0.0)
        super().__init__(model, policy, epochs=-(-budget // policy.replays), **{**defaults, **kwargs})
        self.epoch_budget = budget


__all__ = ["EPS", "FreeATPolicy", "FreeATTrainer"]

"""What the prior-guided FGSM methods share: the per-example prior
perturbation (and its gradient momentum) kept across epochs, the soft training
targets, the signed step from the prior, and the convergence-stability term of
FGSM-MEP-CS and FGSM-RS-CS.

Images are pixels in [0, 1]; ε is in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_positive_int, check_radius, check_weight
from ..data.batch import Batch
from ..policies.base import PerturbationPolicy, PolicyContext
from ..policies.store import PerExampleStore
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: The FastAT Benchmark's CIFAR-10 protocol for all four methods (its
#: ``configs/cifar10/fgsm_{pgi,pco,mep_cs,rs_cs}.yaml``): label smoothing,
#: weight-average decay τ and peak learning rate of its 100-epoch one-cycle run.
PRIOR_FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def check_factor(value: object, name: str = "factor") -> float:
    """Check a target probability of the true class: a number in (0, 1]."""
    factor = check_weight(value, name)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"{name} is the true class's target probability and must be in (0, 1], got {value!r}")
    return factor


def soft_targets(y: Tensor, factor: float, num_classes: int) -> Tensor:
    """Soft targets (N, K), float32: probability ``factor`` on the true class
    ``y`` and ``(1 − factor) / (K − 1)`` on each other class."""
    one_hot = F.one_hot(y, num_classes).float()
    return one_hot * factor + (1.0 - one_hot) * ((1.0 - factor) / (num_classes - 1))


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, K) against probability
    ``targets`` (N, K), in at least float32. ``label_smoothing`` smooths the
    targets once more, as ``torch.nn.CrossEntropyLoss(label_smoothing=…)``
    does with probability targets: ``(1 − s)·t + s/K``."""
    return F.cross_entropy(at_least_float32(logits), targets, label_smoothing=label_smoothing)


def project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """``delta`` clipped to the ε-ball, then to ``[−x, 1 − x]`` so that
    ``x + delta`` stays in [0, 1]."""
    return torch.clamp(torch.clamp(delta, -eps, eps), -x, 1.0 - x)


def signed_step(delta: Tensor, direction: Tensor, x: Tensor, eps: float) -> Tensor:
    """One FGSM step of size ε from the prior ``delta`` along ``sign(direction)``,
    projected (:func:`project`)."""
    return project(delta + eps * torch.sign(direction), x, eps)


def momentum_update(grad: Tensor, momentum: Tensor, decay: float) -> Tensor:
    """FGSM-PGI's gradient momentum: ``g / ‖g‖₁ + decay · momentum``, the L1
    norm taken over the whole batch (one number per batch, as the reference
    code does), float32. An all-zero gradient leaves the momentum decayed."""
    grad = grad.float()
    return grad / grad.abs().sum().clamp_min(torch.finfo(torch.float32).tiny) + decay * momentum


def input_gradient(loss: Tensor, x: Tensor, retain_graph: bool = False) -> Tensor:
    """``∂ loss / ∂ x`` for the leaf ``x`` only (no weight gradients are
    accumulated), detached. ``retain_graph`` keeps the graph for a later
    backward through the same forward (the training loss)."""
    (grad,) = torch.autograd.grad(loss, x, retain_graph=retain_graph)
    return grad.detach()


class EpochPrior:
    """The per-example prior of FGSM-PGI, FGSM-PCO and FGSM-MEP-CS: each
    example's last perturbation (and, with ``momentum=True``, its gradient
    momentum), in padded coordinates (:class:`PerExampleStore`), so the same
    pixel of the same example is read back under the next epoch's crop and flip.

    :meth:`reset` fills the perturbations with ``±ε`` of random sign per value
    (torch's global generator on the store's device, whose state a Trainer
    checkpoint holds) and the momentum with zeros.
    """

    def __init__(self, context: PolicyContext, eps: float, dtype: torch.dtype, momentum: bool) -> None:
        self.eps = eps
        self.delta = PerExampleStore.for_context(context, dtype)
        self.momentum = PerExampleStore.for_context(context, dtype) if momentum else None

    def reset(self) -> None:
        data = self.delta.data
        # float32 draws whatever the store's dtype; sign(U(−ε, ε)) as the reference
        data.copy_(torch.empty(data.shape, device=data.device).uniform_(-1.0, 1.0).sign_().mul_(self.eps))
        if self.momentum is not None:
            self.momentum.data.zero_()

    def read(self, batch: Batch) -> Tuple[Tensor, Optional[Tensor]]:
        """The batch's prior perturbations and momentum (``None`` without), float32."""
        momentum = None if self.momentum is None else self.momentum.read(batch.index, batch.aug)
        return self.delta.read(batch.index, batch.aug), momentum

    def write(self, batch: Batch, delta: Tensor, momentum: Optional[Tensor]) -> None:
        self.delta.write(batch.index, batch.aug, delta)
        if self.momentum is not None and momentum is not None:
            self.momentum.write(batch.index, batch.aug, momentum)

    def state_dict(self) -> Dict[str, Any]:
        state = {"delta": self.delta.state_dict()}
        if self.momentum is not None:
            state["momentum"] = self.momentum.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.delta.load_state_dict(state["delta"])
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])


def resets_before(epoch: int, reset_every: int) -> bool:
    """Whether a prior redrawn every ``reset_every`` epochs (0: never after
    the first) is redrawn before 0-based ``epoch`` > 0: epochs 40, 80, … for 40,
    as the reference's ``epoch % epochs_reset == 0``; epoch 0's prior is drawn
    at setup."""
    return reset_every > 0 and epoch > 0 and epoch % reset_every == 0


#: The reference's ``decay_arr``: the epochs at which its learning rate
#: changes; the convergence-stability term is off within ``stride`` epochs of each.
DECAY_EPOCHS: Tuple[int, ...] = (0, 100, 105, 110)


class ConvergenceStabilityPolicy(PerturbationPolicy):
    """The convergence-stability (CS) term of Zhao et al. (ICCV 2023), shared
    by FGSM-MEP-CS and FGSM-RS-CS: it keeps the clean training loss from
    jumping between epochs.

    Each step computes ``ℓ`` (the policy's clean-input cross-entropy, a
    graph-carrying batch mean) and adds ``w2 · sign(d) · ℓ`` to the loss when
    the term is on in this epoch and ``|d| > τ``, where ``d = ℓ − L̄ₑ₋₁`` is the
    change from the previous epoch's mean clean loss ``L̄ₑ₋₁`` (0 before any),
    ``τ = min(max(γ / ratio, L̄ₑ₋₁ − L̄ₑ₋₂), γ)``, and the term is on in epoch
    ``e`` when ``a + stride < e < b − stride`` for consecutive ``a, b`` of
    ``decay_epochs``: a loss rising too fast is pushed down, one falling too
    fast pushed up. The decision is a tensor select, never a host read; where
    the term is off it is added with weight 0, so every step runs the same
    passes. The epoch means are accumulated on the device in
    :meth:`record_clean_loss` and close at the next :meth:`start_epoch`; all of
    it is in :meth:`state_dict`, so a run resumed mid-epoch continues exactly.
    In a distributed run each process uses its own shard's means.

    Subclasses call :meth:`_init_cs` in their constructor and chain their
    ``setup``, ``start_epoch``, ``state_dict`` and ``load_state_dict`` to
    this class's.
    """

    def _init_cs(self, gamma: float, ratio: float, stride: int, w2: float,
                 decay_epochs: Sequence[int]) -> None:
        self.gamma = float(check_radius(gamma, "gamma"))
        self.ratio = float(check_radius(ratio, "ratio"))
        if not self.ratio > 0:
            raise ValueError(f"ratio divides gamma and must be > 0, got {ratio!r}")
        self.stride = check_positive_int(stride, "stride", minimum=0)
        self.w2 = check_weight(w2, "w2")
        if isinstance(decay_epochs, (str, bytes)) or not isinstance(decay_epochs, Sequence):
            raise TypeError(f"decay_epochs must be a sequence of epoch numbers, got {type(decay_epochs).__name__}")
        epochs = tuple(check_positive_int(e, "decay_epochs", minimum=0) for e in decay_epochs)
        if len(epochs) < 2 or any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"decay_epochs must be at least two increasing epochs, got {list(decay_epochs)}")
        self.decay_epochs = epochs
        self._epoch = 0
        self._count = 0
        self._previous: Optional[Tensor] = None

    def setup(self, model: torch.nn.Module, context: PolicyContext) -> None:
        zero = torch.zeros((), device=context.device)
        self._previous, self._change, self._sum = zero.clone(), zero.clone(), zero.clone()
        self._epoch, self._count = 0, 0

    def cs_active(self, epoch: int) -> bool:
        """Whether the term is on in 0-based ``epoch`` (epochs 2 to 98 with
        the defaults)."""
        bounds = self.decay_epochs
        return any(a + self.stride < epoch < b - self.stride for a, b in zip(bounds, bounds[1:]))

    def start_epoch(self, epoch: int) -> None:
        assert self._previous is not None, f"{type(self).__name__}.setup must run before training"
        if self._count:
            mean = self._sum / self._count
            self._change = mean - self._previous
            self._previous = mean
            self._sum = torch.zeros_like(self._sum)
            self._count = 0
        self._epoch = epoch

    def cs_term(self, clean_loss: Tensor) -> Tensor:
        """The CS term for this step's clean loss ``clean_loss`` (0-dim, with graph)."""
        assert self._previous is not None, f"{type(self).__name__}.setup must run before training"
        d = clean_loss.detach() - self._previous
        gamma = torch.full_like(d, self.gamma)
        threshold = torch.minimum(torch.maximum(gamma / self.ratio, self._change), gamma)
        fire = (d.abs() > threshold) & self.cs_active(self._epoch)
        weight = torch.where(fire, self.w2 * torch.sign(d), torch.zeros_like(d))
        return weight * clean_loss

    def record_clean_loss(self, clean_loss: Tensor, examples: int) -> None:
        """Add a step's clean loss (a batch mean over ``examples``) to the epoch's mean."""
        self._sum = self._sum + clean_loss.detach().float() * examples
        self._count += examples

    def state_dict(self) -> Dict[str, Any]:
        return {"cs": {"epoch": self._epoch, "count": self._count, "sum": self._sum,
                       "previous": self._previous, "change": self._change}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self._previous is not None, f"{type(self).__name__}.setup must run before load_state_dict"
        super().load_state_dict(state)
        cs = state["cs"]
        self._epoch, self._count = int(cs["epoch"]), int(cs["count"])
        device = self._previous.device
        self._sum, self._previous, self._change = (cs[k].to(device).clone() for k in ("sum", "previous", "change"))


__all__ = ["DECAY_EPOCHS", "EPS", "PRIOR_FASTAT_CONFIG", "ConvergenceStabilityPolicy", "EpochPrior", "check_factor",
           "input_gradient", "momentum_update", "project", "resets_before", "signed_step", "soft_cross_entropy",
           "soft_targets"]

"""GAT (Sriramanan, Addepalli, Baburaj & Babu, NeurIPS 2020, "Guided
Adversarial Attack for Evaluating and Enhancing Adversarial Defenses"):
single-step adversarial training whose attack and loss add λ times the
squared L2 distance between the softmax outputs of the clean and the
perturbed input, the attack starting from Bernoulli noise and taking that
term into its loss on every second step.

The Bernoulli start, the signed step and the alternation between a plain
and a guided attack loss are shared with NuAT (:mod:`advtrain.methods.nuat`),
the same authors' follow-up: :class:`GuidedSingleStepPolicy` holds them.

Images are pixels in [0, 1]; ε, step sizes and the start's magnitude are in
pixel units.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_radius, check_weight
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..training.trainer import Trainer
from ..utils.modes import BNMode, model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: Where GAT's λ is multiplied by its boost, as a fraction of the run: the
#: reference multiplies it after its 0-based epoch 85 of 100, so epochs 86 to
#: 99 train with 4λ.
BOOST_AT = 0.86

#: The FastAT Benchmark's protocol settings in ``configs/cifar10/gat.yaml``
#: (100 epochs), for the protocol preset; ``weight_average`` is the EMA decay τ.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def bernoulli_start(x: Tensor, radius: float) -> Tensor:
    """``clip₀¹(x + radius · sign(0.5 − u))``, ``u ~ U(0, 1)`` per pixel from
    torch's global generator: every pixel moved by ``±radius`` (pixel units)
    with probability 1/2 each, the start of the GAT and NuAT attacks."""
    return torch.clamp(x + radius * torch.sign(0.5 - torch.rand_like(x)), 0.0, 1.0)


def softmax_distance(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """GAT's regularizer before its weight λ: ``mean_i ‖p(x_i) − p(x̃_i)‖₂²``
    with ``p = softmax`` of the (N, K) logits of the clean and the perturbed
    input; a 0-dim tensor in at least float32, differentiable in both."""
    if clean_logits.shape != adv_logits.shape:
        raise ValueError(f"softmax_distance compares two (N, K) outputs of one batch: got shapes "
                         f"{tuple(clean_logits.shape)} and {tuple(adv_logits.shape)}")
    p = F.softmax(at_least_float32(clean_logits), dim=1)
    q = F.softmax(at_least_float32(adv_logits), dim=1)
    return (p - q).square().sum(dim=1).mean()


class GuidedSingleStepPolicy(PerturbationPolicy):
    """The single-step attack and the training loss GAT and NuAT share.

    Per batch ``(x, y)`` at epoch ``e``, with the method's regularizer
    ``R(clean logits, perturbed logits)`` and weight ``λ_e`` (:meth:`lam_at`):

    1. the clean logits ``f(x)``, BatchNorm in train mode, without a graph;
    2. ``x₀ = clip₀¹(x + α · sign(0.5 − u))`` (:func:`bernoulli_start`);
    3. ``g = ∇ CE(f(x₀), y)`` on the epoch's even steps (0-based) and
       ``∇ [CE(f(x₀), y) + λ_e · R(f(x), f(x₀))]`` on its odd ones, BatchNorm
       in :attr:`attack_bn_mode`, the clean logits held fixed;
    4. ``x_adv = clip₀¹(x + clip_ε(x₀ + η · sign(g) − x))``;
    5. the loss ``CE(f(x), y) + λ_e · R(f(x), f(x_adv))``, both forwards in
       train mode (the adversarial one first, as in the reference) and
       gradients through both; the cross-entropy takes the Trainer's label
       smoothing, the attack's does not.

    The training accuracy counts the adversarial logits. The epoch and the
    step within it are the policy's state (:meth:`state_dict`), so a resumed
    run, also from a mid-epoch checkpoint, takes the same λ and the same
    alternation.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        step_size: η, pixel units; ``None`` means ``eps``.
        init_radius: α, the Bernoulli start's magnitude, pixel units;
            ``None`` means ``eps / 2``.
    """

    #: BatchNorm mode of the attack's forward at the perturbed input.
    attack_bn_mode: BNMode = "train"

    def __init__(self, eps: float = EPS, *, step_size: Optional[float] = None,
                 init_radius: Optional[float] = None) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.step_size = self.eps if step_size is None else float(check_radius(step_size, "step_size"))
        self.init_radius = self.eps / 2 if init_radius is None else float(check_eps(init_radius, "linf",
                                                                                    "init_radius"))
        self.epochs: Optional[int] = None
        self.epoch = 0
        self.step = 0

    @abc.abstractmethod
    def regularizer(self, clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
        """The method's term before its weight, a 0-dim tensor of the (N, K)
        clean and perturbed logits, differentiable in both."""

    @abc.abstractmethod
    def lam_at(self, epoch: int) -> float:
        """The regularizer's weight λ in 0-based ``epoch`` of the run."""

    def _run_epochs(self) -> int:
        if self.epochs is None:
            raise RuntimeError(f"{type(self).__name__}'s λ schedule follows the run's length: call "
                               "setup(model, context) first (a Trainer does)")
        return self.epochs

    @property
    def current_lam(self) -> float:
        """λ of the current epoch."""
        return self.lam_at(self.epoch)

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.epochs = context.epochs
        self.epoch = 0
        self.step = 0

    def start_epoch(self, epoch: int) -> None:
        # The reference counts steps from 0 in every epoch: its first step of
        # each epoch takes the plain attack loss.
        self.epoch = epoch
        self.step = 0

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        x, y = batch.x, batch.y
        with model_mode(model, "train"), torch.no_grad():
            clean = model(x)
        start = bernoulli_start(x, self.init_radius).detach().requires_grad_(True)
        with model_mode(model, self.attack_bn_mode), torch.enable_grad():
            logits = model(start)
            loss = F.cross_entropy(at_least_float32(logits), y)
            if self.step % 2 == 1:
                loss = loss + self.current_lam * self.regularizer(clean, logits)
            (grad,) = torch.autograd.grad(loss, start)
        delta = torch.clamp(start.detach() + self.step_size * grad.sign() - x, -self.eps, self.eps)
        return Perturbation(x=torch.clamp(x + delta, 0.0, 1.0).detach())

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        adv = context.forward(perturbation.x)
        clean = context.forward(batch.x)
        total = context.cross_entropy(clean, batch.y) + self.current_lam * self.regularizer(clean, adv)
        return TrainingLoss(total, adv)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        self.step += 1

    def metrics(self) -> Dict[str, float]:
        return {"lam": self.current_lam} if self.epochs is not None else {}

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class GATPolicy(GuidedSingleStepPolicy):
    """GAT: :class:`GuidedSingleStepPolicy` with the regularizer
    ``mean_i ‖softmax(f(x_i)) − softmax(f(x̃_i))‖₂²`` (:func:`softmax_distance`),
    the attack's forward at the perturbed input in BatchNorm eval mode (the
    clean one in train mode), and ``λ_e = lam`` for the first epochs and
    ``boost · lam`` from epoch ``⌊boost_at · epochs + 0.5⌋`` on (86 of 100).

    Args:
        eps, step_size, init_radius: as :class:`GuidedSingleStepPolicy`.
        lam: λ, the regularizer's weight (>= 0).
        boost: the factor λ is multiplied by late in the run (>= 0).
        boost_at: where the boost starts, a fraction of the run in [0, 1].
    """

    attack_bn_mode: BNMode = "eval"

    def __init__(self, eps: float = EPS, *, lam: float = 10.0, boost: float = 4.0, boost_at: float = BOOST_AT,
                 step_size: Optional[float] = None, init_radius: Optional[float] = None) -> None:
        super().__init__(eps, step_size=step_size, init_radius=init_radius)
        self.lam = check_weight(lam, "lam")
        self.boost = check_weight(boost, "boost")
        self.boost_at = check_weight(boost_at, "boost_at")
        if self.boost_at > 1.0:
            raise ValueError(f"boost_at is a fraction of the run in [0, 1], got {boost_at!r}")

    @property
    def boost_epoch(self) -> int:
        """The first (0-based) epoch trained with ``boost · lam``."""
        return math.floor(self.boost_at * self._run_epochs() + 0.5)

    def lam_at(self, epoch: int) -> float:
        return self.lam * (self.boost if epoch >= self.boost_epoch else 1.0)

    def regularizer(self, clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
        return softmax_distance(clean_logits, adv_logits)

    def __repr__(self) -> str:
        return (f"GATPolicy(eps={self.eps!r}, lam={self.lam!r}, boost={self.boost!r}, "
                f"boost_at={self.boost_at!r}, step_size={self.step_size!r}, init_radius={self.init_radius!r})")


class GATTrainer(Trainer):
    """GAT training (Sriramanan et al. 2020) with the FastAT Benchmark's
    settings (``configs/cifar10/gat.yaml``): λ = 10, ×4 for the last 14 % of
    the run, a Bernoulli start of ±ε/2 and one signed step of ε at
    ε = 8/255 (see :class:`GATPolicy`). The schedule is the other presets'
    (30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch
    128, black crop padding); the benchmark's protocol (100 epochs,
    OneCycle to 0.1, label smoothing 0.4, weight averaging τ = 0.9995) is
    :data:`FASTAT_CONFIG`."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: float = 10.0, boost: float = 4.0,
                 boost_at: float = BOOST_AT, step_size: Optional[float] = None, init_radius: Optional[float] = None,
                 **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = GATPolicy(eps, lam=lam, boost=boost, boost_at=boost_at, step_size=step_size,
                           init_radius=init_radius)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["BOOST_AT", "EPS", "FASTAT_CONFIG", "GATPolicy", "GATTrainer", "GuidedSingleStepPolicy",
           "bernoulli_start", "softmax_distance"]

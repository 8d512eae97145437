"""What FGSM-UAP, FGSM-CUAP and FGSM-FUAP share (the AAAI 2024 paper the
FastAT Benchmark cites for them, ojs.aaai.org/index.php/AAAI/article/view/30147):
a bank of learned universal adversarial perturbations (UAPs) that start each
example's FGSM step, updated after every step from the gradients at the
batch's starts with momentum, and a training loss that adds a mean-squared
consistency term between the logits at the FGSM point and at its UAP start.

The variants differ only in which UAP of the bank an example starts from
(one for all, one per class, one chosen by a learned head on the model's
features) and from where (the image, or for FUAP a random point of the
ε-ball). Images are pixels in [0, 1]; ε, the UAPs' radius and step are in
pixel units.
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_weight
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: Radius of the UAPs and size of their signed update step, pixel units
#: (``uap_eps`` of the FastAT Benchmark's CIFAR-10 configs: 10/255, larger
#: than ε; a UAP is clipped to the ε-ball where it starts an example).
UAP_EPS = 10 / 255

#: Weight λ of the logit-consistency term (``lamda`` of the configs).
LAM = 10.0

#: Decay μ of the UAPs' gradient momentum (``momentum_decay`` of the configs,
#: the 0.3 the reference update uses).
MOMENTUM_DECAY = 0.3

#: What the FastAT Benchmark's CIFAR-10 configs of all three variants set for
#: the training protocol (100 epochs, one-cycle LR, weight averaging): its
#: label smoothing, weight-average decay τ and peak learning rate.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.4, "weight_average": 0.9995, "lr": 0.1}


def project(x: Tensor, point: Tensor, eps: float) -> Tensor:
    """``point`` projected onto the L∞ ball of radius ``eps`` around the
    images ``x`` and onto [0, 1]: ``clip₀¹(x + clip_{±ε}(point − x))``, the
    order of operations of the reference code."""
    return torch.clamp(x + torch.clamp(point - x, -eps, eps), 0.0, 1.0)


def check_decay(value: object, name: str) -> float:
    """Check a momentum decay: a finite number in [0, 1]."""
    decay = check_weight(value, name)
    if decay > 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the weight of the previous momentum), got {decay!r}")
    return decay


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Put the running statistics of ``model``'s normalization layers back as
    they were when the block is left: for a train-mode pass that the
    reference does not make (advtrain's attack forward at the start, whose
    logits the reference reuses for its training loss). One copy of those
    buffers per call, on their device."""
    saved = [(buf, buf.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for buf in m.buffers(recurse=False)]
    try:
        yield
    finally:
        for buf, value in saved:
            buf.copy_(value)


def num_outputs(model: nn.Module, context: PolicyContext) -> int:
    """The number of logits ``model`` gives for one image of the run's shape
    (one forward of a zero image in eval mode, without gradients, so no
    BatchNorm statistic moves): the number of classes a class-wise bank needs."""
    probe = torch.zeros(1, *context.image_shape, device=context.device)
    with model_mode(model, "eval"), torch.no_grad():
        out = model(probe)
    if out.dim() != 2:
        raise ValueError(f"the model must give (N, classes) logits, got shape {tuple(out.shape)}")
    return int(out.shape[1])


class UniversalFGSMPolicy(PerturbationPolicy):
    """FGSM from a learned universal perturbation, with the reference's logit
    consistency loss; subclasses choose the bank's size and each example's UAP.

    The bank holds ``K`` UAPs ``u_k`` of the image's shape, each entry ±``uap_eps``
    at setup (the sign of a uniform draw from torch's global generator) and in
    [−``uap_eps``, ``uap_eps``] after. Per batch ``(x, y)``, BatchNorm in
    train mode for every pass, as in the reference code:

    1. Each example ``i`` gets a bank index ``k_i`` and a base ``b_i`` (the
       image, or a random point of the ball) from :meth:`select`; its start
       is ``x₀ᵢ = Π(bᵢ + u_{kᵢ})``, ``Π`` the projection onto the ε-ball around
       ``xᵢ`` and [0, 1] (:func:`project`).
    2. ``g = ∇ₓ CE(f(x₀), y)`` (input gradient only; the running statistics
       are put back after this pass, since the reference makes one forward at
       ``x₀`` for both the attack and the loss) and ``x_adv = Π(x₀ + ε·sign(g))``.
    3. Loss ``CE(f(x_adv), y) + λ · MSE(f(x_adv), f(x₀))``, the mean squared
       difference of the two forwards' logits over batch and classes, with
       gradients through both forwards; the cross-entropy takes the
       Trainer's label smoothing.
    4. After the model step, from the start's gradient
       ``G = ∇_{x₀} [CE(f(x₀), y) + λ·MSE(f(x_adv), f(x₀))]`` (``x_adv`` held
       fixed, the weights before the step, the cross-entropy the batch mean):
       the attack's gradient of step 2 plus what the training loss's backward
       leaves on ``x₀``, as the reference's update reads it. With
       ``Ĝ = G / ‖G‖₁`` (the L1 norm over the whole batch): for each bank
       entry ``k`` that some example of the batch used,
       ``m_k ← mean_{i: kᵢ = k} Ĝᵢ + μ·m_k`` and
       ``u_k ← clip_{±uap_eps}(u_k + uap_eps·sign(m_k))``; entries no example
       used keep their UAP and momentum. Sums and counts by ``index_add_``, no
       loop over entries and no host synchronisation.

    The bank and its momentum are in :meth:`state_dict`, so a resumed run
    continues from the same UAPs.

    Args:
        eps: L∞ radius of the training perturbation, pixel units (at most 1:
            8/255, not 8); also the FGSM step.
        uap_eps: radius of the UAPs and their update step, pixel units.
        lam: weight λ of the consistency term (>= 0).
        momentum_decay: μ in [0, 1].
    """

    def __init__(self, eps: float = EPS, *, uap_eps: float = UAP_EPS, lam: float = LAM,
                 momentum_decay: float = MOMENTUM_DECAY) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.uap_eps = float(check_eps(uap_eps, "linf", "uap_eps"))
        self.lam = check_weight(lam, "lam")
        self.momentum_decay = check_decay(momentum_decay, "momentum_decay")
        self.uaps: Optional[Tensor] = None
        self.momentum_buffer: Optional[Tensor] = None

    # -------------------------------------------------------- variant hooks
    @abc.abstractmethod
    def bank_size(self, model: nn.Module, context: PolicyContext) -> int:
        """How many UAPs the bank holds for this run (called by :meth:`setup`)."""

    @abc.abstractmethod
    def select(self, model: nn.Module, batch: Batch) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        """For ``batch``: the base each example's UAP is added to (the images,
        or points near them; (B, C, H, W)), each example's bank index (B,)
        (int64, on the batch's device) and extras to hand to :meth:`loss` and
        :meth:`after_step`."""

    # ------------------------------------------------------------ contract
    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        shape = (self.bank_size(model, context), *context.image_shape)
        draw = torch.empty(shape, device=context.device).uniform_(-self.uap_eps, self.uap_eps)
        self.uaps = self.uap_eps * torch.sign(draw)
        self.momentum_buffer = torch.zeros(shape, device=context.device)

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.uaps is not None, f"{type(self).__name__}.setup must run before perturb"
        x, y = batch.x, batch.y
        base, groups, extras = self.select(model, batch)
        # A leaf: the training loss's backward leaves its share of the
        # update's gradient on it (autograd.grad below accumulates nothing).
        start = project(x, base + self.uaps[groups], self.eps).to(x.dtype).detach().requires_grad_(True)
        with model_mode(model, "train"), running_stats_kept(model), torch.enable_grad():
            # the batch mean, as the reference: the update adds the loss's share at that scale
            loss = F.cross_entropy(at_least_float32(model(start)), y)
            (grad,) = torch.autograd.grad(loss, start)
        x_adv = project(x, start.detach() + self.eps * grad.sign(), self.eps).to(x.dtype)
        return Perturbation(x=x_adv.detach(),
                            extras={"start": start, "grad": grad.detach(), "groups": groups, **extras})

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        start_logits = context.forward(perturbation.extras["start"])
        logits = context.forward(perturbation.x)
        consistency = F.mse_loss(at_least_float32(logits), at_least_float32(start_logits))
        return TrainingLoss(context.cross_entropy(logits, batch.y) + self.lam * consistency, logits)

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        grad, share = perturbation.extras["grad"], perturbation.extras["start"].grad
        self.update(grad if share is None else grad + share, perturbation.extras["groups"])

    def update(self, grad: Tensor, groups: Tensor) -> None:
        """Step the bank with one batch's gradient ``grad`` (B, C, H, W) at
        the starts of examples that used bank entries ``groups`` (B,).
        A gradient that is zero everywhere leaves the momentum decayed only
        (its normalization divides by a floor instead of by 0)."""
        assert self.uaps is not None and self.momentum_buffer is not None
        with torch.no_grad():
            g = grad.detach().float()
            direction = g / g.abs().sum().clamp_min(torch.finfo(torch.float32).tiny)
            sums = torch.zeros_like(self.momentum_buffer).index_add_(0, groups, direction)
            # index_add_ rather than bincount, whose CUDA kernel reads the largest label back to the host
            counts = torch.zeros(self.uaps.shape[0], device=g.device).index_add_(
                0, groups, torch.ones(groups.shape[0], device=g.device)).view(-1, 1, 1, 1)
            used = counts > 0
            momentum = torch.where(used, sums / counts.clamp_min(1) + self.momentum_decay * self.momentum_buffer,
                                   self.momentum_buffer)
            stepped = torch.clamp(self.uaps + self.uap_eps * torch.sign(momentum), -self.uap_eps, self.uap_eps)
            self.uaps.copy_(torch.where(used, stepped, self.uaps))
            self.momentum_buffer.copy_(momentum)

    def state_dict(self) -> Dict[str, Any]:
        assert self.uaps is not None and self.momentum_buffer is not None
        return {"uaps": self.uaps, "momentum": self.momentum_buffer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.uaps is not None and self.momentum_buffer is not None, \
            f"{type(self).__name__}.setup must run before load_state_dict"
        super().load_state_dict(state)
        for key, target in (("uaps", self.uaps), ("momentum", self.momentum_buffer)):
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"the checkpoint's {key} have shape {tuple(state[key].shape)}, this run needs "
                                 f"{tuple(target.shape)} (another image shape or bank size)")
            target.copy_(state[key])

    def _arguments(self) -> str:
        return (f"eps={self.eps!r}, uap_eps={self.uap_eps!r}, lam={self.lam!r}, "
                f"momentum_decay={self.momentum_decay!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._arguments()})"


__all__ = ["EPS", "FASTAT_CONFIG", "LAM", "MOMENTUM_DECAY", "UAP_EPS", "UniversalFGSMPolicy", "check_decay",
           "num_outputs", "project", "running_stats_kept"]

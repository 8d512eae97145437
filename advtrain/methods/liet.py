"""LIET (Pan et al., ICCV 2025, "Mitigating Catastrophic Overfitting in Fast
Adversarial Training via Label Information Elimination Training"):
single-step adversarial training that keeps the model from leaning on the
label information a perturbation carries. Each class gets a perturbation
that holds only label information — the signed input gradient of that
class's loss at a constant grey image — and every training example starts
its attack from its class's one, partly replaced by noise and added or
subtracted at random; labels are smoothed with random proportions; and a
Jensen–Shannon term, whose weight grows over the run, keeps the prediction
at the attack's start and at its end alike.

Images are pixels in [0, 1]; ε and noise radii are in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_eps, check_positive_int, check_weight
from ..attacks.base import input_gradient
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PerturbationPolicy, PolicyContext, TrainingLoss
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ..utils.precision import at_least_float32

EPS = 8 / 255

#: Grey level of the constant image whose input gradients give the
#: label-information perturbations.
GREY = 0.5

#: Radii above this one switch LIET to its large-ε variant: noise in
#: [−2ε, 2ε] and no projection back to the ε-ball, as in the reference code.
LARGE_EPS = 8 / 255

#: The FastAT Benchmark's protocol settings for LIET (its ``liet.yaml``):
#: weight averaging with τ = 0.9995 and peak LR 0.1 over 100 epochs. The
#: file's ``label_smoothing: 0.6`` is LIET's own random label smoothing,
#: which the policy applies (the preset's ``smoothing``), so the Trainer's
#: uniform label smoothing stays 0.
FASTAT_CONFIG: Dict[str, Any] = {"label_smoothing": 0.0, "weight_average": 0.9995, "lr": 0.1}


def random_smoothing_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Per-example cross-entropy of ``logits`` (N, K) against targets that
    put ``1 − smoothing`` on the label ``y`` and split ``smoothing`` over the
    other classes in random proportions ``u_k / Σ u`` with ``u_k ~ U(0, 1)``,
    drawn afresh on every call from the global generator of the logits'
    device. ``smoothing = 0`` is the plain cross-entropy. Shape (N,), in at
    least float32."""
    logits = at_least_float32(logits)
    target = F.one_hot(y.long(), logits.shape[1]).to(logits.dtype)
    if smoothing > 0:
        share = torch.rand_like(logits).masked_fill(target.bool(), 0.0)
        target = target * (1 - smoothing) + share / share.sum(dim=1, keepdim=True) * smoothing
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def jensen_shannon(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Batch mean of the Jensen–Shannon divergence between the softmax
    predictions of two (N, K) logits, ``(KL(p ‖ m) + KL(q ‖ m)) / 2`` with
    ``m = (p + q) / 2``; gradients flow into both. A 0-dim tensor in at
    least float32."""
    p = F.softmax(at_least_float32(logits_p), dim=1)
    q = F.softmax(at_least_float32(logits_q), dim=1)
    log_m = ((p + q) / 2).clamp(0.0, 1.0).log()
    return (F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean")) / 2


class LIETPolicy(PerturbationPolicy):
    """LIET: label-information perturbations as the start of an FGSM step,
    random label smoothing and a growing Jensen–Shannon consistency term.

    Every ``li_every`` steps of an epoch (its first included), the
    label-information perturbations are computed anew, with BatchNorm in
    eval mode: for the constant image ``c`` (every pixel 0.5, one per class
    k = 0…K−1), ``LI_k = ε · sign(∇_c mean_k CE_s(f(c), k))``, ``CE_s`` the
    random-smoothing cross-entropy (:func:`random_smoothing_cross_entropy`).
    Then per batch ``(x, y)``, with a mask ratio ``ρ ~ U(min_mask_ratio,
    max_mask_ratio)`` and a sign ``s = ±1`` drawn once per batch:

    1. ``δ₀ = LI_y``, each pixel replaced with probability ρ by noise
       ``U(−r, r)``; ``x₀ = clip₀¹(x + s·δ₀)``.
    2. ``x_adv = x₀ + ε · sign(∇ₓ₀ CE_s(f(x₀), y))``, projected onto the
       ε-ball around ``x`` and [0, 1].
    3. Loss ``CE_s(f(x_adv), y) + λ_e · JS(p(x₀), p(x_adv))``, gradients
       through both predictions, ``λ_e = lam · (e + 1) / E`` in 0-based
       epoch ``e`` of ``E``.

    Both forwards run in train mode and both are the training passes: the
    attack's input gradient is taken through the first one
    (``retain_graph``), and the loss's backward runs through both. For
    ``eps`` above 8/255 the noise is ``U(−2ε, 2ε)`` and step 2 only clips to
    [0, 1]; otherwise ``r = ε``. The policy smooths its labels itself: the
    Trainer's ``label_smoothing`` must be 0.

    State (in :meth:`state_dict`): the epoch, the step within it and the
    current perturbations, so a run resumed mid-epoch goes on exactly.

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        lam: weight of the Jensen–Shannon term in the last epoch (>= 0).
        smoothing: label mass spread at random over the other classes, in [0, 1).
        min_mask_ratio, max_mask_ratio: range of ρ, 0 <= min <= max <= 1.
        li_every: recompute the label-information perturbations every this
            many steps.
        num_classes: K; ``None`` reads it from the model's output at setup.
    """

    def __init__(self, eps: float = EPS, *, lam: float = 100.0, smoothing: float = 0.6,
                 min_mask_ratio: float = 0.1, max_mask_ratio: float = 0.5, li_every: int = 20,
                 num_classes: Optional[int] = None) -> None:
        self.eps = float(check_eps(eps, "linf", "eps"))
        self.lam = check_weight(lam, "lam")
        self.smoothing = check_weight(smoothing, "smoothing")
        if self.smoothing >= 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing!r}")
        self.min_mask_ratio = check_weight(min_mask_ratio, "min_mask_ratio")
        self.max_mask_ratio = check_weight(max_mask_ratio, "max_mask_ratio")
        if not self.min_mask_ratio <= self.max_mask_ratio <= 1:
            raise ValueError("the mask ratios must satisfy 0 <= min_mask_ratio <= max_mask_ratio <= 1, got "
                             f"min_mask_ratio={min_mask_ratio!r}, max_mask_ratio={max_mask_ratio!r}")
        self.li_every = check_positive_int(li_every, "li_every")
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes", 2)
        self.project = self.eps <= LARGE_EPS
        self.noise_radius = self.eps if self.project else 2 * self.eps
        self._epochs = 1
        self._epoch = 0
        self._step = 0
        self._li: Optional[Tensor] = None

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self._epochs, self._epoch, self._step, self._li = context.epochs, 0, 0, None
        if self.num_classes is None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            probe = torch.full((1, *context.image_shape), GREY, device=context.device, dtype=dtype)
            with model_mode(model, "eval"), torch.no_grad():
                self.num_classes = check_positive_int(int(model(probe).shape[1]), "the model's number of outputs", 2)

    def start_epoch(self, epoch: int) -> None:
        self._epoch, self._step, self._li = epoch, 0, None

    @property
    def weight(self) -> float:
        """λ_e, the Jensen–Shannon weight of the current epoch."""
        return self.lam * (self._epoch + 1) / self._epochs

    def label_information(self, model: nn.Module, like: Tensor) -> Tensor:
        """The (K, C, H, W) label-information perturbations for images shaped
        like ``like`` (N, C, H, W): ``ε · sign`` of the input gradient of the
        random-smoothing cross-entropy at the grey image, one per class,
        BatchNorm in eval mode, no weight gradients."""
        if self.num_classes is None:
            raise RuntimeError("LIETPolicy.setup must run first (it reads the number of classes from the model)")
        grey = torch.full((self.num_classes, *like.shape[1:]), GREY, device=like.device, dtype=like.dtype)
        grey.requires_grad_(True)
        labels = torch.arange(self.num_classes, device=like.device)
        with model_mode(model, "eval"), torch.enable_grad():
            loss = random_smoothing_cross_entropy(model(grey), labels, self.smoothing).mean()
            grad = input_gradient(loss, grey)
        return (self.eps * grad.sign()).detach()

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        x, y = batch.x, batch.y
        if self._step % self.li_every == 0 or self._li is None:
            self._li = self.label_information(model, x)
        self._step += 1
        delta = self._li[y]
        replace = torch.rand_like(x, dtype=torch.float32)
        noise = torch.empty_like(x, dtype=torch.float32).uniform_(-self.noise_radius, self.noise_radius)
        ratio = torch.rand((), device=x.device) * (self.max_mask_ratio - self.min_mask_ratio) + self.min_mask_ratio
        delta = torch.where(replace < ratio, noise, delta)
        sign = torch.where(torch.rand((), device=x.device) < 0.5, -1.0, 1.0)
        return Perturbation(x=(x + sign * delta).clamp(0.0, 1.0).to(x.dtype).detach())

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        if context.label_smoothing != 0:
            raise ValueError(f"LIET smooths its labels itself (smoothing={self.smoothing}): train it with the "
                             f"Trainer's label_smoothing=0, not {context.label_smoothing}")
        x, y = batch.x, batch.y
        start = perturbation.x.detach().requires_grad_(True)
        start_logits = context.forward(start)
        start_loss = random_smoothing_cross_entropy(start_logits, y, self.smoothing).mean()
        (grad,) = torch.autograd.grad(start_loss, [start], retain_graph=True)
        x_adv = start.detach() + self.eps * grad.sign()
        if self.project:
            x_adv = x + (x_adv - x).clamp(-self.eps, self.eps)
        x_adv = x_adv.clamp(0.0, 1.0).to(x.dtype)
        logits = context.forward(x_adv)
        ce = random_smoothing_cross_entropy(logits, y, self.smoothing).mean()
        return TrainingLoss(ce + self.weight * jensen_shannon(start_logits, logits), logits)

    def metrics(self) -> Dict[str, float]:
        return {"js_weight": self.weight}

    def state_dict(self) -> Dict[str, Any]:
        li = torch.empty(0) if self._li is None else self._li.detach().clone()
        return {"epoch": self._epoch, "step": self._step, "li": li}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._epoch = check_positive_int(state["epoch"], "epoch", 0)
        self._step = check_positive_int(state["step"], "step", 0)
        li = state["li"]
        if not isinstance(li, Tensor):
            raise TypeError(f"LIETPolicy state 'li' must be a tensor, got {type(li).__name__}")
        self._li = None if li.numel() == 0 else li.clone()

    def __repr__(self) -> str:
        return (f"LIETPolicy(eps={self.eps!r}, lam={self.lam!r}, smoothing={self.smoothing!r}, "
                f"min_mask_ratio={self.min_mask_ratio!r}, max_mask_ratio={self.max_mask_ratio!r}, "
                f"li_every={self.li_every}, num_classes={self.num_classes})")


class LIETTrainer(Trainer):
    """LIET training (Pan et al. 2025) with the FastAT Benchmark's
    ``liet.yaml`` knobs: λ = 100 reached in the last epoch, random label
    smoothing 0.6, mask ratio in [0.1, 0.5], the label-information
    perturbations recomputed every 20 steps (see :class:`LIETPolicy`).
    Defaults: 30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4,
    batch 128, black crop padding — the schedule of the other presets. The
    policy smooths the labels itself, so ``label_smoothing`` must stay 0."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, lam: float = 100.0, smoothing: float = 0.6,
                 min_mask_ratio: float = 0.1, max_mask_ratio: float = 0.5, li_every: int = 20,
                 num_classes: Optional[int] = None, **kwargs: Any) -> None:
        if kwargs.get("label_smoothing", 0.0) != 0:
            raise ValueError(f"LIETTrainer smooths its labels itself (smoothing={smoothing!r}): leave "
                             f"label_smoothing at 0, not {kwargs['label_smoothing']!r}")
        policy = LIETPolicy(eps, lam=lam, smoothing=smoothing, min_mask_ratio=min_mask_ratio,
                            max_mask_ratio=max_mask_ratio, li_every=li_every, num_classes=num_classes)
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["EPS", "FASTAT_CONFIG", "GREY", "LARGE_EPS", "LIETPolicy", "LIETTrainer", "jensen_shannon",
           "random_smoothing_cross_entropy"]

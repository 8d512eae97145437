"""FGSM-FUAP (the AAAI 2024 paper the FastAT Benchmark cites,
ojs.aaai.org/index.php/AAAI/article/view/30147), the feature-wise variant of
FGSM-UAP: a bank of learned universal adversarial perturbations (50 for
CIFAR-10) and a small head on the model's penultimate features that picks
each example's UAP; the FGSM step starts from a random point of the ε-ball
plus the picked UAP, and each UAP is updated from the gradients at the
starts of the examples that picked it.

Images are pixels in [0, 1]; ε and the UAPs' radius are in pixel units.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int, check_radius
from ..data.batch import Batch
from ..policies.base import LossContext, Perturbation, PolicyContext, TrainingLoss
from ..training.trainer import Trainer
from ..utils.modes import model_mode
from ..utils.precision import mixed_precision
from ._universal import EPS, FASTAT_CONFIG, LAM, MOMENTUM_DECAY, UAP_EPS, UniversalFGSMPolicy

#: Size of the UAP bank (``uap_num`` of the FastAT Benchmark's CIFAR-10
#: config; its CIFAR-100 and Tiny-ImageNet configs use 200).
UAP_NUM = 50

#: Adam learning rate of the selector head (the reference's ``lr=0.001``).
FEATURE_LR = 1e-3


class UAPSelector(nn.Module):
    """The head that picks an example's UAP: ``scores = W₁·h + b₁`` (one
    score per UAP, the picked one is the argmax) and ``logits =
    W₂·relu(scores) + b₂`` (one per class), trained by cross-entropy against
    the labels so that the scores carry class information. ``h`` is the
    model's penultimate feature vector."""

    def __init__(self, features: int, uap_num: int, num_classes: int) -> None:
        super().__init__()
        self.scores = nn.Linear(features, uap_num)
        self.classifier = nn.Linear(uap_num, num_classes)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        scores = self.scores(h)
        return scores, self.classifier(F.relu(scores))


def feature_module_of(model: nn.Module, name: Optional[str]) -> nn.Module:
    """The module whose input is the model's feature vector: the submodule
    called ``name``, or with ``None`` the last ``nn.Linear`` of the model (its
    classifier, for every model in :mod:`advtrain.models`)."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"feature_module {name!r} is not a submodule of {type(model).__name__}")
        return modules[name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier whose input FGSM-FUAP could read as "
                         "its features: name the module with feature_module")
    return linears[-1]


def features_and_logits(model: nn.Module, module: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``model``'s logits for ``x`` and the input of ``module`` in that
    forward (its last call), flattened to (N, features). Runs as the caller
    has the model's mode and grad mode set."""
    seen: List[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the model's forward did not call its feature module {type(module).__name__}")
    return seen[-1].flatten(1), logits


class FGSMFUAPPolicy(UniversalFGSMPolicy):
    """FGSM-FUAP: a bank of ``uap_num`` UAPs and a :class:`UAPSelector` head.

    Per batch, before the steps of
    :class:`~advtrain.methods._universal.UniversalFGSMPolicy`:
    ``x_η = clip₀¹(x + η)``, ``η ~ U(−ε, ε)`` per pixel from torch's global
    generator; ``h`` = the model's features at ``x_η`` (the input of its
    classifier, one forward without gradients, BatchNorm in train mode as in
    the reference); example ``i`` uses UAP ``kᵢ = argmax scores(hᵢ)`` and
    starts from ``Π(x_ηᵢ + u_{kᵢ})``. The head is trained by Adam
    (``feature_lr``) on ``CE(logits(h), y)`` with the Trainer's label
    smoothing; its gradient is taken in :meth:`loss` and its step made in
    :meth:`after_step`, so this batch's choice is made with the head as it
    was before the batch, as in the reference. The head's weights and its
    optimizer state are in :meth:`state_dict`, next to the bank.

    Args:
        eps, uap_eps, lam, momentum_decay: as for
            :class:`~advtrain.methods._universal.UniversalFGSMPolicy`.
        uap_num: UAPs in the bank (>= 1).
        feature_lr: Adam learning rate of the head (>= 0).
        feature_module: name of the model's submodule whose input is the
            feature vector; ``None`` takes the model's last ``nn.Linear``.
    """

    def __init__(self, eps: float = EPS, *, uap_eps: float = UAP_EPS, lam: float = LAM,
                 momentum_decay: float = MOMENTUM_DECAY, uap_num: int = UAP_NUM, feature_lr: float = FEATURE_LR,
                 feature_module: Optional[str] = None) -> None:
        super().__init__(eps, uap_eps=uap_eps, lam=lam, momentum_decay=momentum_decay)
        self.uap_num = check_positive_int(uap_num, "uap_num")
        self.feature_lr = float(check_radius(feature_lr, "feature_lr"))
        if feature_module is not None and not isinstance(feature_module, str):
            raise TypeError(f"feature_module must be a module name or None, got {type(feature_module).__name__}")
        self.feature_module = feature_module
        self.model: Optional[nn.Module] = None
        self.selector: Optional[UAPSelector] = None
        self.selector_optimizer: Optional[torch.optim.Adam] = None
        self._module: Optional[nn.Module] = None

    def bank_size(self, model: nn.Module, context: PolicyContext) -> int:
        return self.uap_num

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        super().setup(model, context)  # the bank's draw first, the head's initialization after, as the reference
        # The plain model: a hook on its classifier reads the features (the
        # attack module of perturb may be a compiled view).
        self.model = model
        self._module = feature_module_of(model, self.feature_module)
        probe = torch.zeros(1, *context.image_shape, device=context.device)
        with model_mode(model, "eval"), torch.no_grad():  # moves no BatchNorm statistic
            features, logits = features_and_logits(model, self._module, probe)
        self.selector = UAPSelector(features.shape[1], self.uap_num, logits.shape[1]).to(context.device)
        self.selector_optimizer = torch.optim.Adam(self.selector.parameters(), lr=self.feature_lr)

    def select(self, model: nn.Module, batch: Batch) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        assert self.model is not None and self._module is not None and self.selector is not None, \
            "FGSMFUAPPolicy.setup must run before perturb"
        x = batch.x
        base = torch.clamp(x + torch.empty_like(x).uniform_(-self.eps, self.eps), 0.0, 1.0)
        with model_mode(self.model, "train"), torch.no_grad():
            features, _ = features_and_logits(self.model, self._module, base)
        with mixed_precision(x.device, None), torch.enable_grad():  # the head in float32, as the reference
            scores, logits = self.selector(features.float())
        return base, scores.detach().argmax(dim=1), {"selector_logits": logits}

    def loss(self, context: LossContext, batch: Batch, perturbation: Perturbation) -> TrainingLoss:
        out = super().loss(context, batch, perturbation)
        head_loss = context.cross_entropy(perturbation.extras["selector_logits"], batch.y)
        params = self.parameters()
        for param, grad in zip(params, torch.autograd.grad(head_loss, params)):
            param.grad = grad
        return out

    def after_step(self, model: nn.Module, batch: Batch, perturbation: Perturbation) -> None:
        assert self.selector_optimizer is not None
        super().after_step(model, batch, perturbation)
        self.selector_optimizer.step()  # the Trainer has averaged the head's gradients across processes
        self.selector_optimizer.zero_grad(set_to_none=True)

    def parameters(self) -> List[Tensor]:
        return [] if self.selector is None else list(self.selector.parameters())

    def state_dict(self) -> Dict[str, Any]:
        assert self.selector is not None and self.selector_optimizer is not None
        return {**super().state_dict(), "selector": self.selector.state_dict(),
                "selector_optimizer": self.selector_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.selector is not None and self.selector_optimizer is not None, \
            "FGSMFUAPPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        self.selector.load_state_dict(state["selector"])
        self.selector_optimizer.load_state_dict(state["selector_optimizer"])
        for group in self.selector_optimizer.param_groups:  # this run's setting wins over the checkpoint's
            group["lr"] = self.feature_lr

    def _arguments(self) -> str:
        return (f"{super()._arguments()}, uap_num={self.uap_num}, feature_lr={self.feature_lr!r}, "
                f"feature_module={self.feature_module!r}")


class FGSMFUAPTrainer(Trainer):
    """FGSM-FUAP training with the FastAT Benchmark's CIFAR-10 settings of the
    method (50 UAPs of radius and step 10/255 picked by a head trained with
    Adam at 1e-3, λ = 10, momentum decay 0.3, FGSM step ε = 8/255 from a
    random start) and the schedule of advtrain's other presets: 30 epochs,
    cyclic LR to 0.2, momentum 0.9, weight decay 5e-4, batch 128, black crop
    padding. The benchmark's protocol (100 epochs, one-cycle LR to 0.1,
    label smoothing 0.4, weight averaging τ = 0.9995) is in
    :data:`FASTAT_CONFIG`; for 100 classes its configs use ``uap_num=200``."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, uap_eps: float = UAP_EPS, lam: float = LAM,
                 momentum_decay: float = MOMENTUM_DECAY, uap_num: int = UAP_NUM, feature_lr: float = FEATURE_LR,
                 feature_module: Optional[str] = None, **kwargs: Any) -> None:
        defaults = dict(epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4, pad_fill=0.0)
        policy = FGSMFUAPPolicy(eps, uap_eps=uap_eps, lam=lam, momentum_decay=momentum_decay, uap_num=uap_num,
                                feature_lr=feature_lr, feature_module=feature_module)
        super().__init__(model, policy, **{**defaults, **kwargs})


__all__ = ["FASTAT_CONFIG", "FEATURE_LR", "UAP_NUM", "FGSMFUAPPolicy", "FGSMFUAPTrainer", "UAPSelector",
           "feature_module_of", "features_and_logits"]

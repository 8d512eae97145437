"""Method presets: a Trainer with a method's policy and its paper's defaults.

Every preset takes the model, ``eps`` (an L∞ radius in pixel units, at most
1; default 8/255) and the method's own knobs; any other keyword goes to
:class:`Trainer` and overrides the defaults listed in each docstring. Each
preset also sets the crop padding fill (``pad_fill``) of its paper's code: 0
(black) for FGSM, Fast-AT, PGD and N-FGSM (Wong et al.'s and Rice et al.'s
code), 0.5 (grey) for ATTA and APART.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .._validation import check_eps
from ..attacks.pgd import FGSM, FGSMRS, NFGSM, PGD
from ..policies.apart import APARTPolicy
from ..policies.atta import ATTAPolicy
from ..policies.attack_policy import AttackPolicy
from .schedules import cyclic_momentum
from .trainer import Trainer

EPS = 8 / 255


def _with_defaults(kwargs: dict, **defaults: Any) -> dict:
    return {**defaults, **kwargs}


class FGSMTrainer(Trainer):
    """FGSM adversarial training (Goodfellow et al. 2015): one signed-gradient
    step of size ε from the clean input, BatchNorm in train mode while
    attacking. Defaults: 30 epochs, cyclic LR to 0.2, momentum 0.9, weight
    decay 5e-4, batch 128. Expect catastrophic overfitting in long runs: robust
    accuracy collapses after some epochs (the APART paper's starting point)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, **kwargs: Any) -> None:
        super().__init__(model, AttackPolicy(FGSM(eps, bn_mode="train")),
                         **_with_defaults(kwargs, epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4,
                                          pad_fill=0.0))


class FastATTrainer(Trainer):
    """Fast-AT / FGSM-RS (Wong, Rice & Kolter 2020): uniform random start in the
    ε-ball, one step of α = 1.25ε, projection; BatchNorm in train mode.
    Defaults: 15 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, step_size: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(model, AttackPolicy(FGSMRS(eps, step_size=step_size, bn_mode="train")),
                         **_with_defaults(kwargs, epochs=15, lr=0.2, schedule="cyclic", weight_decay=5e-4,
                                          pad_fill=0.0))


class PGDTrainer(Trainer):
    """PGD-k adversarial training (Madry et al. 2018): random start, ``steps``
    steps of ``step_size`` (default 2/255 for ε = 8/255, i.e. ε/4), projection
    each step; BatchNorm in train mode as in Rice et al.'s code. Defaults: 10
    steps, 30 epochs, cyclic LR to 0.2, momentum 0.9, weight decay 5e-4 — the
    same schedule as the single-step presets so costs and robustness compare
    directly; pass ``schedule="piecewise", lr=0.1, epochs=200`` for Rice et
    al.'s long schedule."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, steps: int = 10, step_size: Optional[float] = None,
                 **kwargs: Any) -> None:
        eps = check_eps(eps, "linf", "eps")
        step = eps / 4 if step_size is None else step_size
        super().__init__(model, AttackPolicy(PGD(eps, steps=steps, step_size=step, random_start=True,
                                                 bn_mode="train")),
                         **_with_defaults(kwargs, epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4,
                                          pad_fill=0.0))


class NFGSMTrainer(Trainer):
    """N-FGSM (de Jorge et al. 2022): uniform noise in [-2ε, 2ε], one step of ε,
    no projection back to the ε-ball (only to [0,1]); BatchNorm in train mode.
    As cheap as FGSM and does not collapse. Defaults: 30 epochs, cyclic LR to
    0.2, momentum 0.9, weight decay 5e-4."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, noise: Optional[float] = None,
                 step_size: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(model, AttackPolicy(NFGSM(eps, step_size=step_size, noise=noise, bn_mode="train")),
                         **_with_defaults(kwargs, epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4,
                                          pad_fill=0.0))


class ATTATrainer(Trainer):
    """ATTA-k (Zheng et al. 2020): each example's perturbation is kept across
    epochs and continued by ``steps`` PGD steps (no random start; step 0.015 /
    0.01 / 0.007 for k = 1 / 3 / 10), BatchNorm in eval mode while attacking,
    store drawn as 0.001·N(0, 1) and drawn again before every
    ``reset_every``-th epoch (``reset_schedule`` and ``init`` as in
    :class:`~advtrain.policies.ATTAPolicy`); crops padded with grey
    (``pad_fill=0.5``) as in the reference code. Defaults: 30 epochs, cyclic
    LR to 0.2, momentum 0.9, weight decay 5e-4 (the same schedule as the other
    presets, for direct comparison)."""

    def __init__(self, model: nn.Module, *, eps: float = EPS, steps: int = 1, step_size: Optional[float] = None,
                 reset_every: int = 10, reset_schedule: str = "reference", init: str = "normal",
                 store_dtype: Union[str, torch.dtype] = "float32", **kwargs: Any) -> None:
        policy = ATTAPolicy(eps, steps=steps, step_size=step_size, reset_every=reset_every,
                            reset_schedule=reset_schedule, init=init, store_dtype=store_dtype)
        super().__init__(model, policy,
                         **_with_defaults(kwargs, epochs=30, lr=0.2, schedule="cyclic", weight_decay=5e-4,
                                          pad_fill=0.5))


class APARTTrainer(Trainer):
    """APART (Li et al. 2020): learnable input step, initialization scale and
    per-site layer steps, trained by gradient ascent, with a per-example
    learned initialization (see :class:`~advtrain.policies.APARTPolicy`).

    With advtrain's models the declared sites are used (8 for
    PreActResNet18); on other models name them with ``sites`` (module names)
    or pass ``layerwise=False``. Defaults follow the reference run: training ε
    0.031, 30 epochs, batch 128, SGD with momentum cycled 0.9 → 0.8 → 0.9
    against a triangular LR 0 → 0.2 → 0, weight decay 2e-4; step sizes ascend
    with peak LR ``step_lr`` = 5e-8 and decay ``step_weight_decay`` = 1200
    from ``init_step`` = ``init_scale`` = 1e-4 (α and α_ω). The step sizes grow
    with the summed step-size LR, so by default (``step_lr_rule="scaled"``) a
    run shorter than the reference's 30 epochs × 391 steps = 11,730 scales
    ``step_lr`` by 11,730 / its total steps
    (:func:`~advtrain.policies.apart.scaled_step_lr`);
    ``step_lr_rule="reference"`` keeps ``step_lr`` as given.
    Crops are padded with grey (``pad_fill=0.5``) as in the reference code.
    Evaluation uses PGD-20 at ε = 8/255.
    """

    def __init__(self, model: nn.Module, *, eps: float = 0.031, layerwise: bool = True,
                 sites: Optional[Sequence[str]] = None, init_step: float = 1e-4, init_scale: float = 1e-4,
                 step_lr: float = 5e-8, step_weight_decay: float = 1200.0,
                 store_dtype: Union[str, torch.dtype] = "float32", step_lr_rule: str = "scaled",
                 **kwargs: Any) -> None:
        policy = APARTPolicy(eps, layerwise=layerwise, sites=sites, init_step=init_step, init_scale=init_scale,
                             lr=step_lr, weight_decay=step_weight_decay, store_dtype=store_dtype,
                             lr_rule=step_lr_rule)
        epochs = kwargs.get("epochs", 30)
        super().__init__(model, policy,
                         **_with_defaults(kwargs, epochs=30, lr=0.2, schedule="cyclic", weight_decay=2e-4,
                                          momentum_schedule=cyclic_momentum(epochs), pad_fill=0.5))

"""ATTA: adversarial training with transferable (accumulated) adversarial
examples (Zheng, Zhang, Liu, Zhou, Ji & Hao, CVPR 2020)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .._validation import check_choice, check_eps, check_positive_int
from ..attacks.pgd import PGD
from ..data.batch import Batch
from ..utils.modes import model_mode
from .base import Perturbation, PerturbationPolicy, PolicyContext
from .store import PerExampleStore, resolve_store_dtype

#: The ATTA paper's step sizes for k = 1, 3 and 10 steps at ε = 8/255.
ATTA_STEP_SIZES = {1: 0.015, 3: 0.01, 10: 0.007}

#: Standard deviation (pixel units) of the reference code's initial perturbation.
ATTA_INIT_STD = 0.001

#: When the store is re-initialized: "reference" before each epoch whose
#: 1-based number is a multiple of ``reset_every`` (0-based epochs 9, 19, 29
#: for 10), "start" before each 0-based multiple (epochs 0, 10, 20).
RESET_SCHEDULES = ("reference", "start")

#: What a (re-)initialized store holds: "normal" 0.001·N(0, 1) per value,
#: "zero" no perturbation.
ATTA_INITS = ("normal", "zero")


class ATTAPolicy(PerturbationPolicy):
    """ATTA-k: each training example's perturbation is kept across epochs and
    strengthened by ``steps`` PGD steps per visit.

    The store holds one perturbation per example in padded coordinates (so it
    stays aligned under each epoch's crop and flip). Per batch: read the stored
    perturbation through the batch's crop/flip, project it to the ε-ball and
    [0, 1], run ``steps`` L∞ PGD steps from it (no random start, BatchNorm in
    ``bn_mode``), train on the result, and write the final perturbation back
    (un-flipped, pasted into the crop window; the border keeps its value).

    By default the store follows the reference code: at setup and before every
    epoch whose 1-based number is a multiple of ``reset_every`` (0-based
    epochs 9, 19, 29 for 10) every stored value is drawn anew as
    0.001·N(0, 1), from torch's global generator on the store's device (its
    state is part of a Trainer checkpoint, so a resumed run draws the same
    values). ``reset_schedule="start", init="zero"`` instead zeroes the store
    at the start and before 0-based epochs 10, 20, ….

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        steps: PGD steps per batch (k).
        step_size: per-step size; default from :data:`ATTA_STEP_SIZES`
            (0.015 / 0.01 / 0.007 for k = 1 / 3 / 10 at ε = 8/255, scaled in
            proportion to ε for other radii), else 2.5·ε/k.
        reset_every: re-initialize the store every this many epochs (0: never).
        reset_schedule: "reference" (before 0-based epochs ``reset_every - 1``,
            ``2·reset_every - 1``, …) or "start" (before 0-based epochs 0,
            ``reset_every``, ``2·reset_every``, …).
        init: what the store holds after setup and each reset: "normal"
            (0.001·N(0, 1), as the reference) or "zero".
        bn_mode: BatchNorm mode while attacking ("eval" as in the paper).
        store_dtype: "float32", "bfloat16" or "float16"; 16-bit halves the
            store's memory and rounds each stored perturbation to 8 (bf16) or
            11 (fp16) significant bits — for fp16 below 1e-4 pixel at ε = 8/255.
    """

    def __init__(self, eps: float = 8 / 255, *, steps: int = 1, step_size: Optional[float] = None,
                 reset_every: int = 10, reset_schedule: str = "reference", init: str = "normal",
                 bn_mode: str = "eval", store_dtype: Union[str, torch.dtype] = "float32") -> None:
        eps = float(check_eps(eps, "linf", "eps"))
        steps = check_positive_int(steps, "steps")
        if step_size is None:
            step_size = (ATTA_STEP_SIZES[steps] * eps / (8 / 255) if steps in ATTA_STEP_SIZES
                         else 2.5 * eps / steps)
        self.attack = PGD(eps, steps=steps, step_size=step_size, random_start=False, bn_mode=bn_mode)  # type: ignore[arg-type]
        self.reset_every = check_positive_int(reset_every, "reset_every", minimum=0)
        self.reset_schedule = check_choice(reset_schedule, "reset_schedule", RESET_SCHEDULES)
        self.init = check_choice(init, "init", ATTA_INITS)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.store: Optional[PerExampleStore] = None

    @property
    def eps(self) -> float:
        return float(self.attack.eps)

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.store = PerExampleStore.for_context(context, self.store_dtype)
        self._initialize()

    def _initialize(self) -> None:
        assert self.store is not None
        data = self.store.data
        if self.init == "zero":
            data.zero_()
        else:
            # float32 draws, as the reference's torch.randn, whatever the store's dtype
            data.copy_(torch.randn(data.shape, device=data.device).mul_(ATTA_INIT_STD))

    def resets_before(self, epoch: int) -> bool:
        """Whether the store is re-initialized before 0-based epoch ``epoch``."""
        if not self.reset_every:
            return False
        number = epoch + 1 if self.reset_schedule == "reference" else epoch
        return number % self.reset_every == 0

    def start_epoch(self, epoch: int) -> None:
        assert self.store is not None, "ATTAPolicy.setup must run before training"
        if self.resets_before(epoch):
            self._initialize()

    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        assert self.store is not None, "ATTAPolicy.setup must run before perturb"
        x = batch.x
        delta0 = self.store.read(batch.index, batch.aug)
        with model_mode(model, self.attack.bn_mode), torch.enable_grad():
            delta = self.attack.iterate(model, x, batch.y, delta0)
        self.store.write(batch.index, batch.aug, delta)
        return Perturbation(x=(x + delta).to(x.dtype))

    def state_dict(self) -> Dict[str, Any]:
        assert self.store is not None
        return {"store": self.store.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.store is not None, "ATTAPolicy.setup must run before load_state_dict"
        super().load_state_dict(state)
        self.store.load_state_dict(state["store"])

    def __repr__(self) -> str:
        return (f"ATTAPolicy(eps={self.eps}, steps={self.attack.steps}, step_size={self.attack.step_size}, "
                f"reset_every={self.reset_every}, reset_schedule={self.reset_schedule!r}, init={self.init!r})")

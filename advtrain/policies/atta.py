"""ATTA: adversarial training with transferable (accumulated) adversarial
examples (Zheng, Zhang, Liu, Zhou, Ji & Hao, CVPR 2020)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .._validation import check_eps, check_positive_int
from ..attacks.base import model_mode
from ..attacks.pgd import PGD
from ..data.batch import Batch
from .base import Perturbation, PerturbationPolicy, PolicyContext
from .store import PerExampleStore, resolve_store_dtype

#: The ATTA paper's step sizes for k = 1, 3 and 10 steps at ε = 8/255.
ATTA_STEP_SIZES = {1: 0.015, 3: 0.01, 10: 0.007}


class ATTAPolicy(PerturbationPolicy):
    """ATTA-k: each training example's perturbation is kept across epochs and
    strengthened by ``steps`` PGD steps per visit.

    The store holds one perturbation per example in padded coordinates (so it
    stays aligned under each epoch's crop and flip). Per batch: read the stored
    perturbation through the batch's crop/flip, project it to the ε-ball and
    [0, 1], run ``steps`` L∞ PGD steps from it (no random start, BatchNorm in
    ``bn_mode``), train on the result, and write the final perturbation back
    (un-flipped, pasted into the crop window; the border keeps its value). The
    store is zeroed every ``reset_every`` epochs (and at the start).

    Args:
        eps: L∞ radius, pixel units (at most 1: 8/255, not 8).
        steps: PGD steps per batch (k).
        step_size: per-step size; default from :data:`ATTA_STEP_SIZES`
            (0.015 / 0.01 / 0.007 for k = 1 / 3 / 10 at ε = 8/255, scaled in
            proportion to ε for other radii), else 2.5·ε/k.
        reset_every: zero the store every this many epochs (0: never).
        bn_mode: BatchNorm mode while attacking ("eval" as in the paper).
        store_dtype: "float32", "bfloat16" or "float16"; 16-bit halves the
            store's memory and rounds each stored perturbation to 8 (bf16) or
            11 (fp16) significant bits — for fp16 below 1e-4 pixel at ε = 8/255.
    """

    def __init__(self, eps: float = 8 / 255, *, steps: int = 1, step_size: Optional[float] = None,
                 reset_every: int = 10, bn_mode: str = "eval",
                 store_dtype: Union[str, torch.dtype] = "float32") -> None:
        eps = float(check_eps(eps, "linf", "eps"))
        steps = check_positive_int(steps, "steps")
        if step_size is None:
            step_size = (ATTA_STEP_SIZES[steps] * eps / (8 / 255) if steps in ATTA_STEP_SIZES
                         else 2.5 * eps / steps)
        self.attack = PGD(eps, steps=steps, step_size=step_size, random_start=False, bn_mode=bn_mode)  # type: ignore[arg-type]
        self.reset_every = check_positive_int(reset_every, "reset_every", minimum=0)
        self.store_dtype = resolve_store_dtype(store_dtype)
        self.store: Optional[PerExampleStore] = None

    @property
    def eps(self) -> float:
        return float(self.attack.eps)

    def setup(self, model: nn.Module, context: PolicyContext) -> None:
        self.store = PerExampleStore.for_context(context, self.store_dtype)

    def start_epoch(self, epoch: int) -> None:
        assert self.store is not None, "ATTAPolicy.setup must run before training"
        if self.reset_every and epoch % self.reset_every == 0:
            self.store.data.zero_()

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
        self.store.load_state_dict(state["store"])

    def __repr__(self) -> str:
        return (f"ATTAPolicy(eps={self.eps}, steps={self.attack.steps}, step_size={self.attack.step_size}, "
                f"reset_every={self.reset_every})")

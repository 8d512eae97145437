"""Per-example perturbation stores kept in padded image coordinates."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..data.augment import crop_padded, paste_padded
from ..data.batch import Augmentation

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PerExampleStore:
    """One tensor per training example, stored in *padded* coordinates
    ((C, H + 2p, W + 2p) for crop padding p) so that it stays aligned with the
    example under each epoch's new random crop and flip.

    :meth:`read` returns the window a batch's augmentation selected (mirrored
    when the image was flipped) in float32; :meth:`write` un-flips values and
    pastes them into the window, leaving the border as it was. The values are
    perturbations (or their directions), not pixels, so nothing here depends
    on the loader's padding fill: where a window reaches into the border, the
    batch image there is the fill and the stored value perturbs it. Rows are
    addressed by dataset index, never by batch position. A sharded store
    (``num_shards > 1``, one process of a distributed run) holds only the
    examples with ``index % num_shards == shard``, in row ``index // num_shards``.

    ``dtype`` may be ``torch.bfloat16`` or ``torch.float16`` to halve the
    memory (50,000 CIFAR examples at p = 4: 0.96 GB in float32, 0.48 GB in 16
    bits); values are rounded to that precision when written.
    """

    def __init__(self, num_examples: int, image_shape: Tuple[int, int, int], padding: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, *, shard: int = 0,
                 num_shards: int = 1) -> None:
        if dtype not in STORE_DTYPES.values():
            raise ValueError(f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards - 1}], got {shard}")
        c, h, w = image_shape
        self.padding = int(padding)
        self.image_shape = (int(c), int(h), int(w))
        self.num_examples = int(num_examples)
        self.num_shards = int(num_shards)
        rows = len(range(shard, num_examples, num_shards))
        self.data = torch.zeros(rows, c, h + 2 * padding, w + 2 * padding, device=device, dtype=dtype)

    @classmethod
    def for_context(cls, context: Any, dtype: torch.dtype = torch.float32) -> "PerExampleStore":
        """A store sized for a training run's :class:`~advtrain.policies.PolicyContext`."""
        return cls(context.num_examples, context.image_shape, context.padding, context.device, dtype,
                   shard=context.shard, num_shards=context.num_shards)

    def _rows(self, index: Tensor) -> Tensor:
        return index if self.num_shards == 1 else torch.div(index, self.num_shards, rounding_mode="floor")

    def _centre(self, index: Tensor) -> Augmentation:
        n = index.shape[0]
        offset = torch.full((n,), self.padding, dtype=torch.long, device=index.device)
        return Augmentation(top=offset, left=offset, flip=torch.zeros(n, dtype=torch.bool, device=index.device),
                            padding=self.padding)

    def _check(self, aug: Optional[Augmentation], index: Tensor) -> Augmentation:
        if aug is None:
            return self._centre(index)
        if aug.padding != self.padding:
            raise ValueError(f"the batch was augmented with padding {aug.padding}, the store uses {self.padding}")
        return aug

    def read(self, index: Tensor, aug: Optional[Augmentation]) -> Tensor:
        """The stored values of examples ``index`` as the batch sees them
        (float32, shape (B, C, H, W)); ``aug=None`` reads the un-augmented window."""
        return crop_padded(self.data[self._rows(index)], self._check(aug, index)).float()

    def write(self, index: Tensor, aug: Optional[Augmentation], values: Tensor) -> None:
        """Store a batch's ``values`` (B, C, H, W) back for examples ``index``."""
        rows = self._rows(index)
        self.data[rows] = paste_padded(self.data[rows], values.detach().to(self.data.dtype), self._check(aug, index))

    @contextmanager
    def preserved(self, index: Tensor) -> Iterator[None]:
        """Put the stored values of examples ``index`` (dataset indices of
        examples this store holds) back as they were when the block is left,
        even on error: for code that runs a policy outside training, such as
        a probe of its perturbations, whose writes must not reach the run.
        Costs one copy of those rows."""
        rows = self._rows(index)
        saved = self.data[rows]  # indexing with a tensor copies
        try:
            yield
        finally:
            self.data[rows] = saved

    def state_dict(self) -> Dict[str, Any]:
        return {"data": self.data}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        data = state["data"]
        if data.shape != self.data.shape:
            raise ValueError(f"stored perturbations have shape {tuple(data.shape)}, "
                             f"this run needs {tuple(self.data.shape)} (different dataset or padding?)")
        self.data.copy_(data)


def resolve_store_dtype(dtype: Any) -> torch.dtype:
    """Accept a torch dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, str):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}")
        return STORE_DTYPES[dtype]
    if dtype not in STORE_DTYPES.values():
        raise ValueError(f"store_dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}")
    return dtype

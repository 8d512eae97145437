"""A copy of a model's parameters and buffers, put back after code that may
write them (an attack in ``bn_mode="train"`` updates BatchNorm running
statistics; a faulty attack may even write weights)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn


class ModelSnapshot:
    """The values of every parameter and buffer of ``model`` when built.

    :meth:`restore` copies them back in place (device to device, no host
    synchronisation), so the tensors the model and any optimizer hold stay the
    same objects; as a context manager it restores on leaving the block, even
    on error. Memory: one copy of the parameters and buffers on their
    devices; each restore reads and writes that much.
    """

    def __init__(self, model: nn.Module) -> None:
        self._live: List[Tensor] = [*model.parameters(), *model.buffers()]
        with torch.no_grad():
            self._saved = [t.detach().clone() for t in self._live]

    def restore(self) -> None:
        """Put every parameter and buffer back to its value at construction."""
        with torch.no_grad():
            for live, saved in zip(self._live, self._saved):
                live.copy_(saved)

    def __enter__(self) -> "ModelSnapshot":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


__all__ = ["ModelSnapshot"]

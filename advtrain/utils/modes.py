"""Switching a model between train and eval mode for the length of a block."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

from torch import nn

BNMode = Literal["eval", "train", "keep"]
BN_MODES = ("eval", "train", "keep")


@contextmanager
def model_mode(model: nn.Module, mode: BNMode) -> Iterator[None]:
    """Put ``model`` in ``mode`` for the duration of the block and restore every
    submodule's own train/eval flag afterwards, even on error.

    ``"eval"`` uses BatchNorm running statistics (and disables dropout);
    ``"train"`` uses batch statistics and, like an ordinary training forward,
    updates the running statistics; ``"keep"`` leaves the model as it is.
    """
    if mode == "keep":
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


__all__ = ["BNMode", "BN_MODES", "model_mode"]

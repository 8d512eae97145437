"""The check of a model's outputs that runs once when training starts: labels
the model has no logit for, and probabilities where the losses expect logits."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Union

import torch
from torch import Tensor, nn

from .._validation import looks_like_probabilities
from ..utils.modes import model_mode
from ..utils.pixels import to_pixels

PROBE_EXAMPLES = 8
"""Training images in the probe forward pass: enough that probability rows
cannot pass for logits by chance, few enough to cost nothing next to an epoch."""


def check_model_outputs(model: nn.Module, images: Tensor, max_label: int,
                        device: Union[str, torch.device, None] = None) -> None:
    """Run ``model`` once on the first few training ``images`` and check its
    outputs against the training labels, whose largest value is ``max_label``.

    ``images`` are uint8 (N, C, H, W) pixel values 0..255 or float pixels in
    [0, 1]; the few used are moved to ``device`` (default: where they are).
    The forward pass runs without gradients, in eval mode (BatchNorm
    running statistics are read, not updated; train/eval flags are restored)
    and inside a forked RNG, so the model's parameters, buffers, flags and
    torch's random state are as before.

    Raises ``ValueError`` when the outputs are not (N, classes) or when a
    label is at least the number of outputs; warns (``UserWarning``) when the
    outputs look like probabilities rather than logits.
    """
    x = images[:PROBE_EXAMPLES].to(device if device is not None else images.device)
    # The probe runs in the weights' dtype (float64 models get float64 images).
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = to_pixels(x, dtype)
    forked = [x.device] if x.device.type == "cuda" else []
    with model_mode(model, "eval"), torch.no_grad(), torch.random.fork_rng(devices=forked):
        outputs = model(x)
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"model must return logits of shape (N, classes) to be trained, got {shape}")
    classes = int(outputs.shape[1])
    if max_label >= classes:
        raise ValueError(
            f"the training labels go up to {max_label}, but the model returns {classes} logits per image "
            f"(labels 0..{classes - 1}): build the model with num_classes={max_label + 1} (or more), "
            f"or pass labels in [0, {classes - 1}]")
    if bool(looks_like_probabilities(outputs)):
        warnings.warn(
            "the model's outputs look like probabilities, not logits: on training images every output row is "
            "non-negative and sums to 1. The training loss and the attacks' losses (cross-entropy, DLR, "
            "margin) assume logits and apply their own softmax or compare raw scores, so on probabilities they "
            "compute something else; return logits (drop the final softmax)", UserWarning,
            stacklevel=_caller_outside_advtrain())


def _caller_outside_advtrain() -> int:
    """The ``stacklevel`` for a warning issued by this function's caller that
    points at the first frame outside the advtrain package (the user's call
    of ``fit``), however many advtrain frames lie between."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


__all__ = ["check_model_outputs", "PROBE_EXAMPLES"]

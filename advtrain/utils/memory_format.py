"""Which models may train in channels-last memory format on a CPU.

oneDNN's 1×1 convolution kernel for x86 CPUs writes past its workspace in
the weight-gradient pass when the convolution is strided and has fewer input
channels per group than its channel block (8 on AVX2, 16 on AVX-512) and
the tensors are channels-last (NHWC): heap corruption, hangs or wrong
weight gradients (oneDNN issue #6035). With torch 2.13.0's CPU build on an
AVX2 machine, the backward of a 1×1 stride-2 convolution with 2 to 6 input
channels aborted with one thread and hung with two; the strided 1×1
shortcuts of a PreActResNet18 of width 2 or 4 are such convolutions.
Contiguous (NCHW) tensors take another kernel and are correct.
"""
from __future__ import annotations

from typing import List

from torch import nn

#: Input channels per group from which oneDNN's strided 1×1 kernel is safe
#: on every x86 CPU (the AVX-512 channel block; AVX2's is 8).
SAFE_1X1_CHANNELS = 16


def unsafe_channels_last_convs(model: nn.Module) -> List[str]:
    """Names of the convolutions of ``model`` that oneDNN's CPU kernel
    mishandles in channels-last format: 2-d, 1×1, strided, with fewer than
    :data:`SAFE_1X1_CHANNELS` input channels per group."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) != (1, 1) and module.in_channels // module.groups < SAFE_1X1_CHANNELS]


__all__ = ["SAFE_1X1_CHANNELS", "unsafe_channels_last_convs"]

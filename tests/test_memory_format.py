"""Channels-last format on the CPU is left off for models with a strided 1×1
convolution of few input channels, whose channels-last weight gradient
oneDNN computes wrongly (on AVX2 CPUs the process aborts or hangs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain import Trainer
from advtrain.models import PreActResNet18, SmallCNN
from advtrain.utils.memory_format import SAFE_1X1_CHANNELS, unsafe_channels_last_convs


def test_the_strided_narrow_1x1_convolutions_are_found():
    # the strided shortcuts of width 4 read 4, 8 and 16 channels: the first two are < 16
    assert unsafe_channels_last_convs(PreActResNet18(width=4)) == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    assert unsafe_channels_last_convs(PreActResNet18(width=16)) == []
    assert unsafe_channels_last_convs(SmallCNN()) == []
    narrow = nn.Sequential(nn.Conv2d(3, 4, 1, stride=1), nn.Conv2d(4, 8, 3, stride=2), nn.Conv2d(8, 8, 1, stride=3),
                           nn.Conv2d(32, 32, 1, stride=2, groups=4), nn.Conv2d(32, 32, 1, stride=2))
    # stride 1 and 3x3 kernels are safe; 8 channels per group is not; 32 in 4 groups is 8 per group
    assert unsafe_channels_last_convs(narrow) == ["2", "3"]
    # at the threshold itself the kernel is safe
    assert unsafe_channels_last_convs(nn.Conv2d(SAFE_1X1_CHANNELS, 8, 1, stride=2)) == []
    assert unsafe_channels_last_convs(nn.Conv2d(SAFE_1X1_CHANNELS - 1, 8, 1, stride=2)) == [""]


def test_a_model_with_one_trains_in_contiguous_format_on_the_cpu_with_a_warning():
    torch.manual_seed(0)
    model = PreActResNet18(width=2, normalize=False)
    with pytest.warns(UserWarning, match=r"layer2.0.shortcut.0 \(and 2 more\) is a strided 1x1 convolution"):
        trainer = Trainer(model, epochs=1, batch_size=8, progress=False, eval_every=0, device="cpu")
    assert trainer.channels_last is False
    # training in this process would abort on an AVX2 CPU in channels-last format
    trainer.fit((torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10))
    assert all(p.is_contiguous() for p in model.parameters())
    wide = Trainer(PreActResNet18(width=16), epochs=1, progress=False, device="cpu")
    assert wide.channels_last is True
    assert Trainer(PreActResNet18(width=2), channels_last=False, progress=False, device="cpu").channels_last is False

"""Post-activation ResNet-18 for 32×32 images (He et al. 2016, "Deep Residual
Learning for Image Recognition"), in the CIFAR form the FastAT Benchmark
trains (its ``models/resnet.py``, the widely copied ``pytorch-cifar`` ResNet)."""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int
from .normalize import make_normalize, recorded_arguments
from .sites import SiteModule


class BasicBlock(nn.Module):
    """Post-activation basic block: site → conv3×3 → bn1 → relu → conv3×3 →
    bn2, plus the shortcut, then relu.

    The shortcut is the identity on ``x`` when stride and channel count are
    kept; otherwise a 1×1 convolution (with the block's stride) followed by
    BatchNorm, both reading the block input ``x``. The :class:`SiteModule`
    ``site`` sits on the residual branch only, where the block input enters
    the first convolution: a perturbation there never reaches the shortcut,
    and the site's activation gradient is the one through ``conv1`` alone.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.site = SiteModule()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.site(x))))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """Post-activation ResNet-18 for 32×32 inputs, the network the FastAT
    Benchmark trains.

    Architecture: an optional :class:`~advtrain.models.Normalize`, a 3×3 stem
    convolution with ``width`` channels, BatchNorm and ReLU, four stages of
    two :class:`BasicBlock` each at ``width``, 2·``width``, 4·``width``,
    8·``width`` channels (strides 1, 2, 2, 2), 4×4 average pooling and a
    linear classifier. Stages 2–4 start with a 1×1 projection shortcut
    (convolution and BatchNorm); every other block adds its input. With
    ``width=64`` and 10 classes it has 11,173,962 parameters. Parameter and
    buffer names match the benchmark's ``ResNet18`` (plus ``normalize.mean``
    and ``normalize.std`` when normalizing). The benchmark feeds raw [0, 1]
    pixels to the stem, so its network is ``ResNet18(normalize=False)``.

    Perturbation sites: one per residual block, on the residual branch only,
    at the block input where it enters the block's first convolution
    (``conv1``); the shortcut always gets the unperturbed block input:
    ``"layer1.0.site"``, ``"layer1.1.site"``, ..., ``"layer4.1.site"`` (8
    sites), the places where APART perturbs its pre-activation network's
    blocks.

    Args:
        num_classes: number of output logits.
        normalize: ``True`` (default) for a :class:`Normalize` with CIFAR-10
            statistics, ``False``/``None`` for none, or a module to use.
        width: channels of the stem and first stage (64 in the benchmark);
            smaller values give fast test models.

    Input: float (N, 3, 32, 32) pixels in [0, 1]. Output: (N, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        normalize: Union[bool, nn.Module, None] = True,
        width: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(width, "width")
        #: Constructor arguments recorded in checkpoints.
        self.init_kwargs = recorded_arguments(normalize, num_classes=num_classes, width=width)
        self.normalize = make_normalize(normalize)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._make_layer(width, planes[0], 1)
        self.layer2 = self._make_layer(planes[0], planes[1], 2)
        self.layer3 = self._make_layer(planes[1], planes[2], 2)
        self.layer4 = self._make_layer(planes[2], planes[3], 2)
        self.linear = nn.Linear(planes[3], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))

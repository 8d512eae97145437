"""Pre-activation ResNet-18 for 32×32 images (He et al. 2016, "Identity
Mappings in Deep Residual Networks"), as used by Fast-AT (Wong et al. 2020)
and APART (Li et al. 2020)."""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int
from .normalize import make_normalize
from .sites import SiteModule


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``relu(bn1(x))`` → site → conv3×3 →
    bn2 → relu → conv3×3, plus the shortcut.

    The shortcut is the identity on ``x`` when shape is kept; otherwise a
    1×1 convolution of the (possibly perturbed) pre-activation, as in the
    reference implementation. The :class:`SiteModule` ``site`` marks the
    pre-activation feeding the first convolution.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.site = SiteModule()
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.site(F.relu(self.bn1(x)))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32×32 inputs.

    Architecture (Wong et al. ``fast_adversarial`` / APART): an optional
    :class:`~advtrain.models.Normalize`, a 3×3 stem convolution, four stages of
    two :class:`PreActBlock` each at ``width``, 2·``width``, 4·``width``,
    8·``width`` channels (strides 1, 2, 2, 2), then BatchNorm, ReLU, 4×4
    average pooling and a linear classifier. With ``width=64`` and 10 classes
    it has 11,172,170 parameters (the often-quoted 11,173,962 is the
    post-activation ResNet-18, whose BatchNorm layers sit elsewhere: 1,792
    more BatchNorm weights and biases).

    Perturbation sites: one per residual block, at the pre-activation
    ``relu(bn1(x))`` that feeds the block's first convolution (and its 1×1
    shortcut convolution where there is one): ``"layer1.0.site"``,
    ``"layer1.1.site"``, ..., ``"layer4.1.site"`` (8 sites).

    Args:
        num_classes: number of output logits.
        normalize: ``True`` (default) for a :class:`Normalize` with CIFAR-10
            statistics, ``False``/``None`` for none, or a module to use.
        width: channels of the stem and first stage (64 in the reference);
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
        self.normalize = make_normalize(normalize)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._make_layer(width, planes[0], stride=1)
        self.layer2 = self._make_layer(planes[0], planes[1], stride=2)
        self.layer3 = self._make_layer(planes[1], planes[2], stride=2)
        self.layer4 = self._make_layer(planes[2], planes[3], stride=2)
        self.bn = nn.BatchNorm2d(planes[3])
        self.linear = nn.Linear(planes[3], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))

"""Wide residual network for 32×32 images (Zagoruyko & Komodakis 2016), in
the form used by Madry-style adversarial training (TRADES, MART, AWP)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int
from .normalize import make_normalize, recorded_arguments
from .sites import SiteModule


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: ``relu(bn1(x))`` → site → conv3×3 → bn2 →
    relu → dropout → conv3×3, plus the shortcut.

    The shortcut is the identity on ``x`` when stride and channel count are
    kept, otherwise a 1×1 convolution (with the block's stride) of the
    unperturbed pre-activation ``relu(bn1(x))``, as in the WRN of the TRADES
    and ATTA code. The :class:`SiteModule` ``site`` sits on the residual
    branch only, between the pre-activation and the first convolution: a
    perturbation there never reaches the shortcut, and the site's activation
    gradient is the one through ``conv1`` alone.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.site = SiteModule()
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: Optional[nn.Conv2d] = None
        if in_planes != planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(self.site(pre))))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32×32 inputs.

    Architecture: an optional :class:`~advtrain.models.Normalize`, a 3×3 stem
    convolution with 16 channels, three groups of n = (depth − 4) / 6
    :class:`WideBasicBlock` at 16·``widen``, 32·``widen``, 64·``widen``
    channels (strides 1, 2, 2), then BatchNorm, ReLU, 8×8 average pooling and
    a linear classifier. Convolutions use He (fan-out) initialization.
    WRN-28-10 with 10 classes has 36,479,194 parameters; WRN-34-10 46,160,474.

    Perturbation sites: one per block, on the residual branch only, at the
    pre-activation ``relu(bn1(x))`` where it enters the block's first
    convolution (the shortcut gets the unperturbed tensor):
    ``"block1.0.site"``, ..., ``"block3.{n-1}.site"`` (3n sites). APART's
    reference code has no WRN; these sites sit where it perturbs its
    PreActResNet18's blocks.

    Args:
        depth: total depth, 6n + 4 with n >= 1 (28 and 34 are usual).
        widen: width multiplier (10 in the usual WRN-28-10 / WRN-34-10).
        num_classes: number of output logits.
        normalize: ``True`` (default) for a :class:`Normalize` with CIFAR-10
            statistics, ``False``/``None`` for none, or a module to use.
        dropout: dropout probability inside each block, in [0, 1).

    Input: float (N, 3, 32, 32) pixels in [0, 1]. Output: (N, num_classes) logits.
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        num_classes: int = 10,
        *,
        normalize: Union[bool, nn.Module, None] = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(depth, "depth")
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}"
            )
        check_positive_int(widen, "widen")
        check_positive_int(num_classes, "num_classes")
        is_number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        if not is_number or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        #: Constructor arguments recorded in checkpoints (dropout leaves no trace in the weights).
        self.init_kwargs = recorded_arguments(normalize, depth=depth, widen=widen, num_classes=num_classes,
                                              dropout=float(dropout))
        self.normalize = make_normalize(normalize)
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, channels[0], channels[1], 1, float(dropout))
        self.block2 = self._make_group(n, channels[1], channels[2], 2, float(dropout))
        self.block3 = self._make_group(n, channels[2], channels[3], 2, float(dropout))
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(
        n: int, in_planes: int, planes: int, stride: int, dropout: float
    ) -> nn.Sequential:
        first = WideBasicBlock(in_planes, planes, stride, dropout)
        rest = [WideBasicBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(first, *rest)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.flatten(1))

"""Pre-activation ResNet-18 for 32×32 images (He et al. 2016, "Identity
Mappings in Deep Residual Networks"), the network of Fast-AT (Wong et al.
2020) and APART (Li et al. 2020), in two variants that differ only in what
the 1×1 projection shortcuts read."""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int
from .normalize import make_normalize, recorded_arguments
from .sites import SiteModule

SHORTCUTS = ("preact", "input")
"""What a block's 1×1 projection shortcut reads: ``"preact"`` the block's
pre-activation ``relu(bn1(x))``, shared by both paths as in He et al.'s
pre-activation unit for increasing dimensions (and the widely copied
``pytorch-cifar`` ``PreActBlock``); ``"input"`` the block input ``x``, as in
the reference code of Fast-AT (Wong et al.'s ``fast_adversarial``) and of
APART (Li et al.'s ``models/preresnet.py``)."""


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``relu(bn1(x))`` → site → conv3×3 →
    bn2 → relu → conv3×3, plus the shortcut.

    The shortcut is the identity on ``x`` when stride and channel count are
    kept; otherwise a 1×1 convolution (with the block's stride) of the
    unperturbed pre-activation ``relu(bn1(x))`` (``shortcut="preact"``) or of
    the block input ``x`` (``shortcut="input"``). The :class:`SiteModule`
    ``site`` sits on the residual branch only, between the pre-activation and
    the first convolution: a perturbation there never reaches the shortcut,
    and the site's activation gradient is the one through ``conv1`` alone.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "input") -> None:
        super().__init__()
        self.shortcut_from_input = check_choice(shortcut, "shortcut", SHORTCUTS) == "input"
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
        pre = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.shortcut_from_input else pre)
        out = self.conv1(self.site(pre))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32×32 inputs.

    Architecture: an optional :class:`~advtrain.models.Normalize`, a 3×3 stem
    convolution, four stages of two :class:`PreActBlock` each at ``width``,
    2·``width``, 4·``width``, 8·``width`` channels (strides 1, 2, 2, 2), then
    BatchNorm, ReLU, 4×4 average pooling and a linear classifier. Stages 2–4
    start with a 1×1 projection shortcut; every other block adds its input.
    With ``width=64`` and 10 classes it has 11,172,170 parameters in either
    variant (the often-quoted 11,173,962 is the post-activation ResNet-18,
    whose BatchNorm layers sit elsewhere: 1,792 more BatchNorm weights and
    biases).

    Two variants with the same parameters and state_dict keys:
    ``shortcut="input"`` (default) has projection shortcuts that read the
    block input ``x``, as in the reference code of Fast-AT (Wong et al.'s
    ``fast_adversarial``) and APART (Li et al.'s ``models/preresnet.py``);
    ``shortcut="preact"`` has projection shortcuts that read the block's
    pre-activation ``relu(bn1(x))``, as in He et al.'s pre-activation unit.
    Only the constructor arguments tell the variants apart, so they are kept
    in :attr:`init_kwargs` and recorded in checkpoints.
    The APART reference feeds raw pixels to the stem (no normalization):
    ``PreActResNet18(normalize=False, shortcut="input")`` is its network;
    Fast-AT normalizes with CIFAR-10 statistics, as ``normalize=True`` does.

    Perturbation sites: one per residual block, on the residual branch only,
    at the pre-activation ``relu(bn1(x))`` where it enters the block's first
    convolution; the shortcut always gets the unperturbed tensor:
    ``"layer1.0.site"``, ``"layer1.1.site"``, ..., ``"layer4.1.site"`` (8
    sites), the points where APART's reference adds its layer perturbations.

    Args:
        num_classes: number of output logits.
        normalize: ``True`` (default) for a :class:`Normalize` with CIFAR-10
            statistics, ``False``/``None`` for none, or a module to use.
        width: channels of the stem and first stage (64 in the reference);
            smaller values give fast test models.
        shortcut: ``"input"`` (default) or ``"preact"``, what the projection shortcuts
            read (see above).

    Input: float (N, 3, 32, 32) pixels in [0, 1]. Output: (N, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        normalize: Union[bool, nn.Module, None] = True,
        width: int = 64,
        shortcut: str = "input",
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(width, "width")
        check_choice(shortcut, "shortcut", SHORTCUTS)
        #: Constructor arguments recorded in checkpoints: the two variants have
        #: the same weights, so only this tells them apart.
        self.init_kwargs = recorded_arguments(normalize, num_classes=num_classes, width=width, shortcut=shortcut)
        self.normalize = make_normalize(normalize)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._make_layer(width, planes[0], 1, shortcut)
        self.layer2 = self._make_layer(planes[0], planes[1], 2, shortcut)
        self.layer3 = self._make_layer(planes[1], planes[2], 2, shortcut)
        self.layer4 = self._make_layer(planes[2], planes[3], 2, shortcut)
        self.bn = nn.BatchNorm2d(planes[3])
        self.linear = nn.Linear(planes[3], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int, shortcut: str) -> nn.Sequential:
        return nn.Sequential(PreActBlock(in_planes, planes, stride, shortcut),
                             PreActBlock(planes, planes, 1, shortcut))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))

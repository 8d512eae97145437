"""A small convolutional network with BatchNorm for CPU tests and examples."""
from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from .._validation import check_positive_int
from .normalize import make_normalize, recorded_arguments
from .sites import SiteModule


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Three conv–BatchNorm–ReLU stages and a linear classifier, for 32×32 inputs.

    Architecture: an optional :class:`~advtrain.models.Normalize`; stage 1
    (``width`` channels, 32×32) and 2×2 max pooling; site ``"site1"``;
    stage 2 (2·``width`` channels, 16×16) and 2×2 max pooling; site
    ``"site2"``; stage 3 (4·``width`` channels, 8×8); global average pooling
    and a linear layer. With ``width=16`` it has about 24k parameters and
    trains to well above chance on CIFAR-10 within a minute on two CPU cores.

    Perturbation sites (2): ``"site1"`` (the pooled stage-1 activation,
    shape (N, width, 16, 16)) and ``"site2"`` (the pooled stage-2 activation,
    shape (N, 2·width, 8, 8)), each feeding the next convolution.

    Args:
        num_classes: number of output logits.
        width: channels of the first stage.
        normalize: ``True`` (default) for a :class:`Normalize` with CIFAR-10
            statistics, ``False``/``None`` for none, or a module to use.

    Input: float (N, 3, 32, 32) pixels in [0, 1]. Output: (N, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        width: int = 16,
        normalize: Union[bool, nn.Module, None] = True,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(width, "width")
        #: Constructor arguments recorded in checkpoints.
        self.init_kwargs = recorded_arguments(normalize, num_classes=num_classes, width=width)
        self.normalize = make_normalize(normalize)
        self.stage1 = _conv_bn_relu(3, width)
        self.pool1 = nn.MaxPool2d(2)
        self.site1 = SiteModule()
        self.stage2 = _conv_bn_relu(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.site2 = SiteModule()
        self.stage3 = _conv_bn_relu(2 * width, 4 * width)
        self.pool3 = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.site1(self.pool1(self.stage1(self.normalize(x))))
        out = self.site2(self.pool2(self.stage2(out)))
        out = self.pool3(self.stage3(out))
        return self.linear(out.flatten(1))

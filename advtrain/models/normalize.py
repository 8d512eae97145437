"""Per-channel input normalization as the first layer of a model.

advtrain's models take pixels in [0, 1] and normalize inside the model, so
attack radii (ε, step sizes) are always in pixel units.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

CIFAR10_MEAN: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of the CIFAR-10 training images, pixels in [0, 1]."""
CIFAR10_STD: Tuple[float, float, float] = (0.2471, 0.2435, 0.2616)
"""Per-channel (R, G, B) standard deviation of the CIFAR-10 training images, pixels in [0, 1]."""
CIFAR100_MEAN: Tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
"""Per-channel (R, G, B) mean of the CIFAR-100 training images, pixels in [0, 1]."""
CIFAR100_STD: Tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
"""Per-channel (R, G, B) standard deviation of the CIFAR-100 training images, pixels in [0, 1]."""


def _as_channel_values(value: Union[Sequence[float], Tensor], name: str) -> Tensor:
    if isinstance(value, Tensor):
        t = value.detach().to("cpu", torch.float32).flatten()
    else:
        try:
            t = torch.tensor([float(v) for v in value], dtype=torch.float32, device="cpu")
        except TypeError:
            raise TypeError(
                f"{name} must be a sequence of numbers (one per channel), "
                f"got {type(value).__name__}"
            )
    if t.numel() == 0:
        raise ValueError(f"{name} must hold one value per channel, got none")
    if not all(math.isfinite(v) for v in t.tolist()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


class Normalize(nn.Module):
    """Map pixels in [0, 1] to ``(x - mean) / std`` per channel.

    Args:
        mean: one mean per channel, in pixel units ([0, 1] scale).
        std: one standard deviation per channel, in pixel units; all > 0.

    Input: a float tensor (N, C, H, W) of pixels in [0, 1] with C equal to the
    number of channels given. Output: the same shape and memory format.
    ``mean`` and ``std`` are stored as buffers of shape (1, C, 1, 1), so they
    follow the model's device and are saved in its ``state_dict``.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: Union[Sequence[float], Tensor], std: Union[Sequence[float], Tensor]
    ) -> None:
        super().__init__()
        m = _as_channel_values(mean, "mean")
        s = _as_channel_values(std, "std")
        if m.numel() != s.numel():
            raise ValueError(
                "mean and std must have one value per channel each, "
                f"got {m.numel()} and {s.numel()}"
            )
        if not bool((s > 0).all()):
            raise ValueError(f"std must be > 0 for every channel, got {s.tolist()}")
        self.register_buffer("mean", m.reshape(1, -1, 1, 1))
        self.register_buffer("std", s.reshape(1, -1, 1, 1))

    @property
    def num_channels(self) -> int:
        """Number of input channels C."""
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"Normalize expects input of shape (N, {self.num_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def make_normalize(normalize: Union[bool, nn.Module, None]) -> nn.Module:
    """The first layer of a model from its ``normalize`` argument.

    ``True`` gives :class:`Normalize` with CIFAR-10 statistics; ``False`` or
    ``None`` gives ``nn.Identity`` (the model then sees raw [0, 1] pixels); a
    module (normally a :class:`Normalize`) is used as given.
    """
    if normalize is True:
        return Normalize(CIFAR10_MEAN, CIFAR10_STD)
    if normalize is False or normalize is None:
        return nn.Identity()
    if isinstance(normalize, nn.Module):
        return normalize
    raise TypeError(
        "normalize must be True, False, None or an nn.Module (e.g. Normalize), "
        f"got {type(normalize).__name__}"
    )


def recorded_arguments(normalize: Union[bool, nn.Module, None], **kwargs: Any) -> Dict[str, Any]:
    """A model's constructor arguments as plain values, for checkpoints: what
    :func:`~advtrain.models.build_model` needs to rebuild the same network
    (its weights alone do not say everything, e.g. where a shortcut reads).
    A :class:`Normalize` module is recorded as ``True``: its statistics are
    buffers in the weights, which the rebuilt model's ``Normalize`` loads.
    Any other module is left out, and the model then has no registry record
    (:func:`~advtrain.models.model_record`)."""
    if normalize is None or isinstance(normalize, bool):
        kwargs["normalize"] = bool(normalize)
    elif isinstance(normalize, Normalize):
        kwargs["normalize"] = True
    return kwargs


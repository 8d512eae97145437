"""The :class:`Attack` interface: a stateless map ``(model, x, y) -> x_adv``."""
from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from .._validation import (RADIUS_NORMS, Radius, check_choice, check_eps, check_images, check_l2_radius,
                           check_labels, largest_radius)
from ..utils.modes import BN_MODES, BNMode, model_mode


class Attack(abc.ABC):
    """A stateless adversarial attack.

    ``attack(model, x, y)`` returns adversarial images ``x_adv`` for a classifier
    ``model`` that maps pixels in [0, 1] (N, C, H, W) to logits. Every attack
    keeps this contract:

    * ``x_adv`` lies inside the attack's ε-ball around ``x`` and inside [0, 1];
    * the model's parameters' ``.grad`` are never written (input gradients come
      from :func:`torch.autograd.grad`);
    * the model's train/eval flags are restored; ``bn_mode`` says which mode
      the attack itself runs in;
    * it runs under the caller's :func:`torch.autocast`, keeping the
      perturbation in float32;
    * ``eps`` may be a tensor with one radius per example.

    Subclasses implement :meth:`perturb`; inputs are validated once, here.

    Args:
        eps: radius of the threat model in pixel units (8/255 for CIFAR-10 L∞).
            An L∞ radius must be <= 1 (``8`` is refused: write 8/255); an L2
            radius may exceed 1 but not √(C·H·W), which is checked when the
            first batch is seen (a Python comparison, no host synchronisation).
        norm: the threat model's norm, ``"linf"`` or ``"l2"``; it sets the
            bound ``eps`` is checked against.
        bn_mode: ``"eval"``, ``"train"`` or ``"keep"`` (see
            :func:`advtrain.utils.model_mode`).
        check_inputs: validate pixel range and labels on every call (one host
            synchronisation per call, never inside the step loop).
    """

    def __init__(self, eps: Radius, *, norm: str = "linf", bn_mode: BNMode = "eval",
                 check_inputs: bool = True) -> None:
        norm = check_choice(norm, "norm", RADIUS_NORMS)
        self.eps = check_eps(eps, norm, "eps")
        # The L2 bound depends on the image size, known only with the input;
        # its largest radius is read here so each call compares Python numbers.
        self._largest_l2_eps = largest_radius(self.eps) if norm == "l2" else None
        self.bn_mode: BNMode = check_choice(bn_mode, "bn_mode", BN_MODES)  # type: ignore[assignment]
        self.check_inputs = bool(check_inputs)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.run(model, x, y, check=self.check_inputs)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, *, check: bool = True) -> Tensor:
        """Attack ``x``; ``check=False`` skips the value checks (pixel and label
        ranges, one host synchronisation) for callers that validated their data
        once up front, such as a training loop."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if check:
            check_images(x, "x")
            check_labels(y, x.shape[0], num_classes=_num_classes(model, x), name="y")
        elif x.dim() != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
        if self._largest_l2_eps is not None:
            check_l2_radius(self._largest_l2_eps, x, "eps")
        x = x.detach()
        with model_mode(model, self.bn_mode), torch.enable_grad():
            x_adv = self.perturb(model, x, y)
        return x_adv.detach()

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial images for a validated batch; the model is already
        in the requested mode and gradients are enabled."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """Number of logits ``model`` returns, from one example in eval mode (so no
    BatchNorm statistics change); part of input validation, not of attacks."""
    if x.shape[0] == 0:
        return 0
    with model_mode(model, "eval"), torch.no_grad():
        logits = model(x[:1])
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape (N, classes), got {tuple(logits.shape)}")
    return int(logits.shape[1])


def input_gradient(loss: Tensor, delta: Tensor) -> Tensor:
    """Gradient of a summed loss with respect to ``delta`` only; no parameter
    ``.grad`` is written and no weight-gradient kernels run."""
    (g,) = torch.autograd.grad(loss, [delta])
    return g


def clip_to_ball_and_box(x: Tensor, delta: Tensor, eps: Tensor, norm: str, *, project: bool = True) -> Tensor:
    """Project ``delta`` onto the ε-ball (when ``project``) and so that
    ``x + delta`` stays in [0, 1]. ``eps`` has shape (N, 1, 1, 1)."""
    if project:
        if norm == "linf":
            delta = torch.maximum(torch.minimum(delta, eps), -eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(eps / (norms + 1e-12), max=1.0)
    return (x + delta).clamp_(0.0, 1.0) - x


__all__ = ["Attack", "BNMode", "input_gradient", "clip_to_ball_and_box"]

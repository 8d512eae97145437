"""Projected gradient attacks: PGD in the L∞ and L2 norms, and the single-step
methods that are special cases of it (FGSM, FGSM-RS / Fast-AT, N-FGSM).

Units: images are pixels in [0, 1] (N, C, H, W); every radius and step size
(``eps``, ``step_size``, ``init_radius``, ``noise``) is in pixel units, e.g.
8/255 for the standard CIFAR-10 L∞ threat model. Each may be a Python number or
a tensor with one value per example.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._validation import Radius, check_bool, check_choice, check_eps, check_positive_int, check_radius, per_example
from .base import Attack, BNMode, clip_to_ball_and_box, input_gradient
from .losses import LossSpec, get_loss

NORMS = ("linf", "l2")


def _radius(value: Radius, x: Tensor, name: str) -> Tensor:
    """``value`` as a float32 (N, 1, 1, 1) tensor; the error names the argument."""
    try:
        return per_example(value, x)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _uniform_l2_ball(x: Tensor, radius: Tensor) -> Tensor:
    """Float32 samples shaped like ``x``, uniform in the L2 ball of ``radius``
    (N, 1, 1, 1) around 0, drawn from the default generator of ``x``'s device."""
    dim = max(1, math.prod(x.shape[1:]))
    direction = torch.randn_like(x, dtype=torch.float32)
    direction = direction / direction.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    scale = torch.rand(x.shape[0], 1, 1, 1, device=x.device).pow(1.0 / dim)
    return direction * (scale * radius)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018, "Towards Deep Learning
    Models Resistant to Adversarial Attacks") in the L∞ or L2 norm.

    Starting from ``delta = 0`` or, with ``random_start``, a uniform sample in
    the ``init_radius`` box (L∞) or ball (L2), it takes ``steps`` steps

    * L∞: ``delta <- proj(delta + step_size * sign(g))``
    * L2: ``delta <- proj(delta + step_size * g / ||g||_2)`` (per example)

    where ``g`` is the input gradient of the summed per-example loss and
    ``proj`` clips to the ε-ball (unless ``project=False``) and keeps
    ``x + delta`` in [0, 1]. The step loop has no host synchronisation and no
    per-example Python code; ``delta`` stays float32 under autocast.

    With ``restarts > 1`` the whole attack runs that many times and, per
    example, the result with the highest final loss (lowest when targeted) is
    kept; this costs one extra forward pass per restart, which in
    ``bn_mode="train"`` also updates BatchNorm running statistics.

    Args:
        eps: threat-model radius in pixel units (float or one value per
            example): at most 1 in L∞, at most √(C·H·W) in L2 (see :class:`Attack`).
        steps: number of gradient steps (>= 1).
        step_size: step in pixel units; ``None`` means ``2.5 * eps / steps``
            (Madry et al.'s rule; pass ``eps / 4`` for the 2/255 of PGD-10 at 8/255).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform random point instead of ``x``.
        init_radius: radius of the random start; ``None`` means ``eps``.
        restarts: independent random restarts (>= 1; > 1 needs ``random_start``).
        loss: ``"ce"``, ``"margin"`` (CW-∞), ``"dlr"`` or a callable
            ``loss(logits, y) -> (N,)`` per-example loss to ascend.
        targeted: ``y`` are target classes and the attack descends the loss.
        project: project onto the ε-ball each step; ``False`` only clips to
            [0, 1] (N-FGSM), so the result may leave the ε-ball.
        bn_mode: model mode while attacking: ``"eval"``, ``"train"`` or ``"keep"``.
        check_inputs: validate pixel and label ranges on every call.
    """

    def __init__(
        self,
        eps: Radius,
        *,
        steps: int = 10,
        step_size: Optional[Radius] = None,
        norm: str = "linf",
        random_start: bool = True,
        init_radius: Optional[Radius] = None,
        restarts: int = 1,
        loss: LossSpec = "ce",
        targeted: bool = False,
        project: bool = True,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(eps, norm=norm, bn_mode=bn_mode, check_inputs=check_inputs)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = None if step_size is None else check_radius(step_size, "step_size")
        self.norm = check_choice(norm, "norm", NORMS)
        self.random_start = check_bool(random_start, "random_start")
        self.init_radius = None if init_radius is None else check_radius(init_radius, "init_radius")
        self.restarts = check_positive_int(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise ValueError(f"restarts={self.restarts} needs random_start=True (without a "
                             "random start every restart computes the same perturbation)")
        self._loss_fn = get_loss(loss)
        self.loss = loss
        self.targeted = check_bool(targeted, "targeted")
        self.project = check_bool(project, "project")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x
        eps, step = self._radii(x)
        init = eps if self.init_radius is None else _radius(self.init_radius, x, "init_radius")

        best = self._run_once(model, x, y, eps, step, init)
        if self.restarts > 1:
            with torch.no_grad():
                best_obj = self._objective(model, x + best, y)
            for _ in range(self.restarts - 1):
                delta = self._run_once(model, x, y, eps, step, init)
                with torch.no_grad():
                    obj = self._objective(model, x + delta, y)
                better = obj > best_obj
                best = torch.where(better.view(-1, 1, 1, 1), delta, best)
                best_obj = torch.where(better, obj, best_obj)
        return (x + best).to(x.dtype)

    def iterate(self, model: nn.Module, x: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        """Run the attack's ``steps`` update steps from a given perturbation
        ``delta`` (no random start, no restarts) and return the final
        perturbation in float32. ``delta`` is first projected onto the ε-ball
        and [0, 1]. The caller chooses the model's mode and enables gradients;
        this is how accumulated-perturbation methods (ATTA) continue a stored
        perturbation."""
        eps, step = self._radii(x)
        delta = clip_to_ball_and_box(x, delta.detach().float(), eps, self.norm, project=self.project)
        return self._steps(model, x, y, delta, eps, step)

    def _radii(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        eps = _radius(self.eps, x, "eps")
        step = 2.5 * eps / self.steps if self.step_size is None else _radius(self.step_size, x, "step_size")
        return eps, step

    def _objective(self, model: nn.Module, x_in: Tensor, y: Tensor) -> Tensor:
        """Per-example float32 quantity the attack ascends (negated loss when targeted)."""
        loss = self._loss_fn(model(x_in).float(), y)
        if loss.shape != (x_in.shape[0],):
            raise ValueError(f"loss must return one value per example, shape ({x_in.shape[0]},), "
                             f"got {tuple(loss.shape)}")
        return -loss if self.targeted else loss

    def _initial_delta(self, x: Tensor, eps: Tensor, init: Tensor) -> Tensor:
        if not self.random_start:
            return torch.zeros_like(x, dtype=torch.float32)
        if self.norm == "linf":
            delta = (torch.rand_like(x, dtype=torch.float32) * 2 - 1) * init
        else:
            delta = _uniform_l2_ball(x, init)
        return clip_to_ball_and_box(x, delta, eps, self.norm, project=self.project)

    def _run_once(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, step: Tensor,
                  init: Tensor) -> Tensor:
        return self._steps(model, x, y, self._initial_delta(x, eps, init), eps, step)

    def _steps(self, model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, eps: Tensor, step: Tensor) -> Tensor:
        for _ in range(self.steps):
            delta.requires_grad_(True)
            g = input_gradient(self._objective(model, x + delta, y).sum(), delta)
            if self.norm == "linf":
                delta = torch.addcmul(delta.detach(), step, g.sign())
            else:
                g_norm = g.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = torch.addcmul(delta.detach(), step / g_norm, g)
            delta = clip_to_ball_and_box(x, delta, eps, self.norm, project=self.project)
        return delta


class FGSM(PGD):
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015, "Explaining
    and Harnessing Adversarial Examples"): one L∞ step of size ``eps`` from the
    clean input, ``x_adv = clip_[0,1](x + eps * sign(∇x loss))``.

    Used for FGSM adversarial training, which is prone to catastrophic
    overfitting in long runs. ``eps`` is in pixel units.
    """

    def __init__(
        self,
        eps: Radius,
        *,
        loss: LossSpec = "ce",
        targeted: bool = False,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        eps = check_eps(eps, "linf", "eps")
        super().__init__(eps, steps=1, step_size=eps, random_start=False, loss=loss,
                         targeted=targeted, bn_mode=bn_mode, check_inputs=check_inputs)


class FGSMRS(PGD):
    """FGSM with a random start, the attack of Fast-AT (Wong, Rice & Kolter 2020,
    "Fast is better than free: Revisiting adversarial training"): a uniform
    start in the L∞ ε-box, one signed step of ``step_size`` (default
    ``1.25 * eps``), projection back to the ε-ball and to [0, 1].
    ``eps`` and ``step_size`` are in pixel units.
    """

    def __init__(
        self,
        eps: Radius,
        step_size: Optional[Radius] = None,
        *,
        loss: LossSpec = "ce",
        targeted: bool = False,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        eps = check_eps(eps, "linf", "eps")
        step = 1.25 * eps if step_size is None else step_size
        super().__init__(eps, steps=1, step_size=step, random_start=True, loss=loss,
                         targeted=targeted, bn_mode=bn_mode, check_inputs=check_inputs)


class NFGSM(PGD):
    """N-FGSM (de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania 2022, "Make
    Some Noise: Reliable and Efficient Single-Step Adversarial Training"):
    uniform noise in ``[-noise, noise]`` (default ``noise = 2 * eps``), one
    signed step of ``step_size`` (default ``eps``), and *no* projection back to
    the ε-ball: only ``x + delta`` is clipped to [0, 1].

    ``eps`` here is the step/threat ε of the paper, in pixel units. By design
    the output is **not** inside the ε-ball: ``|x_adv - x| <= noise +
    step_size``, i.e. within 3ε with the defaults. As cheap as FGSM and, in the
    paper, free of catastrophic overfitting.
    """

    def __init__(
        self,
        eps: Radius,
        step_size: Optional[Radius] = None,
        noise: Optional[Radius] = None,
        *,
        loss: LossSpec = "ce",
        targeted: bool = False,
        bn_mode: BNMode = "eval",
        check_inputs: bool = True,
    ) -> None:
        eps = check_eps(eps, "linf", "eps")
        step = eps if step_size is None else step_size
        radius = 2 * eps if noise is None else check_radius(noise, "noise")
        super().__init__(eps, steps=1, step_size=step, random_start=True, init_radius=radius,
                         project=False, loss=loss, targeted=targeted, bn_mode=bn_mode,
                         check_inputs=check_inputs)


__all__ = ["PGD", "FGSM", "FGSMRS", "NFGSM", "NORMS"]

"""The peers' baseline: plain fp32 eager PGD-10 adversarial training.

This is the training loop of the reference research scripts (Rice, Wong &
Kolter's ``robust_overfitting`` / Wong et al.'s ``fast_adversarial`` PGD
training, without apex), kept deliberately as they wrote it:

* ``model.train()`` throughout, also while attacking;
* the attack takes its input gradient with ``loss.backward()`` on
  ``delta.requires_grad_()`` and reads ``delta.grad`` — so every one of the
  10 attack steps also runs the weight-gradient kernels and accumulates into
  the parameters' ``.grad`` (thrown away by ``opt.zero_grad()`` before the
  training backward);
* ``delta.grad.zero_()`` after each step, ``delta.data = ...`` updates;
* fp32, contiguous (NCHW) tensors, no autocast, no ``torch.compile``;
* per batch ``loss.item()`` and ``(pred == y).sum().item()`` for the running
  averages, as the scripts log them.

Normalization lives inside advtrain's models, so ``model(X + delta)`` here is
the scripts' ``model(normalize(X + delta))``. The data come from the same
:class:`~advtrain.data.DeviceLoader` batches advtrain trains on (the scripts
use a ``torch.utils.data.DataLoader``; giving the baseline the device-resident
loader isolates the training step). The learning rate follows the same
per-iteration triangle (0 → ``lr`` at mid-run → 0) as advtrain's presets.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReferencePGDTraining:
    """PGD-k adversarial training the way the reference scripts do it.

    Args:
        model: the classifier (pixels in [0, 1], normalization inside).
        eps, step_size, steps: the L∞ PGD attack (8/255, 2/255, 10).
        lr, momentum, weight_decay: SGD, with a per-iteration triangular LR
            0 → ``lr`` → 0 over ``epochs``.
        epochs: length of the LR schedule.
        device: where to train.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        lr: float = 0.2,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int = 30,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=momentum, weight_decay=weight_decay
        )

    def _lr_at(self, progress_epochs: float) -> float:
        half = self.epochs / 2
        if progress_epochs <= half:
            return self.lr * progress_epochs / half
        return max(0.0, self.lr * (self.epochs - progress_epochs) / half)

    def attack(self, X: Tensor, y: Tensor) -> Tensor:
        """The scripts' ``attack_pgd`` (one restart, no early stop)."""
        eps, alpha = self.eps, self.step_size
        delta = torch.zeros_like(X).uniform_(-eps, eps)
        delta = torch.max(
            torch.min(delta, 1 - X), 0 - X
        )  # clamp(delta, lower_limit - X, upper_limit - X)
        delta.requires_grad = True
        for _ in range(self.steps):
            output = self.model(X + delta)
            loss = F.cross_entropy(output, y)
            loss.backward()
            grad = delta.grad.detach()
            d = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
            d = torch.max(torch.min(d, 1 - X), 0 - X)
            delta.data = d
            delta.grad.zero_()
        return delta.detach()

    def train_step(self, X: Tensor, y: Tensor) -> Tuple[float, int]:
        """One batch: attack, then an SGD step on the adversarial loss.
        Returns the loss and the number of correct predictions (host values,
        as the scripts log them)."""
        self.model.train()
        delta = self.attack(X, y)
        output = self.model(torch.clamp(X + delta, 0, 1))
        loss = F.cross_entropy(output, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item(), int((output.max(1)[1] == y).sum().item())

    def train_epoch(self, batches: Iterable[Any], epoch: int, steps: int) -> Dict[str, float]:
        """Train on ``batches`` (objects with ``x`` and ``y``, e.g. advtrain
        :class:`~advtrain.data.Batch`), ``steps`` of them per epoch."""
        train_loss = 0.0
        train_acc = 0
        n = 0
        for i, batch in enumerate(batches):
            lr = self._lr_at(epoch + i / max(steps, 1))
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss, correct = self.train_step(batch.x, batch.y)
            train_loss += loss * batch.y.size(0)
            train_acc += correct
            n += batch.y.size(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"train_loss": train_loss / max(n, 1), "train_acc": train_acc / max(n, 1)}


__all__ = ["ReferencePGDTraining"]

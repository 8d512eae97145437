"""Helpers shared by several test files."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class NoHostSync(TorchFunctionMode):
    """Fails on any tensor-to-host conversion (``.item()``, ``bool(t)``, ...)
    inside the block: the attack step loops must not synchronise."""

    FORBIDDEN = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation via Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def trained_model(seed: int = 0, n: int = 512, steps: int = 60):
    """A small conv net with BatchNorm trained briefly on a synthetic 10-class
    problem (class templates plus noise, 3x8x8), and a held-out batch; a fresh
    copy of a cached training run, in eval mode, with no parameter gradients."""
    model, data = _trained(seed, n, steps)
    return copy.deepcopy(model), data


@functools.lru_cache(maxsize=None)
def _trained(seed: int, n: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    templates = 0.4 + 0.2 * torch.rand(10, 3, 8, 8, generator=g)

    def sample(m):
        y = torch.randint(0, 10, (m,), generator=g)
        return (templates[y] + 0.1 * torch.randn(m, 3, 8, 8, generator=g)).clamp(0, 1), y

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    x, y = sample(n)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, sample(128)


def kill_before_step(trainer, step: int) -> None:
    """Make ``trainer`` raise KeyboardInterrupt before its optimizer step
    number ``step + 1``, as a kill at that point would stop it."""
    original = trainer.train_step

    def train_step(batch):
        if trainer.global_step == step:
            raise KeyboardInterrupt("simulated kill")
        return original(batch)

    trainer.train_step = train_step

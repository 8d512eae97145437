"""A view of a model whose forward passes give gradients to the input only.

Attack steps need the gradient of the loss with respect to the input (and to
perturbation sites), never with respect to the weights. In eager mode
``torch.autograd.grad(loss, [delta])`` already skips every weight-gradient
kernel. Under ``torch.compile`` it does not: AOTAutograd compiles one
backward graph per forward graph, and that graph returns a gradient for every
input that requires one, parameters included, whichever gradients the caller
asks for, so each attack step would pay for the weight gradients like a plain
``loss.backward()``. Calling the model with its parameters detached makes
them constants of the attack's graph, and its backward computes input
gradients only.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.func import functional_call


class InputOnlyGradients(nn.Module):
    """Runs ``module`` with detached parameters (the same storage, so the
    weights are always the current ones; ``requires_grad`` is never toggled).
    Buffers are the module's own, so BatchNorm in train mode still updates its
    running statistics. Hooks, train/eval mode and perturbation sites are
    those of ``module``. Meant to be wrapped in ``torch.compile`` for the
    attack's forward passes; the training forward uses ``module`` itself."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        return functional_call(self.module, params, args, kwargs)


__all__ = ["InputOnlyGradients"]

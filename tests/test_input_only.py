"""InputOnlyGradients: compiled attack passes compute no weight gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from advtrain.models import SmallCNN
from advtrain.models.input_only import InputOnlyGradients
from advtrain.models.sites import perturb_sites


class _ConvBackwardMasks(TorchDispatchMode):
    """Records the output mask (input, weight, bias) of every convolution backward."""

    def __init__(self) -> None:
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=3, width=4).train()


def _input_gradient(model, x, y):
    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(x + delta), y)
    with _ConvBackwardMasks() as masks:
        (g,) = torch.autograd.grad(loss, [delta])
    return g, masks.masks


@pytest.mark.slow
def test_compiled_attack_pass_computes_no_weight_gradients():
    torch._dynamo.reset()
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    model = _model()
    expected, eager_masks = _input_gradient(model, x, y)
    assert eager_masks and not any(m[1] for m in eager_masks)  # eager autograd prunes them

    # A plain compiled model's backward graph returns every gradient, weights included ...
    _, plain_masks = _input_gradient(torch.compile(model, backend="aot_eager"), x, y)
    assert any(m[1] for m in plain_masks)
    # ... the parameters detached, only the input's.
    wrapped = torch.compile(InputOnlyGradients(model), backend="aot_eager")
    g, masks = _input_gradient(wrapped, x, y)
    assert masks and not any(m[1] or m[2] for m in masks)
    torch.testing.assert_close(g, expected)
    assert all(p.requires_grad for p in model.parameters())  # nothing was toggled


def test_wrapper_shares_weights_buffers_mode_and_sites():
    model = _model()
    wrapped = InputOnlyGradients(model)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(wrapped(x), model(x))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    torch.testing.assert_close(wrapped(x), model(x))  # always the current weights
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    wrapped(x)  # train mode: the model's own running statistics move
    assert not torch.equal(bn.running_mean, before)
    wrapped.eval()
    assert not model.training
    clean = wrapped(x)
    with perturb_sites(model, {"site1": torch.ones(4, 4, 16, 16)}):
        perturbed = wrapped(x)
        torch.testing.assert_close(perturbed, model(x))
    assert not torch.allclose(perturbed, clean)  # the model's sites act through the wrapper
    out = wrapped(x.requires_grad_(True))
    out.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model.parameters())

"""Counting the passes through a model, per training example: the measured
side of the method registry's cost model (:class:`advtrain.methods.Passes`).
The benchmark and ``tests/test_benchmarks_smoke.py`` both count with it.

* A **forward** pass is a call of the model; it counts the rows (examples)
  of its output, so a one-example probe counts 1/128 of a pass at batch 128.
* A **backward** pass is a gradient reaching a forward's output (a tensor
  hook), counting the rows of that gradient. All the backward passes of one
  autograd run (one ``backward()`` or ``torch.autograd.grad`` call) are
  **full** when that run also computes the gradient of the model's first
  weight — a hook on that parameter fires only then, as for
  ``loss.backward()`` — and **input-only** otherwise (``autograd.grad`` to
  the input or perturbation sites, which runs no weight-gradient kernels).
  A backward run with ``create_graph=True`` can itself be run back
  through (the double backward of a gradient penalty): a gradient reaching
  the output gradient that run computed counts as one more backward pass.
  So a loss over two forwards (TRADES' clean and adversarial logits) costs
  two full backward passes, and GradAlign's double backward two: back
  through the noisy point's input-gradient pass and through its forward.
"""
from __future__ import annotations

from typing import Any, List, Optional

from torch import Tensor, nn
from torch.autograd import Variable

from advtrain.methods import Passes


def first_weight(model: nn.Module) -> Tensor:
    """The first trainable parameter, in definition order: for advtrain's
    models the stem convolution's weight, the last one a backward reaches."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            return parameter
    raise ValueError(f"{type(model).__name__} has no trainable parameter")


class PassCounter:
    """Counts forward and backward passes through ``model`` while active::

        with PassCounter(trainer.model) as counter:
            trainer.train_epoch()
        counter.passes(examples=loader.num_examples)  # Passes(forward=11.0, ...)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weight = first_weight(model)
        self.forward_rows = 0
        self.input_only_rows = 0
        self.full_rows = 0
        self._run: Optional[List[Any]] = None  # [rows, reached the weight] of the autograd run in progress
        self._handles: List[Any] = []

    def _on_forward(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self.forward_rows += int(output.shape[0])
            if output.requires_grad:
                output.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: Tensor) -> None:
        if self._run is None:
            self._run = [0, False]
            # Runs once the autograd run that computes this gradient ends.
            Variable._execution_engine.queue_callback(self._end_run)
        self._run[0] += int(grad.shape[0])
        if grad.requires_grad:
            # A backward with create_graph (a gradient penalty): the gradient
            # reaching this one is a later backward run back through it.
            grad.register_hook(self._on_output_grad)

    def _on_weight_grad(self, _grad: Tensor) -> None:
        if self._run is not None:
            self._run[1] = True

    def _end_run(self) -> None:
        assert self._run is not None
        rows, full = self._run
        self._run = None
        if full:
            self.full_rows += rows
        else:
            self.input_only_rows += rows

    def __enter__(self) -> "PassCounter":
        self._handles = [self.model.register_forward_hook(self._on_forward),
                         self.weight.register_hook(self._on_weight_grad)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def passes(self, examples: int) -> Passes:
        """The counted passes divided by ``examples``: the training examples
        processed, summed over optimizer steps (a batch replayed m times
        counts m times)."""
        if examples <= 0:
            raise ValueError(f"examples must be > 0, got {examples}")
        return Passes(forward=self.forward_rows / examples, input_backward=self.input_only_rows / examples,
                      full_backward=self.full_rows / examples)


__all__ = ["PassCounter", "first_weight"]

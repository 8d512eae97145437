"""Run sizes: how big a training run is, apart from what it trains.

A method preset (or a protocol) fixes the recipe — the perturbation, the
learning-rate schedule, the weight decay. A :class:`Scale` fixes the size —
the model, how many training images, how many epochs and how many test images
the evaluation uses — so that the same recipe runs in minutes on a laptop CPU
or at the paper's full size on a GPU. ``None`` in a field means "the recipe's
own value" (all 50,000 training images, the preset's epochs). A scale
changes a recipe only where the recipe was tuned for the full-size model and
does not carry over to the scale's small one (:attr:`Scale.method_options`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional


@dataclass(frozen=True)
class Scale:
    """A run size. ``model``: a model registry name (``advtrain.models.MODELS``).
    ``train_examples``: the first N training images, ``None`` for all.
    ``epochs``: ``None`` for the recipe's own. ``eval_examples``: test images
    of each evaluation. ``purpose``: what the scale is for, in a few words.
    ``method_options``: per registered method name, preset options (keyword:
    value, as the method's command-line flag takes it) that this size sets
    because the preset's value was tuned for a bigger model; an option given
    on the command line, in a config file or to a study wins."""

    name: str
    model: str
    train_examples: Optional[int]
    epochs: Optional[int]
    eval_examples: int
    purpose: str
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, method: Optional[str], model: Optional[str]) -> Dict[str, Any]:
        """The options this scale sets for ``method`` when the run trains
        ``model``: its :attr:`method_options` for the scale's own model, none
        for another (they were chosen for the scale's model)."""
        return dict(self.method_options.get(method, {})) if model == self.model else {}


SCALES: Dict[str, Scale] = {s.name: s for s in (
    Scale("cpu", model="smallcnn", train_examples=10_000, epochs=10, eval_examples=1000,
          purpose="minutes on a 2-core CPU; robust accuracy well above a clean-trained model's, far below "
                  "the full setting's",
          # APART's step sizes settle where the ascent's gradient meets their decay. The reference decay, 1200,
          # was tuned with PreActResNet18; with it SmallCNN's learned input step settles near 0.4 ε and APART
          # trails FGSM-RS. 400 is the decay the reference script states (--weight_decay_alpha).
          method_options={"apart": {"step_weight_decay": 400.0}}),
    Scale("gpu", model="preactresnet18", train_examples=None, epochs=None, eval_examples=1000,
          purpose="the paper's setting: a GPU run; days on a CPU"),
)}
"""The named run sizes, by name: ``"cpu"`` and ``"gpu"``."""


def get_scale(name: str) -> Scale:
    """The scale called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known scales: {', '.join(SCALES)}")
    return SCALES[name]


__all__ = ["SCALES", "Scale", "get_scale"]

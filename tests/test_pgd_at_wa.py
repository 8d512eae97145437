"""PGD-AT-WA: the averaged weights are the per-step EMA of the trained
weights computed by hand, averaging leaves the training itself (PGD-AT's)
untouched, its defaults, and the settings it refuses."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import Tensor

from advtrain import PGDTrainer
from advtrain.methods import METHODS
from advtrain.methods.pgd_at_wa import FASTAT_CONFIG, TAU, PGDATWATrainer
from advtrain.models import SmallCNN
from advtrain.training import WeightAverage


def data(n: int = 24):
    """8×8 images whose class (of 3) is the brightest channel."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def make(preset, **kw):
    torch.manual_seed(0)
    return preset(SmallCNN(num_classes=3, width=4), steps=2, epochs=1, batch_size=8, lr=0.05, eval_every=0,
                  progress=False, verbose=False, seed=0, device="cpu", **kw)


def record_weights(trainer) -> List[Dict[str, Tensor]]:
    """The model's floating-point state after each optimizer step of ``trainer``."""
    seen: List[Dict[str, Tensor]] = []
    original = trainer.train_step

    def train_step(batch):
        out = original(batch)
        seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()})
        return out

    trainer.train_step = train_step  # type: ignore[method-assign]
    return seen


def test_the_average_is_the_ema_of_every_steps_weights_and_training_is_pgd_ats():
    tau = 0.6  # far from 1, so that every step's weights weigh in visibly
    averaged = make(PGDATWATrainer, weight_average=tau)
    steps = record_weights(averaged)
    averaged.fit(data())
    assert len(steps) == 3
    by_hand = dict(steps[0])  # the first update copies the weights after step 1
    for weights in steps[1:]:
        by_hand = {k: tau * by_hand[k] + (1 - tau) * weights[k] for k in by_hand}
    got = averaged.weight_average.module.state_dict()
    for k, want in by_hand.items():
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got["linear.weight"], steps[-1]["linear.weight"])  # an average, not the last weights

    plain = make(PGDTrainer)  # PGD-AT: the same run without an average
    plain.fit(data())
    for (k, want), have in zip(plain.model.state_dict().items(), averaged.model.state_dict().values()):
        assert torch.equal(want, have), k


def test_defaults_are_pgd10_with_the_benchmarks_average():
    trainer = PGDATWATrainer(SmallCNN(width=4), device="cpu", progress=False)
    attack = trainer.policy.attack
    assert (attack.steps, attack.step_size, attack.random_start, attack.bn_mode) == (10, 8 / 255 / 4, True, "train")
    assert trainer.weight_average.tau == TAU == 0.9995 and not trainer.weight_average.warmup
    assert (trainer.epochs, trainer.lr, trainer.weight_decay, trainer.label_smoothing) == (30, 0.2, 5e-4, 0.0)
    assert FASTAT_CONFIG == {"label_smoothing": 0.4, "weight_average": 0.9995}
    assert METHODS["pgd-at-wa"].trainer is PGDATWATrainer and METHODS["pgd-at-wa"].passes(steps=10) == \
        METHODS["pgd"].passes(steps=10)
    warm = PGDATWATrainer(SmallCNN(width=4), weight_average=WeightAverage(0.999, warmup=True), device="cpu")
    assert warm.weight_average.warmup and warm.weight_average.tau == 0.999


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight_average=None), ValueError, "weight_average"),
    (dict(weight_average=1.5), ValueError, "weight_average"),
    (dict(weight_average="0.9995"), TypeError, "weight_average"),
    (dict(eps=8), ValueError, "eps"),
    (dict(steps=0), ValueError, "steps"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        PGDATWATrainer(SmallCNN(width=4), device="cpu", **kwargs)

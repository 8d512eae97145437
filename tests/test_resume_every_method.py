"""Every registered method resumes exactly: a run killed after an epoch, or
in the middle of one (from a mid-epoch checkpoint), and resumed equals the
uninterrupted run bit for bit on the CPU — weights, optimizer state, policy
state (per-example stores, learned step sizes), the weight average and the
per-epoch records. Parametrized over ``advtrain.methods.METHODS``, so a new
method is covered when it is registered."""
from __future__ import annotations

import os
from typing import Any, Dict

import pytest
import torch

from _helpers import kill_before_step
from advtrain.methods import METHODS
from advtrain.models import SmallCNN
from advtrain.training import Trainer

# APART's reference step-size schedule warns on runs this short; the scaled
# rule (the preset's default) does not, but a method may choose the other.
pytestmark = pytest.mark.filterwarnings("ignore:APART's step-size learning rate .* is tuned for")

EXAMPLES, BATCH, EPOCHS = 16, 8, 2  # two optimizer steps (per replay) in each of two epochs


def data():
    """32×32 images whose class (of 3) is the brightest channel."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (EXAMPLES,), generator=g)
    x = torch.randint(0, 120, (EXAMPLES, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(EXAMPLES), y] += 120
    return x, y


def options(name: str) -> Dict[str, Any]:
    """The cheapest settings of the method's own knobs: one attack step, two replays."""
    method = METHODS[name]
    found: Dict[str, Any] = {}
    if "steps" in method.options:
        found["steps"] = 1
    if "replays" in method.options:
        found["replays"] = 2
    return found


def make(name: str, run_dir, where: str, init_seed: int = 0, **kw: Any) -> Trainer:
    torch.manual_seed(init_seed)
    model = SmallCNN(num_classes=3, width=4)
    settings = dict(batch_size=BATCH, lr=0.05, eval_every=0, progress=False, verbose=False, seed=0, device="cpu",
                    run_dir=run_dir, checkpoint_every_steps=1 if where == "mid-epoch-2" else None, **options(name))
    settings.update(kw)
    probe = METHODS[name].build(SmallCNN(num_classes=3, width=4), epochs=EPOCHS, **settings)
    # A preset whose `epochs` counts optimizer steps' worth of epochs (Free-AT)
    # makes fewer passes: ask for as many as give two passes over the data.
    epochs = EPOCHS * EPOCHS // probe.epochs
    return METHODS[name].build(model, epochs=epochs, **settings)


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def without_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("time")} for r in records]


@pytest.mark.parametrize("where", ["after-epoch-1", "mid-epoch-2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(name, where, tmp_path, monkeypatch):
    # fsync makes checkpoints survive a power cut, which this test does not
    # simulate; it is most of a tiny run's time
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    train = data()
    full = make(name, None, where)  # no run directory: writing checkpoints must not change the run
    full.fit(train)
    steps = full.global_step
    assert steps == EPOCHS * (EXAMPLES // BATCH) * full.replays and len(full.history.records) == EPOCHS

    killed = make(name, tmp_path / "killed", where)
    # mid-epoch checkpoints fall between batches: one batch (all its replays) into epoch 2
    kill_at = steps // 2 if where == "after-epoch-1" else steps // 2 + full.replays
    kill_before_step(killed, kill_at)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(train)
    saved = killed.last_checkpoint
    assert saved is not None and saved.step == kill_at and (saved.batch is None) == (where == "after-epoch-1")

    resumed = make(name, tmp_path / "killed", where, init_seed=7)  # other initial weights: the checkpoint must win
    resumed.fit(train, resume=True)
    assert resumed.global_step == steps
    assert_same(resumed.model.state_dict(), full.model.state_dict(), "model")
    assert_same(resumed.optimizer.state_dict(), full.optimizer.state_dict(), "optimizer")
    assert_same(resumed.policy.state_dict(), full.policy.state_dict(), "policy")
    assert (resumed.weight_average is None) == (full.weight_average is None)
    if full.weight_average is not None:
        assert_same(resumed.weight_average.module.state_dict(), full.weight_average.module.state_dict(), "average")
    assert without_times(resumed.history.records) == without_times(full.history.records)

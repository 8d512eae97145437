"""Learning-rate schedules: "onecycle" against torch's OneCycleLR stepped per
iteration, its momentum against OneCycleLR's cycle_momentum, MultiStep
against MultiStepLR, and their use by the Trainer."""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from advtrain.models import SmallCNN
from advtrain.training import MultiStep, Trainer, one_cycle, one_cycle_momentum
from advtrain.training.schedules import make_schedule


def torch_one_cycle(max_lr: float, total_steps: int) -> Tuple[List[float], List[float]]:
    """The learning rate and momentum of each iteration under
    ``OneCycleLR(max_lr=max_lr, total_steps=total_steps)`` (torch's defaults)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps)
    lrs, momenta = [], []
    for step in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        if step < total_steps - 1:
            scheduler.step()
    return lrs, momenta


@pytest.mark.parametrize("epochs, steps_per_epoch", [(10, 20), (7, 13)])  # peak on a step; between two steps
def test_onecycle_follows_torch_one_cycle_lr_stepped_per_iteration(epochs, steps_per_epoch):
    peak, total = 0.2, epochs * steps_per_epoch
    lrs, momenta = torch_one_cycle(peak, total)
    lr, momentum = make_schedule("onecycle", peak, epochs), one_cycle_momentum(epochs)
    assert lr(0) == pytest.approx(lrs[0], rel=1e-12) and lr(0) == pytest.approx(peak / 25)
    assert lr(0.3 * epochs) == pytest.approx(peak) and lr(epochs) == pytest.approx(peak / 25 / 1e4)
    assert momentum(0) == pytest.approx(momenta[0]) == 0.95 and momentum(0.3 * epochs) == pytest.approx(0.85)
    torch_peak_end = 0.3 * total - 1  # torch's first phase ends one step early
    for k in range(1, total):
        ours, mom = lr(k / steps_per_epoch), momentum(k / steps_per_epoch)
        if k / steps_per_epoch >= 0.3 * epochs:  # from the peak on: torch's previous step exactly
            assert ours == pytest.approx(lrs[k - 1], rel=1e-12, abs=1e-15), k
            assert mom == pytest.approx(momenta[k - 1], rel=1e-12), k
        elif k > torch_peak_end:  # the one step across torch's (unsampled) peak
            assert min(lrs[k - 1], lrs[k]) <= ours <= peak, k
        else:  # warm-up: less than one step behind torch
            assert lrs[k - 1] <= ours <= lrs[k], k
            assert momenta[k] <= mom <= momenta[k - 1], k


def test_one_cycle_options_and_errors():
    f = one_cycle(1.0, 10, pct_start=0.5, div_factor=10, final_div_factor=100)
    assert (f(-1), f(0), f(5), f(10), f(11)) == pytest.approx((0.1, 0.1, 1.0, 1e-3, 1e-3))
    assert f(2.5) == pytest.approx(0.55)  # half way up a half cosine: the mean of its ends
    for kwargs, fragment in [(dict(pct_start=1.0), "pct_start"), (dict(div_factor=0), "div_factor"),
                             (dict(final_div_factor=float("inf")), "final_div_factor")]:
        with pytest.raises(ValueError, match=fragment):
            one_cycle(0.1, 10, **kwargs)
    with pytest.raises(TypeError, match="peak"):
        one_cycle("0.1", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="high"):
        one_cycle_momentum(10, high=1.5)


def test_multistep_equals_torch_multistep_lr_per_epoch():
    milestones, gamma, lr, epochs = [3, 5], 0.2, 0.4, 8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma)
    schedule = make_schedule(MultiStep(milestones, gamma), lr, epochs)
    for epoch in range(epochs):
        expected = opt.param_groups[0]["lr"]
        for within in (0.0, 0.5, 0.99):  # constant through the epoch
            assert schedule(epoch + within) == pytest.approx(expected, rel=1e-12), (epoch, within)
        opt.step()
        scheduler.step()
    assert repr(MultiStep(milestones, gamma)) == "MultiStep(milestones=[3.0, 5.0], gamma=0.2)"


@pytest.mark.parametrize("milestones, gamma, error, fragment", [
    ((), 0.1, TypeError, "non-empty"), ("10", 0.1, TypeError, "milestones"), ((5, 5), 0.1, ValueError, "increasing"),
    ((0, 5), 0.1, ValueError, "milestones"), ((5,), 0.0, ValueError, "gamma"), ((5,), True, TypeError, "gamma"),
])
def test_multistep_bad_arguments(milestones, gamma, error, fragment):
    with pytest.raises(error, match=fragment):
        MultiStep(milestones, gamma)  # type: ignore[arg-type]


def test_the_trainer_takes_the_new_schedules_and_rejects_unknown_names():
    model = SmallCNN(width=4)
    trainer = Trainer(model, epochs=4, lr=0.1, schedule=MultiStep([1, 3], 0.5), progress=False)
    assert [trainer.lr_schedule(e) for e in (0.5, 1.5, 3.5)] == pytest.approx([0.1, 0.05, 0.025])
    trainer = Trainer(model, epochs=10, lr=0.1, schedule="onecycle", progress=False)
    assert trainer.lr_schedule(3) == pytest.approx(0.1) and trainer.lr_schedule(0) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="'onecycle', a MultiStep"):
        make_schedule("one_cycle", 0.1, 10)
    with pytest.raises(TypeError, match="a MultiStep"):
        make_schedule(None, 0.1, 10)  # type: ignore[arg-type]

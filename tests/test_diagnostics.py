"""Tests of the robustness-drop toolkit: the drop rule, the monitor callback
(driven by a fake trainer and by a real tiny Trainer run), the perturbation
recorder and strength study, and the plots."""
from __future__ import annotations

import json
import struct
import sys
import warnings

import pytest
import torch
from torch import nn

from advtrain.attacks.pgd import FGSM, PGD
from advtrain.diagnostics import (PerturbationRecorder, PerturbationStrengthStudy, RobustnessDropMonitor,
                                  RobustnessDropWarning, detect_robustness_drop, plot_accuracy_curves,
                                  plot_perturbation_grid, plot_strength_curves)
from advtrain.policies import ATTAPolicy, AttackPolicy
from advtrain.training import History, LambdaCallback, Trainer, load_checkpoint, save_checkpoint

EPS = 8 / 255


# ----------------------------------------------------------------------------- detect_robustness_drop

def test_collapsing_history_is_flagged():
    events = detect_robustness_drop([0.40, 0.42, 0.45, 0.05, 0.01])
    assert [(e, k) for e, k, _ in events] == [(4, "drop"), (4, "collapse")]
    assert "45.0%" in events[0][2] and "5.0%" in events[0][2] and "epoch 4" in events[0][2]


def test_steady_and_slowly_changing_histories_are_not_flagged():
    assert detect_robustness_drop([0.30, 0.32, 0.35, 0.36, 0.34, 0.37]) == []
    assert detect_robustness_drop([0.02, 0.03, 0.04, 0.03]) == []  # never clearly above the floor
    assert detect_robustness_drop([]) == []


def test_slow_decline_to_zero_is_a_collapse_reported_once():
    events = detect_robustness_drop([0.4, 0.3, 0.2, 0.1, 0.06, 0.04, 0.0, 0.0], epochs=range(2, 18, 2))
    assert [(e, k) for e, k, _ in events] == [(12, "collapse")]
    # hovering around the floor does not repeat it; a recovery to twice the floor re-arms it
    events = detect_robustness_drop([0.3, 0.05, 0.06, 0.04, 0.12, 0.03])
    assert [(e, k) for e, k, _ in events] == [(2, "drop"), (2, "collapse"), (6, "collapse")]


def test_missing_measurements_are_skipped():
    events = detect_robustness_drop([0.4, None, float("nan"), 0.1], threshold=0.2)
    assert [(e, k) for e, k, _ in events] == [(4, "drop")]
    with pytest.raises(ValueError, match="threshold"):
        detect_robustness_drop([0.1], threshold=1.5)
    with pytest.raises(ValueError, match="epochs"):
        detect_robustness_drop([0.1, 0.2], epochs=[1])


# ----------------------------------------------------------------------------- monitor, fake trainer

class MarginModel(nn.Module):
    """Two classes; class 0 wins when ``b + 10 * (mean(x) - 0.5) > 0``. On
    constant images of value v, L∞ PGD lowers the mean by exactly eps, so the
    robust accuracy over v on a grid is set by ``b`` (see :func:`bias_for`)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z = self.b + 10 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([z, -z], dim=1)


def grid_data(n=100):
    v = 0.2 + 0.6 * (torch.arange(n) + 0.5) / n
    return v.view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(), torch.zeros(n, dtype=torch.long)


def bias_for(robust_acc):
    """``b`` making a fraction ``robust_acc`` of :func:`grid_data` robust at EPS."""
    return 10 * (EPS - 0.3 + 0.6 * robust_acc)


class FakeTrainer:
    def __init__(self, model, run_dir=None):
        self.model = model
        self.run_dir = run_dir
        self.stop_training = False
        self.device = torch.device("cpu")
        self.autocast_dtype = None

    def state_dict(self):
        return {"model": self.model.state_dict(), "history": []}


def drive(monitor, trainer, accs):
    records = []
    for epoch, acc in enumerate(accs):
        with torch.no_grad():
            trainer.model.b.fill_(bias_for(acc))
        record = {"epoch": epoch + 1}
        monitor.on_epoch_end(trainer, epoch, record)
        records.append(record)
    return records


def test_monitor_flags_collapse_and_keeps_best_checkpoint(tmp_path):
    trainer = FakeTrainer(MarginModel(), run_dir=tmp_path)
    monitor = RobustnessDropMonitor(grid_data(), steps=10)
    with pytest.warns(RobustnessDropWarning, match="epoch 4") as caught:
        records = drive(monitor, trainer, [0.40, 0.42, 0.45, 0.05, 0.01])
    assert len(caught) == 2  # the drop and the collapse, both at epoch 4
    measured = [r["monitor_robust_acc"] for r in records]
    assert measured == pytest.approx([0.40, 0.42, 0.45, 0.05, 0.01], abs=1e-9)
    assert [r["overfitting_flag"] for r in records] == [False, False, False, True, False]
    assert records[3]["overfitting_kind"] == "drop,collapse"
    assert (monitor.best, monitor.best_epoch) == (pytest.approx(0.45), 3)
    best = load_checkpoint(tmp_path / "best.pt")
    assert float(best["model"]["b"]) == pytest.approx(bias_for(0.45))
    assert best["history"][-1]["monitor_robust_acc"] == pytest.approx(0.45)
    assert not trainer.stop_training  # neither stop option set


def test_monitor_without_run_dir_keeps_best_weights_in_memory():
    trainer = FakeTrainer(MarginModel())
    monitor = RobustnessDropMonitor(grid_data())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustnessDropWarning)
        drive(monitor, trainer, [0.3, 0.5, 0.1])
    assert float(monitor.best_model_state["b"]) == pytest.approx(bias_for(0.5))
    fresh = MarginModel()
    monitor.restore_best(fresh)
    assert float(fresh.b.detach()) == pytest.approx(bias_for(0.5))


def test_monitor_stops_on_collapse_and_on_patience():
    trainer = FakeTrainer(MarginModel())
    monitor = RobustnessDropMonitor(grid_data(), stop_on_collapse=True, best_checkpoint=False)
    with pytest.warns(RobustnessDropWarning):
        drive(monitor, trainer, [0.4, 0.45])
        assert not trainer.stop_training
        drive(monitor, trainer, [0.0])
    assert trainer.stop_training
    assert monitor.best_model_state is None

    trainer = FakeTrainer(MarginModel())
    monitor = RobustnessDropMonitor(grid_data(), patience=2)
    drive(monitor, trainer, [0.3, 0.4, 0.35, 0.38])
    assert trainer.stop_training and monitor.since_best == 2


def test_monitor_state_round_trips_through_a_checkpoint(tmp_path):
    trainer = FakeTrainer(MarginModel())
    monitor = RobustnessDropMonitor(grid_data())
    drive(monitor, trainer, [0.4, 0.45, 0.3])
    save_checkpoint(tmp_path / "m.pt", {"monitor": monitor.state_dict()})
    restored = RobustnessDropMonitor(grid_data())
    restored.load_state_dict(load_checkpoint(tmp_path / "m.pt")["monitor"])
    assert restored.state_dict() == monitor.state_dict()
    assert restored.robust_accs == pytest.approx([0.4, 0.45, 0.3])
    # the drop rule continues from the restored measurements: 0.3 -> 0.05 after a
    # peak of 0.45 is a drop and a collapse
    record = {"epoch": 4}
    with torch.no_grad():
        trainer.model.b.fill_(bias_for(0.05))
    with pytest.warns(RobustnessDropWarning, match="epoch 4"):
        restored.on_epoch_end(trainer, 3, record)
    assert record["overfitting_flag"] and record["overfitting_kind"] == "drop,collapse"


def test_monitor_measurement_leaves_mode_and_grads_alone():
    model = MarginModel().train()
    with torch.no_grad():
        model.b.fill_(bias_for(0.3))
    monitor = RobustnessDropMonitor(grid_data())
    assert monitor.measure(model) == pytest.approx(0.3)
    assert model.training and model.b.grad is None


# ----------------------------------------------------------------------------- real Trainer runs

def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def tiny_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    templates = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 4, (n,), generator=g)
    x = (templates[y] + 0.1 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


def test_monitor_in_a_real_trainer_run_saves_the_best_epoch_model(tmp_path):
    train, held_out = tiny_split(256, 0), tiny_split(64, 1)
    snapshots = {}
    monitor = RobustnessDropMonitor(held_out, steps=3, n_examples=64)
    snapshot = LambdaCallback(on_epoch_end=lambda t, e, r: snapshots.__setitem__(
        e + 1, {k: v.clone() for k, v in t.model.state_dict().items()}))
    trainer = Trainer(tiny_net(), AttackPolicy(FGSM(EPS, bn_mode="train")), epochs=3, batch_size=64, lr=0.05,
                      eval_attack=None, eval_examples=64, run_dir=tmp_path, progress=False, device="cpu", seed=0,
                      callbacks=[monitor, snapshot])
    history = trainer.fit(train, held_out)
    accs = history.column("monitor_robust_acc")
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert all(isinstance(f, bool) for f in history.column("overfitting_flag"))
    best_epoch = max(range(3), key=lambda i: (accs[i], -i)) + 1
    assert monitor.best_epoch == best_epoch
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == best_epoch
    for key, value in snapshots[best_epoch].items():
        assert torch.equal(best["model"][key], value), key
    assert History.read(tmp_path / "metrics.jsonl").column("monitor_robust_acc") == pytest.approx(accs)


def test_recorder_with_a_stateless_policy(tmp_path):
    train, held_out = tiny_split(128, 0), tiny_split(16, 1)
    recorder = PerturbationRecorder(*held_out)
    trainer = Trainer(tiny_net(), AttackPolicy(FGSM(EPS, bn_mode="train")), epochs=2, batch_size=64, lr=0.05,
                      eval_every=0, progress=False, device="cpu", seed=0, callbacks=[recorder])
    trainer.fit(train)
    assert sorted(recorder.perturbations) == [1, 2]
    for delta in recorder.perturbations.values():
        assert delta.shape == (16, 3, 8, 8) and delta.dtype == torch.float32
        assert delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > 0.5 * EPS
    # recording again changes nothing in the run: BatchNorm statistics, RNG, mode, grads
    buffers = [b.clone() for b in trainer.model.buffers()]
    rng = torch.get_rng_state()
    trainer.model.train()
    again = recorder.record(trainer, 2)
    assert torch.equal(again, recorder.perturbations[2])  # seeded per epoch: reproducible
    assert all(torch.equal(a, b) for a, b in zip(buffers, trainer.model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    assert trainer.model.training


def test_recorder_with_a_per_example_policy_needs_and_restores_its_rows():
    train = tiny_split(128, 0)
    with pytest.raises(ValueError, match="probe_index"):
        Trainer(tiny_net(), ATTAPolicy(EPS), epochs=1, batch_size=64, eval_every=0, progress=False, device="cpu",
                callbacks=[PerturbationRecorder(train[0][:8], train[1][:8])]).fit(train)
    index = torch.arange(8) * 3
    recorder = PerturbationRecorder(train[0][index], train[1][index], probe_index=index)
    trainer = Trainer(tiny_net(), ATTAPolicy(EPS, reset_every=0), epochs=2, batch_size=64, eval_every=0,
                      progress=False, device="cpu", seed=0, callbacks=[recorder])
    trainer.fit(train)
    store = trainer.policy.store.data.clone()
    delta = recorder.record(trainer, 3)
    assert torch.equal(store, trainer.policy.store.data)
    assert delta.shape == (8, 3, 8, 8) and delta.abs().max() <= EPS + 1e-6
    state = recorder.state_dict()
    fresh = PerturbationRecorder(train[0][index], train[1][index], probe_index=index)
    fresh.load_state_dict(state)
    assert sorted(fresh.perturbations) == [1, 2]


# ----------------------------------------------------------------------------- strength study

def trained_reference():
    model = tiny_net()
    x, y = tiny_split(256, 0)
    x = x.float() / 255
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_strength_study_shapes_and_ordering():
    model = trained_reference()
    x, y = tiny_split(64, 1)
    study = PerturbationStrengthStudy(model, x, y, EPS)
    xf = x.float() / 255
    torch.manual_seed(0)
    adversarial = PGD(EPS, steps=10, step_size=EPS / 4)(model, xf, y) - xf
    result = study.run({1: torch.zeros(64, 3, 8, 8), 2: adversarial, 5: study.random_noise(7)})
    assert result.epochs.tolist() == [1, 2, 5]
    for array in (result.perturbation_accuracy, result.noise_accuracy, result.linf, result.gap):
        assert array.shape == (3,)
    assert result.perturbation_accuracy[0] == result.clean_accuracy > 0.5
    assert result.perturbation_accuracy[1] < result.noise_accuracy[1]
    assert result.linf[1] <= EPS + 1e-6
    assert json.loads(json.dumps(result.to_dict()))["epochs"] == [1, 2, 5]
    assert study.run([torch.zeros(64, 3, 8, 8)]).epochs.tolist() == [1]
    sign = PerturbationStrengthStudy(model, x, y, EPS, noise="sign").random_noise(0)
    assert torch.allclose(sign.abs(), torch.full_like(sign, EPS))
    with pytest.raises(ValueError, match="shape"):
        study.run({1: torch.zeros(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="no perturbations"):
        study.run({})


# ----------------------------------------------------------------------------- plots

def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_write_pngs_of_the_requested_size(tmp_path):
    pytest.importorskip("matplotlib")
    run = [{"epoch": e, "clean_acc": 0.5 + 0.05 * e, "robust_acc": r, "overfitting_flag": e == 4}
           for e, r in zip(range(1, 6), [0.3, 0.35, 0.4, 0.02, 0.01])]
    jsonl = tmp_path / "metrics.jsonl"
    hist = History(path=jsonl)
    for r in run:
        hist.append(r)
    out = plot_accuracy_curves({"list": run, "history": History(run), "file": jsonl}, tmp_path / "acc.png",
                               figsize=(6, 3), dpi=50)
    assert out == tmp_path / "acc.png" and png_size(out) == (300, 150)

    model = tiny_net().eval()
    x, y = tiny_split(16, 1)
    study = PerturbationStrengthStudy(model, x, y, EPS)
    result = study.run({1: study.random_noise(1), 2: study.random_noise(2)})
    assert png_size(plot_strength_curves(result, tmp_path / "s.png", figsize=(4, 3), dpi=40)) == (160, 120)

    grid = plot_perturbation_grid(x, {1: study.random_noise(1), 3: study.random_noise(3)}, tmp_path / "g.png",
                                  n_images=3, figsize=(3, 3), dpi=30)
    assert png_size(grid) == (90, 90)
    with pytest.raises(ValueError, match="epochs"):
        plot_perturbation_grid(x, {1: study.random_noise(1)}, tmp_path / "g2.png", epochs=[2])


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install advtrain\[plot\]"):
        plot_accuracy_curves({"run": [{"epoch": 1, "clean_acc": 0.5}]}, tmp_path / "a.png")

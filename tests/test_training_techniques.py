"""Training techniques every method can use: weight averaging (an EMA of the
weights), a held-out validation split, and the best checkpoint selected on
validation PGD accuracy of the raw or the averaged model."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _helpers import NoHostSync
from _tiny_cifar import write_tiny_cifar10
from advtrain import PGD, AttackPolicy, ATTATrainer, Trainer
from advtrain import cli
from advtrain.attacks import FGSMRS
from advtrain.data import DeviceLoader
from advtrain.diagnostics import RobustnessDropMonitor
from advtrain.methods import METHODS
from advtrain.models import SmallCNN
from advtrain.training import (Callback, CheckpointError, LambdaCallback, WeightAverage, evaluation_weights,
                               load_checkpoint, train_val_split)

EPS = 8 / 255


def synthetic(n: int = 48, seed: int = 0):
    """8×8 images whose class is readable from the brightest channel; image
    ``i`` carries its index in the first two pixels (so splits can be traced)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    x[:, 0, 0, 0] = torch.arange(n) % 256
    x[:, 0, 0, 1] = torch.arange(n) // 256
    return x, y


def ids(images: torch.Tensor) -> set:
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=3, width=4)


def make_trainer(run_dir=None, seed_model=0, **kw) -> Trainer:
    defaults = dict(epochs=2, batch_size=16, lr=0.05, eval_examples=16, eval_attack=PGD(EPS, steps=1),
                    val_attack=PGD(EPS, steps=1), progress=False, seed=0, run_dir=run_dir, device="cpu")
    defaults.update(kw)
    return Trainer(small_model(seed_model), AttackPolicy(FGSMRS(EPS, bn_mode="train")), **defaults)


def state(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Snapshots(AttackPolicy):
    """FGSM-RS that records the live model's state after every optimizer step."""

    def __init__(self, replays: int = 1) -> None:
        super().__init__(FGSMRS(EPS, bn_mode="train"))
        self.replays = replays
        self.after: list = []

    def after_step(self, model, batch, perturbation) -> None:
        self.after.append(state(model))


class StopAt(Callback):
    """Simulates a crash when epoch ``epoch`` (0-based) starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated kill")


# ------------------------------------------------------------ weight average
@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_equals_a_hand_computed_ema_of_the_weights_after_each_step(warmup):
    tau = 0.6
    policy = Snapshots()
    trainer = Trainer(small_model(), policy, epochs=1, batch_size=8, weight_average=WeightAverage(tau, warmup=warmup),
                      eval_every=0, progress=False, seed=0, device="cpu")
    trainer.fit(synthetic(32))  # 4 steps
    assert len(policy.after) == 4 and trainer.weight_average.updates == 4
    expected = {k: v.double() for k, v in policy.after[0].items()}  # the first update copies
    for t, live in enumerate(policy.after[1:], start=1):
        decay = min(tau, (1 + t) / (10 + t)) if warmup else tau
        for k, v in live.items():
            expected[k] = decay * expected[k] + (1 - decay) * v.double() if v.is_floating_point() else v.double()
    got = trainer.weight_average.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
    # BatchNorm statistics are averaged; the step counters are the live model's
    assert not torch.allclose(got["stage1.1.running_mean"], policy.after[-1]["stage1.1.running_mean"])
    assert torch.equal(got["stage1.1.num_batches_tracked"], policy.after[-1]["stage1.1.num_batches_tracked"])
    assert all(not p.requires_grad for p in trainer.weight_average.module.parameters())


def test_the_average_is_updated_after_every_replay_and_without_host_syncs():
    policy = Snapshots(replays=3)
    trainer = Trainer(small_model(), policy, epochs=1, batch_size=16, weight_average=0.9, eval_every=0,
                      progress=False, seed=0, device="cpu")
    trainer.fit(synthetic(32))  # 2 batches × 3 replays
    assert trainer.global_step == 6 and trainer.weight_average.updates == 6
    average = trainer.weight_average
    before = state(average.module)
    with NoHostSync():
        average.update(trainer.model)
    assert any(not torch.equal(before[k], v) for k, v in average.module.state_dict().items())


def test_the_average_does_not_change_the_raw_run():
    data, test = synthetic(), synthetic(16, seed=1)
    plain = make_trainer(eval_every=1)
    plain.fit(data, eval_data=test)
    averaged = make_trainer(eval_every=1, weight_average=0.9, val_examples=8)
    averaged.fit(data, eval_data=test)
    # the validation split takes 8 examples from training, so compare the same training data
    held_out = make_trainer(eval_every=1, val_examples=8)
    held_out.fit(data, eval_data=test)
    want, got = state(held_out.model), state(averaged.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["robust_acc"] for r in held_out.history] == [r["robust_acc"] for r in averaged.history]
    assert [r["val_robust_acc"] for r in held_out.history] == [r["val_robust_acc"] for r in averaged.history]
    assert "wa_robust_acc" not in plain.history[-1]


def test_records_hold_raw_averaged_and_validation_accuracies_and_the_config_records_the_options():
    trainer = make_trainer(weight_average=0.9, val_examples=8, eval_every=1)
    history = trainer.fit(synthetic(), eval_data=synthetic(16, seed=1))
    record = history[-1]
    for key in ("clean_acc", "robust_acc", "wa_clean_acc", "wa_robust_acc", "val_clean_acc", "val_robust_acc",
                "wa_val_clean_acc", "wa_val_robust_acc"):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["val_time"] >= 0.0
    config = trainer.config()
    assert config["weight_average"] == {"tau": 0.9, "warmup": False} and config["val_examples"] == 8
    assert make_trainer().config()["weight_average"] is None


def test_resume_with_weight_average_and_validation_equals_an_uninterrupted_run(tmp_path):
    data, test = synthetic(), synthetic(16, seed=1)
    kw = dict(epochs=3, weight_average=WeightAverage(0.8, warmup=True), val_examples=8)
    full = make_trainer(tmp_path / "full", **kw)
    full.fit(data, eval_data=test)
    killed = make_trainer(tmp_path / "killed", callbacks=[StopAt(2)], **kw)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data, eval_data=test)
    saved = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert saved["epoch"] == 2 and saved["eval_weights"] == "averaged" and saved["weight_average"]["updates"] == 6
    resumed = make_trainer(tmp_path / "killed", seed_model=123, **kw)
    resumed.fit(data, eval_data=test, resume=True)
    for mine, theirs in ((full.model, resumed.model), (full.weight_average.module, resumed.weight_average.module)):
        want, got = state(mine), state(theirs)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.weight_average.updates == full.weight_average.updates == 9
    keys = ("wa_robust_acc", "val_robust_acc", "wa_val_robust_acc", "wa_val_clean_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]


def test_a_checkpoint_without_an_average_starts_one_and_a_foreign_average_is_refused(tmp_path):
    plain = make_trainer(tmp_path / "plain", epochs=1, eval_every=0)
    plain.fit(synthetic())
    averaged = make_trainer(tmp_path / "plain", epochs=2, eval_every=0, weight_average=0.9)
    with pytest.warns(UserWarning, match="weight_average"):
        averaged.fit(synthetic(), resume=True)
    assert averaged.weight_average.updates == 3  # the second epoch's steps only

    other = Trainer(SmallCNN(num_classes=3, width=8), weight_average=0.9, progress=False, device="cpu")
    foreign = other.state_dict()
    foreign["weight_average"] = averaged.state_dict()["weight_average"]  # the average of a width-4 model
    with pytest.raises(CheckpointError, match="weight average"):
        other.load_state_dict(foreign)


@pytest.mark.parametrize("value, error, match", [
    (1.0, ValueError, "weight_average"), (0, ValueError, "weight_average"), ("0.9", TypeError, "weight_average"),
    (True, TypeError, "weight_average"),
])
def test_bad_weight_average_values_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        Trainer(small_model(), weight_average=value, device="cpu")


def test_bad_weight_average_settings_are_refused():
    with pytest.raises(ValueError, match="tau"):
        WeightAverage(1.5)
    with pytest.raises(TypeError, match="warmup"):
        WeightAverage(0.9, warmup=1)
    with pytest.raises(RuntimeError, match="attach"):
        WeightAverage(0.9).update(small_model())
    average = WeightAverage(0.9)
    average.attach(small_model())
    with pytest.raises(ValueError, match="attached"):
        average.update(nn.Linear(2, 2))


# ------------------------------------------------------------- validation
def test_the_split_is_fixed_by_the_seed_disjoint_complete_and_in_order():
    images, labels = synthetic(40)
    train, val = train_val_split((images, labels), 10, seed=3)
    again, val_again = train_val_split((images, labels), 10, seed=3)
    _, other = train_val_split((images, labels), 10, seed=4)
    assert len(train) == 30 and len(val) == 10
    assert torch.equal(val.images, val_again.images) and torch.equal(train.labels, again.labels)
    assert ids(val.images) != ids(other.images)
    assert ids(train.images) | ids(val.images) == set(range(40)) and not ids(train.images) & ids(val.images)
    order = (train.images[:, 0, 0, 0].long()).tolist()
    assert order == sorted(order)
    for bad, error in ((0, ValueError), (40, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="n"):
            train_val_split((images, labels), bad)


def test_held_out_examples_are_never_trained_on_and_stores_fit_the_rest():
    images, labels = synthetic(48)
    trainer = ATTATrainer(small_model(), epochs=1, batch_size=16, val_examples=12, val_attack=PGD(EPS, steps=1),
                          eval_every=1, progress=False, seed=5, device="cpu")
    seen: set = set()
    original = trainer.train_step
    trainer.train_step = lambda batch: seen.update(batch.index.tolist()) or original(batch)
    trainer.fit((images, labels))
    val_ids = ids(trainer._val[0])
    _, expected_val = train_val_split((images, labels), 12, seed=5)
    assert val_ids == ids(expected_val.images) and len(val_ids) == 12
    assert trainer.loader.num_examples == 36 and seen == set(range(36))
    assert not ids(trainer.loader.images) & val_ids
    assert trainer.policy.store.data.shape[0] == 36
    assert "val_robust_acc" in trainer.history[-1]


def test_validation_needs_the_dataset_and_good_settings():
    images, labels = synthetic(32)
    trainer = make_trainer(val_examples=8)
    with pytest.raises(ValueError, match="val_examples"):
        trainer.fit(DeviceLoader((images, labels), 16, device="cpu"))
    with pytest.raises(ValueError, match="val_examples"):
        make_trainer(val_examples=0)
    with pytest.raises(TypeError, match="val_attack"):
        make_trainer(val_attack="pgd")
    with pytest.raises(RuntimeError, match="val_examples"):
        make_trainer().validate()


# -------------------------------------------------------- best checkpoint
def _record(epoch, raw, raw_clean, wa, wa_clean):
    return {"epoch": epoch, "val_robust_acc": raw, "val_clean_acc": raw_clean,
            "wa_val_robust_acc": wa, "wa_val_clean_acc": wa_clean}


def test_the_monitor_reading_validation_keeps_the_better_of_raw_and_averaged(tmp_path):
    trainer = make_trainer(tmp_path, weight_average=0.9, val_examples=8)
    with torch.no_grad():  # make the averaged weights tell apart from the raw ones
        for p in trainer.weight_average.module.parameters():
            p.add_(1.0)
    monitor = RobustnessDropMonitor()
    monitor.on_fit_start(trainer)
    steps = [  # (raw robust, raw clean, averaged robust, averaged clean) -> best epoch, weights
        ((0.30, 0.50, 0.20, 0.60), 1, "raw"),
        ((0.25, 0.50, 0.35, 0.55), 2, "averaged"),
        ((0.35, 0.50, 0.35, 0.70), 2, "averaged"),  # a tie goes to raw, whose clean 0.50 < 0.55
        ((0.35, 0.60, 0.10, 0.90), 4, "raw"),  # the same robust accuracy, a higher clean one
    ]
    for epoch, (accs, best_epoch, weights) in enumerate(steps):
        record = _record(epoch + 1, *accs)
        monitor.on_epoch_end(trainer, epoch, record)
        assert (monitor.best_epoch, monitor.best_weights) == (best_epoch, weights)
        assert record["monitor_robust_acc"] == accs[0]
        if monitor.best_epoch == epoch + 1:
            best = load_checkpoint(tmp_path / "best.pt")
            chosen, which = evaluation_weights(best)
            model = trainer.model if weights == "raw" else trainer.weight_average.module
            assert which == weights and best["eval_weights"] == weights
            assert all(torch.equal(chosen[k], v) for k, v in model.state_dict().items())
            if epoch + 1 == 2:
                assert best["history"][-1]["monitor_weights"] == "averaged"
    assert monitor.best == 0.35 and monitor.best_clean == 0.60

    restored = RobustnessDropMonitor()
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert (restored.best_epoch, restored.best_weights, restored.best_clean) == (4, "raw", 0.60)
    monitor.on_epoch_end(trainer, 4, {"epoch": 5})  # an epoch without validation is skipped
    assert len(monitor.measurements) == 4


def test_the_monitor_without_a_run_dir_keeps_the_averaged_weights_in_memory():
    trainer = make_trainer(weight_average=0.9, val_examples=8)
    with torch.no_grad():
        trainer.weight_average.module.stage1[0].weight.add_(1.0)
    monitor = RobustnessDropMonitor()
    monitor.on_epoch_end(trainer, 0, _record(1, 0.1, 0.5, 0.3, 0.5))
    fresh = small_model(seed=7)
    monitor.restore_best(fresh)
    want = trainer.weight_average.module.state_dict()
    assert all(torch.equal(want[k], v) for k, v in fresh.state_dict().items())


def test_the_monitor_without_data_refuses_attack_settings_and_a_run_without_validation():
    with pytest.raises(ValueError, match="steps"):
        RobustnessDropMonitor(steps=20)
    monitor = RobustnessDropMonitor()
    with pytest.raises(ValueError, match="val_examples"):
        make_trainer(callbacks=[monitor]).fit(synthetic(32))
    with pytest.raises(RuntimeError, match="validation"):
        monitor.measure(small_model())
    assert "validation" in repr(monitor)


def test_best_pt_holds_the_weights_that_scored_best_in_a_real_run(tmp_path):
    snapshots = {}
    monitor = RobustnessDropMonitor()
    snapshot = LambdaCallback(on_epoch_end=lambda t, e, r: snapshots.__setitem__(
        e + 1, {"raw": state(t.model), "averaged": state(t.weight_average.module)}))
    trainer = make_trainer(tmp_path, epochs=3, weight_average=0.5, val_examples=16, callbacks=[monitor, snapshot])
    history = trainer.fit(synthetic(64))
    candidates = [(max(r["val_robust_acc"], r["wa_val_robust_acc"]), r["epoch"]) for r in history]
    assert monitor.best == max(score for score, _ in candidates)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == monitor.best_epoch and best["eval_weights"] == monitor.best_weights
    chosen, which = evaluation_weights(best)
    want = snapshots[monitor.best_epoch][which]
    assert all(torch.equal(chosen[k], want[k]) for k in want)
    raw, _ = evaluation_weights(best, "raw")
    assert all(torch.equal(raw[k], v) for k, v in snapshots[monitor.best_epoch]["raw"].items())


def test_evaluation_weights_follow_the_checkpoint_and_refuse_a_missing_average():
    averaged = make_trainer(weight_average=0.9).state_dict()
    raw = make_trainer().state_dict()
    assert evaluation_weights(averaged)[1] == "averaged" and evaluation_weights(averaged, "raw")[1] == "raw"
    assert evaluation_weights(raw)[1] == "raw"
    with pytest.raises(ValueError, match="no weight average"):
        evaluation_weights(raw, "averaged")
    with pytest.raises(ValueError, match="weights"):
        evaluation_weights(raw, "ema")
    with pytest.raises(ValueError, match="eval_weights"):
        make_trainer().save_checkpoint("x.pt", eval_weights="averaged")


# ----------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    data = write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=96, n_test=32)
    out = tmp_path_factory.mktemp("runs") / "wa"
    assert cli.main(["train", "--method", "fgsm-rs", "--data", str(data), "--epochs", "1", "--out", str(out),
                     "--model", "smallcnn", "--batch-size", "32", "--eval-examples", "16", "--no-progress",
                     "--device", "cpu", "--weight-average", "0.5", "--label-smoothing", "0.4",
                     "--val-examples", "16", "--keep-best"]) == 0
    return data, out


def test_cli_trains_with_the_techniques_and_records_them(cli_run):
    _, out = cli_run
    config = json.loads((out / "config.json").read_text())
    assert config["weight_average"] == 0.5 and config["label_smoothing"] == 0.4 and config["val_examples"] == 16
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["config"]["label_smoothing"] == 0.4 and saved["config"]["weight_average"]["tau"] == 0.5
    assert saved["loader"]["num_examples"] == 80
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("wa_val_robust_acc" in r and "monitor_weights" in r for r in records)
    assert (out / "best.pt").is_file()


def test_cli_eval_uses_the_averaged_weights_unless_told_otherwise(cli_run, tmp_path, capsys):
    data, out = cli_run
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    reports = {}
    for weights in (None, "raw"):
        report = tmp_path / f"{weights}.json"
        argv = ["eval", str(out), "--data", str(data), "--n-examples", "16", "--no-progress", "--device", "cpu",
                "--no-masking-checks", "--out", str(report)] + (["--weights", weights] if weights else [])
        assert cli.main(argv) == 0
        reports[weights] = json.loads(report.read_text())
    assert reports[None]["weights"] == "averaged" and reports["raw"]["weights"] == "raw"
    assert reports[None]["clean_accuracy"] == pytest.approx(last["wa_clean_acc"])
    assert reports["raw"]["clean_accuracy"] == pytest.approx(last["clean_acc"])
    assert "averaged weights" in capsys.readouterr().out

    best = tmp_path / "best.json"
    assert cli.main(["eval", str(out / "best.pt"), "--data", str(data), "--n-examples", "8", "--no-progress",
                     "--device", "cpu", "--no-masking-checks", "--out", str(best)]) == 0
    assert json.loads(best.read_text())["weights"] == load_checkpoint(out / "best.pt")["eval_weights"]


def test_cli_refuses_keep_best_without_validation_and_averaged_weights_without_an_average(cli_run, tmp_path,
                                                                                          capsys):
    data, out = cli_run
    assert cli.main(["train", "--data", str(data), "--keep-best", "--out", str(tmp_path / "x"), "--model",
                     "smallcnn", "--device", "cpu"]) == 2
    assert "--val-examples" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(data), "--weight-average", "1.5"]) == 2
    assert "(0, 1)" in capsys.readouterr().err
    plain = Trainer(SmallCNN(num_classes=10, width=4), run_dir=tmp_path / "plain", progress=False, device="cpu")
    plain.save_checkpoint()
    assert cli.main(["eval", str(tmp_path / "plain"), "--data", str(data), "--weights", "averaged",
                     "--n-examples", "4", "--no-progress", "--device", "cpu"]) == 2
    assert "no weight average" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_trains_with_weight_averaging_and_best_by_validation(tmp_path, name):
    """Weight averaging, the validation split and the best checkpoint are
    Trainer options, so every method of the registry takes them as they are."""
    method = METHODS[name]
    short = {"epochs": 2}
    if "steps" in method.options:
        short["steps"] = 1
    if "replays" in method.options:
        short["replays"] = 2
    trainer = method.build(small_model(), batch_size=16, lr=0.05, eval_examples=16, eval_attack=PGD(EPS, steps=1),
                           val_attack=PGD(EPS, steps=1), progress=False, seed=0, device="cpu", run_dir=tmp_path,
                           weight_average=0.9, val_examples=16, callbacks=[RobustnessDropMonitor()], **short)
    history = trainer.fit(synthetic(64), eval_data=synthetic(16, seed=1))
    record = history[-1]
    for key in ("wa_clean_acc", "val_robust_acc", "wa_val_robust_acc"):
        assert 0.0 <= record[key] <= 1.0, (name, key, record)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["config"]["policy"] == trainer.config()["policy"] and "weight_average" in best

"""Protocol presets (``fastat``, ``apart``): the per-epoch one-cycle schedule
against torch's ``OneCycleLR`` stepped once per epoch, what each protocol
gives a method's Trainer, overrides, the ``--protocol`` flag and its
composition with ``--scale``, and bad names."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _tiny_cifar import write_tiny_cifar10
from advtrain import build_protocol_trainer, cli
from advtrain.diagnostics import RobustnessDropMonitor
from advtrain.models import ResNet18, SmallCNN
from advtrain.methods.protocols import PROTOCOLS, Protocol, get_protocol, method_settings, protocol_kwargs
from advtrain.training.schedules import one_cycle_momentum_per_epoch, one_cycle_per_epoch


def torch_one_cycle_per_epoch(max_lr: float, epochs: int):
    """Each epoch's learning rate and momentum under the FastAT Benchmark's
    ``OneCycleLR(opt, max_lr, total_steps=epochs)``, ``step()`` after every epoch,
    on its SGD(momentum=0.9)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs)
    lrs, momenta = [], []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        scheduler.step()
    return lrs, momenta


@pytest.mark.parametrize("epochs", [100, 10, 3, 1])  # the benchmark's; the cpu scale's; a first phase before step 0
def test_per_epoch_one_cycle_is_torchs_one_cycle_lr_stepped_once_per_epoch(epochs):
    lrs, momenta = torch_one_cycle_per_epoch(0.1, epochs)
    lr, momentum = one_cycle_per_epoch(0.1, epochs), one_cycle_momentum_per_epoch(epochs)
    for e in range(epochs):
        for within in (0.0, 0.37, 0.999):  # constant through the epoch
            assert math.isclose(lr(e + within), lrs[e], rel_tol=1e-12, abs_tol=1e-15), (e, within)
            assert math.isclose(momentum(e + within), momenta[e], rel_tol=1e-12), (e, within)
    if epochs == 100:
        assert lr(0) == pytest.approx(0.1 / 25) and lr(29) == pytest.approx(0.1) and lr(28) < 0.1
        assert lr(99) == pytest.approx(0.1 / 25 / 1e4) and momentum(29) == pytest.approx(0.85)


def test_per_epoch_one_cycle_refuses_bad_settings():
    with pytest.raises(TypeError, match="epochs"):
        one_cycle_per_epoch(0.1, 10.5)
    with pytest.raises(ValueError, match="epochs"):
        one_cycle_momentum_per_epoch(0)
    with pytest.raises(ValueError, match="peak"):
        one_cycle_per_epoch(-0.1, 10)
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle_per_epoch(0.1, 10, pct_start=1.0)


def test_the_protocols_hold_the_benchmarks_and_the_apart_papers_settings():
    fastat, apart = PROTOCOLS["fastat"], PROTOCOLS["apart"]
    assert (fastat.model, dict(fastat.model_kwargs), fastat.epochs, fastat.lr, fastat.schedule) == (
        "resnet18", {"normalize": False}, 100, 0.1, "onecycle-per-epoch")
    assert (fastat.momentum, fastat.momentum_low, fastat.weight_decay, fastat.batch_size, fastat.pad_fill) == (
        0.95, 0.85, 5e-4, 128, 0.0)
    assert (fastat.label_smoothing, fastat.weight_average, fastat.val_examples, fastat.keep_best) == (
        0.4, 0.9995, 1000, True)
    assert (apart.model, dict(apart.model_kwargs), apart.epochs, apart.lr, apart.schedule) == (
        "preactresnet18", {"normalize": False}, 30, 0.2, "cyclic")
    assert (apart.momentum, apart.momentum_low, apart.weight_decay, apart.pad_fill) == (0.9, 0.8, 2e-4, 0.5)
    assert (apart.label_smoothing, apart.weight_average, apart.val_examples, apart.keep_best) == (
        0.0, None, None, False)


def test_each_methods_own_benchmark_config_reaches_its_trainer_keywords():
    assert method_settings("fastat", "pgd")["weight_average"] is None  # pgd_at.yaml: weight_average false
    assert method_settings("fastat", "pgd-at-wa")["weight_average"] == 0.9995  # the module's FASTAT_CONFIG
    assert method_settings("fastat", "free-at")["total_epoch"] == 200
    nfgsm = protocol_kwargs("fastat", "nfgsm")
    assert (nfgsm["epochs"], nfgsm["lr"], nfgsm["label_smoothing"], nfgsm["weight_average"]) == (100, 0.1, 0.4, 0.9995)
    assert nfgsm["val_examples"] == 1000 and nfgsm["eval_attack"].steps == 20
    assert protocol_kwargs("apart", "nfgsm")["weight_average"] is None  # the table is fastat's alone


def test_build_protocol_trainer_holds_the_recipe_and_the_method(tmp_path):
    trainer = build_protocol_trainer("fastat", "nfgsm", SmallCNN(width=4), device="cpu", progress=False)
    assert (trainer.epochs, trainer.lr, trainer.weight_decay, trainer.batch_size) == (100, 0.1, 5e-4, 128)
    assert (trainer.label_smoothing, trainer.weight_average.tau, trainer.val_examples) == (0.4, 0.9995, 1000)
    assert trainer.pad_fill == 0.0 and type(trainer.policy.attack).__name__ == "NFGSM"
    assert [type(cb) for cb in trainer.callbacks] == [RobustnessDropMonitor]
    lr, momentum = one_cycle_per_epoch(0.1, 100), one_cycle_momentum_per_epoch(100)
    for epoch in (0, 12.5, 29, 64.2, 99.9):
        assert trainer.lr_schedule(epoch) == lr(epoch) and trainer.momentum_schedule(epoch) == momentum(epoch)

    short = build_protocol_trainer("fastat", "pgd", SmallCNN(width=4), epochs=10, lr=0.05, steps=2, device="cpu")
    assert short.epochs == 10 and short.weight_average is None and short.policy.attack.steps == 2
    assert short.lr_schedule(9) == pytest.approx(0.05 / 25 / 1e4) and short.lr_schedule(2) == pytest.approx(0.05)

    own = build_protocol_trainer("fastat", "fgsm", SmallCNN(width=4), schedule="cyclic", device="cpu")
    assert own.lr_schedule(50) == pytest.approx(0.1) and own.momentum_schedule is None  # an override wins

    free = build_protocol_trainer("fastat", "free-at", SmallCNN(width=4), device="cpu")
    passes = math.ceil(200 / free.replays)  # 200 epochs' worth of optimizer steps
    assert free.epochs == passes and free.lr_schedule(passes - 1) == pytest.approx(0.1 / 25 / 1e4)

    apart = build_protocol_trainer("apart", "fgsm", SmallCNN(width=4), device="cpu")
    assert (apart.epochs, apart.weight_decay, apart.pad_fill, apart.weight_average, apart.val_examples) == (
        30, 2e-4, 0.5, None, None)
    assert apart.lr_schedule(0) == 0 and apart.lr_schedule(15) == pytest.approx(0.2)
    assert apart.momentum_schedule(15) == pytest.approx(0.8) and apart.callbacks == []


def test_without_a_model_the_protocol_builds_its_own_network():
    narrow = Protocol(**{**vars(PROTOCOLS["fastat"]), "model_kwargs": {"normalize": False, "width": 4}})
    trainer = build_protocol_trainer(narrow, "fgsm", num_classes=100, device="cpu")
    assert type(trainer.model) is ResNet18 and trainer.model.linear.out_features == 100
    assert trainer.model.init_kwargs["normalize"] is False  # the benchmark feeds raw pixels
    assert trainer.model.init_kwargs["width"] == 4


def test_an_unknown_protocol_names_the_known_ones(capsys):
    with pytest.raises(ValueError, match="unknown protocol 'madry'; known protocols: fastat, apart"):
        build_protocol_trainer("madry", "fgsm", SmallCNN(width=4))
    with pytest.raises(ValueError, match="known methods"):
        protocol_kwargs("fastat", "fgsm-xyz")
    assert get_protocol(PROTOCOLS["apart"]) is PROTOCOLS["apart"]
    with pytest.raises(ValueError, match="unknown keys"):
        Protocol(**{**vars(PROTOCOLS["apart"]), "per_method": {"fgsm": {"tau": 0.9}}})
    with pytest.raises(ValueError, match="keep_best needs val_examples"):
        Protocol(**{**vars(PROTOCOLS["apart"]), "keep_best": True})
    assert cli.main(["train", "--data", "d", "--protocol", "madry"]) == 2
    err = capsys.readouterr().err
    assert "--protocol" in err and "'fastat'" in err and "'apart'" in err


def _args(*argv: str):
    return cli.make_parser().parse_args(["train", "--data", "d", "--device", "cpu", "--no-progress", *argv])


def test_the_protocol_flag_sets_the_recipe_a_scale_shrinks_it_and_flags_win():
    args = cli.apply_scale(cli.apply_protocol(_args("--protocol", "fastat", "--method", "free-at")))
    assert (args.model, args.epochs, args.train_examples) == ("resnet18", 200, None)
    args = cli.apply_scale(cli.apply_protocol(_args("--protocol", "fastat", "--scale", "gpu", "--method", "fgsm")))
    assert (args.model, args.epochs) == ("resnet18", 100)  # the full size is the protocol's own

    small = cli.build_trainer(_args("--protocol", "fastat", "--scale", "cpu", "--method", "fgsm"), num_classes=10)
    assert type(small.model) is SmallCNN and small.epochs == 10 and small.val_examples == 1000
    assert small.label_smoothing == 0.4 and small.weight_average.tau == 0.9995
    assert small.lr_schedule(9) == pytest.approx(0.1 / 25 / 1e4)  # the one-cycle over the scale's 10 epochs

    flags = cli.build_trainer(_args("--protocol", "fastat", "--scale", "cpu", "--method", "fgsm", "--epochs", "4",
                                    "--lr", "0.05", "--label-smoothing", "0", "--val-examples", "50",
                                    "--schedule", "cyclic"), num_classes=10)
    assert (flags.epochs, flags.lr, flags.label_smoothing, flags.val_examples) == (4, 0.05, 0.0, 50)
    assert flags.lr_schedule(2) == pytest.approx(0.05) and flags.momentum_schedule is None

    apart = cli.build_trainer(_args("--protocol", "apart", "--scale", "cpu", "--method", "pgd", "--steps", "2"), 10)
    assert (apart.weight_decay, apart.pad_fill, apart.epochs) == (2e-4, 0.5, 10)
    assert apart.momentum_schedule(5) == pytest.approx(0.8) and apart.policy.attack.steps == 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)


def test_a_protocol_run_says_and_records_which_protocol_ran(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--protocol", "fastat", "--method", "fgsm", "--data", str(data_dir), "--scale", "cpu",
                     "--epochs", "1", "--train-examples", "64", "--val-examples", "16", "--eval-examples", "16",
                     "--batch-size", "32", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("protocol fastat (FastAT Benchmark (CIFAR-10)): onecycle-per-epoch lr 0.1")
               for line in lines)
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["protocol"] == "fastat" and recorded["epochs"] == 1 and recorded["model"] == "smallcnn"
    assert (out / "best.pt").is_file()  # kept by validation PGD accuracy


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_every_registered_method_builds_under_every_protocol(protocol):
    from advtrain.methods import METHODS

    for name in METHODS:
        settings = method_settings(protocol, name)
        trainer = build_protocol_trainer(protocol, name, SmallCNN(width=4), device="cpu", progress=False)
        assert trainer.label_smoothing == settings["label_smoothing"], name
        tau = None if trainer.weight_average is None else trainer.weight_average.tau
        assert tau == settings["weight_average"], name
        assert trainer.lr == settings["lr"] and trainer.val_examples == PROTOCOLS[protocol].val_examples, name
        assert trainer.pad_fill == PROTOCOLS[protocol].pad_fill, name

"""Run sizes (``--scale``): what each fills in, that explicit values win, and
what the first line of a run says about its size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.training.scales import SCALES, get_scale


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=32)


def _args(*argv: str):
    return cli.make_parser().parse_args(["train", "--data", "d", *argv])


def test_the_cpu_scale_fills_the_size_and_explicit_flags_win():
    args = cli.apply_scale(_args("--scale", "cpu"))
    cpu = SCALES["cpu"]
    assert (args.model, args.train_examples, args.epochs, args.eval_examples) == (
        cpu.model, cpu.train_examples, cpu.epochs, cpu.eval_examples) == ("smallcnn", 10_000, 10, 1000)
    args = cli.apply_scale(_args("--scale", "cpu", "--epochs", "3", "--model", "preactresnet18",
                                 "--eval-examples", "200"))
    assert (args.model, args.train_examples, args.epochs, args.eval_examples) == ("preactresnet18", 10_000, 3, 200)
    assert cli.apply_scale(args) is args and args.epochs == 3  # idempotent


def test_no_scale_is_the_full_size_and_keeps_the_presets_epochs():
    args = cli.apply_scale(_args())
    assert (args.model, args.train_examples, args.epochs, args.eval_examples) == ("preactresnet18", None, None, 1000)
    trainer = cli.build_trainer(_args("--method", "fgsm-rs", "--device", "cpu", "--no-progress"), num_classes=10)
    assert trainer.epochs == 15  # FGSM-RS's preset, untouched by the gpu size


def test_an_unknown_scale_names_the_known_ones(capsys):
    assert cli.main(["train", "--data", "d", "--scale", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--scale" in err and "'cpu'" in err and "'gpu'" in err
    with pytest.raises(ValueError, match="known scales: cpu, gpu"):
        get_scale("laptop")


def test_the_first_line_says_the_scale_and_the_run_records_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "fgsm", "--data", str(data_dir), "--scale", "cpu", "--epochs", "1",
                     "--train-examples", "64", "--eval-examples", "16", "--batch-size", "32", "--no-progress",
                     "--device", "cpu", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # the line says what runs, the scale's sizes as overridden by the flags
    assert first.startswith("scale cpu: smallcnn on the first 64 training images for 1 epoch, 16 test images")
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["scale"] == "cpu" and recorded["model"] == "smallcnn" and recorded["epochs"] == 1
    # the resumed run reads the recorded size back and has nothing left to do
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "scale cpu" in capsys.readouterr().out


def test_a_full_size_run_on_the_cpu_says_how_to_get_a_short_one(data_dir, tmp_path, capsys, monkeypatch):
    args = cli.apply_scale(_args("--device", "cpu"))
    assert cli._size_note(args, 50_000).startswith("note: this run trains on 50,000 images on a CPU")
    assert "--scale cpu" in cli._size_note(args, 50_000)
    assert cli._size_note(args, 1_000) is None  # a small data set is a short run anyway
    assert cli._size_note(cli.apply_scale(_args("--device", "cuda")), 50_000) is None
    monkeypatch.setattr(cli, "FULL_SIZE", 64)  # the tiny data set counts as full size
    assert cli.main(["train", "--method", "fgsm", "--data", str(data_dir), "--model", "smallcnn", "--epochs", "1",
                     "--eval-examples", "16", "--batch-size", "32", "--no-progress", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("note: this run trains on 64 images")


def test_the_cpu_scale_sets_aparts_step_decay_for_its_small_model_only():
    cpu = SCALES["cpu"]
    assert dict(cpu.method_options) == {"apart": {"step_weight_decay": 400.0}}
    args = cli.apply_scale(_args("--method", "apart", "--scale", "cpu"))
    assert args.step_weight_decay == 400.0
    assert "apart with --step-weight-decay 400 for this size" in cli._size_note(args, 10_000)
    trainer = cli.build_trainer(_args("--method", "apart", "--scale", "cpu", "--device", "cpu", "--no-progress"),
                                num_classes=10)
    assert trainer.policy.weight_decay == 400.0
    # a value given wins, and the first line then claims no scale option
    args = cli.apply_scale(_args("--method", "apart", "--scale", "cpu", "--step-weight-decay", "1200"))
    assert args.step_weight_decay == 1200.0 and "--step-weight-decay" not in cli._size_note(args, 10_000)
    # another model, another scale or another method: the preset's own value
    assert cli.apply_scale(_args("--method", "apart", "--scale", "cpu", "--model", "preactresnet18")
                           ).step_weight_decay is None
    assert cli.apply_scale(_args("--method", "apart", "--scale", "gpu")).step_weight_decay is None
    assert cli.apply_scale(_args("--method", "fgsm-rs", "--scale", "cpu")).step_weight_decay is None


def test_a_config_files_step_decay_wins_over_the_scale_and_the_run_records_what_it_used(data_dir, tmp_path,
                                                                                          capsys):
    config = tmp_path / "apart.toml"
    config.write_text("step_weight_decay = 800.0\n")
    out = tmp_path / "from-config"
    common = ["train", "--method", "apart", "--data", str(data_dir), "--scale", "cpu", "--epochs", "1",
              "--train-examples", "64", "--eval-examples", "16", "--batch-size", "32", "--no-progress",
              "--device", "cpu"]
    assert cli.main(common + ["--config", str(config), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["step_weight_decay"] == 800.0
    out = tmp_path / "from-scale"
    assert cli.main(common + ["--out", str(out)]) == 0
    assert "apart with --step-weight-decay 400" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["step_weight_decay"] == 400.0

"""A run directory that already holds a run is never silently overwritten:
``Trainer.fit`` and ``advtrain train`` refuse a fresh run there unless told
to resume or to overwrite; the flags are spelled out (no abbreviations), and
an unknown one names the closest known flag."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.models import SmallCNN
from advtrain.training import Trainer
from advtrain.training.history import History
from advtrain.training.run_files import clear_run, existing_run

TINY = ["--method", "standard", "--model", "smallcnn", "--batch-size", "64", "--eval-examples", "16",
        "--no-progress", "--device", "cpu", "--epochs", "1"]


def tiny_data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def tiny_trainer(run_dir: Path, epochs: int = 1) -> Trainer:
    torch.manual_seed(0)
    return Trainer(SmallCNN(num_classes=3, width=4), epochs=epochs, batch_size=8, eval_every=0, progress=False,
                   seed=0, run_dir=run_dir, device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------ the files
def test_a_run_is_marked_by_its_checkpoint_metrics_or_config(tmp_path):
    assert existing_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    assert existing_run(tmp_path) == []  # an empty metrics file records nothing
    (tmp_path / "config.json").write_text("{}")
    assert [p.name for p in existing_run(tmp_path)] == ["config.json"]


def test_clearing_removes_what_a_run_wrote_and_nothing_else(tmp_path):
    written = ["checkpoint.pt", "metrics.jsonl", "config.json", "best.pt", "checkpoint_epoch001.pt"]
    for name in written + ["notes.txt", "checkpoint.pt.bak"]:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in clear_run(tmp_path)) == sorted(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt.bak", "notes.txt"]


# ------------------------------------------------------------------------ API
def test_fit_refuses_a_fresh_run_into_a_run_directory(tmp_path):
    tiny_trainer(tmp_path).fit(tiny_data())
    before = (tmp_path / "metrics.jsonl").read_text()
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run .*resume=True.*overwrite=True"):
        tiny_trainer(tmp_path).fit(tiny_data())
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint
    assert not (tmp_path / ".advtrain.lock").exists()  # the lock is given back


@pytest.mark.filterwarnings("ignore:resuming .* with settings that differ")
def test_fit_overwrite_starts_over_and_resume_continues(tmp_path):
    tiny_trainer(tmp_path).fit(tiny_data())
    (tmp_path / "checkpoint_epoch001.pt").write_text("stale")
    history = tiny_trainer(tmp_path).fit(tiny_data(), overwrite=True)
    assert [r["epoch"] for r in History.read(tmp_path / "metrics.jsonl")] == [r["epoch"] for r in history]
    assert len(history) == 1 and not (tmp_path / "checkpoint_epoch001.pt").exists()
    resumed = tiny_trainer(tmp_path, epochs=2).fit(tiny_data(), resume=True)
    assert len(resumed) == 2
    with pytest.raises(ValueError, match="resume and overwrite"):
        tiny_trainer(tmp_path).fit(tiny_data(), resume=True, overwrite=True)


def test_history_is_json_serializable_and_indexable(tmp_path):
    history = tiny_trainer(tmp_path).fit(tiny_data())
    assert json.loads(json.dumps(history)) == History.read(tmp_path / "metrics.jsonl").to_list()
    assert history[-1]["epoch"] == 1 and isinstance(history.to_list()[0], dict)
    history.append({"epoch": 2, "train_loss": float("nan")})
    assert json.loads(json.dumps(history))[-1] == {"epoch": 2, "train_loss": None}


# ------------------------------------------------------------------------ CLI
def test_cli_refuses_a_second_run_into_out_and_overwrite_replaces_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY)[0] == 0
    metrics = (out / "metrics.jsonl").read_text()
    rc, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    (out / "notes.txt").write_text("mine")
    assert run_cli(capsys, "train", "--data", data_dir, "--out", out, "--overwrite", *TINY)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert "overwrite" not in json.loads((out / "config.json").read_text())
    rc, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert rc == 0, err
    assert "2 epochs" in stdout
    rc, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--overwrite")
    assert rc == 2 and "drop one of them" in err


@pytest.mark.parametrize("typo,meant", [("--epoch", "--epochs"), ("--train-exampels", "--train-examples"),
                                        ("--batch", "--batch-size")])
def test_a_mistyped_or_abbreviated_flag_is_an_error_naming_the_closest(typo, meant, capsys):
    rc, _, err = run_cli(capsys, "train", "--data", "x", typo, "2")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"did you mean {meant}?" in err

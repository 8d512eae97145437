"""``--log csv|tensorboard``: the CSV table and the TensorBoard scalars hold
the same epochs as ``metrics.jsonl``, through a resume, and a missing
tensorboard package is one error line before any training."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.training.loggers import CSVLogger, metric_loggers

TINY = ["--method", "fgsm", "--model", "smallcnn", "--batch-size", "32", "--eval-examples", "16", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=32)


def _jsonl(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _csv(run: Path):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_csv_table_matches_metrics_jsonl_through_a_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    # epoch 1 skips evaluation (the last epoch is always evaluated), so its row has empty accuracy cells
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--epochs", "2", "--eval-every", "3", "--log", "csv",
                     "--out", str(out)]) == 0
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    records, rows = _jsonl(out), _csv(out)
    assert [r["epoch"] for r in records] == [1, 2, 3] and len(rows) == 3
    for record, row in zip(records, rows):
        for key, value in record.items():
            cell = row[key]
            assert (cell == "") if value is None else (float(cell) == pytest.approx(float(value))), key
    assert rows[0]["robust_acc"] == "" and rows[1]["robust_acc"] != "" and rows[2]["robust_acc"] != ""


def test_a_resume_drops_rows_of_epochs_after_its_checkpoint(tmp_path):
    class History(list):
        pass

    class FakeTrainer:
        history = History([{"epoch": 1, "loss": 2.0}])

    logger = CSVLogger(tmp_path / "metrics.csv")
    # the interrupted run had written epochs 1 and 2; the checkpoint brought back epoch 1 only
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,2.0\n2,1.5\n")
    logger.on_fit_start(FakeTrainer())
    logger.on_epoch_end(FakeTrainer(), 1, {"epoch": 2, "loss": 1.25, "clean_acc": 0.5})
    assert (tmp_path / "metrics.csv").read_text() == "epoch,loss,clean_acc\n1,2.0,\n2,1.25,0.5\n"


def test_tensorboard_scalars_hold_each_epoch_once_after_a_resume(data_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--epochs", "1", "--log", "tensorboard,csv",
                     "--out", str(out)]) == 0
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    robust = events.Scalars("robust_acc")
    assert [e.step for e in robust] == [1, 2]
    assert [e.value for e in robust] == pytest.approx([r["robust_acc"] for r in _jsonl(out)])
    assert "epoch" not in events.Tags()["scalars"] and (out / "metrics.csv").is_file()


def test_a_missing_tensorboard_is_one_error_line_before_training(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        metric_loggers(["tensorboard"], tmp_path)
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--epochs", "1", "--log", "tensorboard",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--log tensorboard" in err and "pip install tensorboard" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_log_flags_are_refused(data_dir, capsys):
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--log", "wandb"]) == 2
    assert "expected a comma list of csv, tensorboard" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--log", "csv"]) == 2
    assert "add --out DIR" in capsys.readouterr().err

"""``advtrain eval``'s threat model and seed: ``--norm l2`` runs the suite's
attacks in L2 at the usual radius, ``--seed`` makes a report reproducible,
and a radius the norm cannot take is one error line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    data = write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=48)
    out = tmp_path_factory.mktemp("runs") / "fgsm"
    assert cli.main(["train", "--method", "fgsm", "--data", str(data), "--model", "smallcnn", "--epochs", "1",
                     "--batch-size", "32", "--eval-examples", "16", "--no-progress", "--device", "cpu",
                     "--out", str(out)]) == 0
    return out


def _eval(run: Path, tmp_path: Path, name: str, *argv: str) -> dict:
    report = tmp_path / f"{name}.json"
    data = str(next(run.parents[1].glob("cifar*")))
    assert cli.main(["eval", str(run), "--data", data, "--no-progress", "--device", "cpu", "--out", str(report),
                     *argv]) == 0
    return json.loads(report.read_text())


def test_l2_runs_the_suite_in_l2_at_half_a_pixel_unit_and_seeds_reproduce(run, tmp_path, capsys):
    first = _eval(run, tmp_path, "a", "--norm", "l2", "--suite", "pgd20", "--seed", "3")
    again = _eval(run, tmp_path, "b", "--norm", "l2", "--suite", "pgd20", "--seed", "3")
    assert first["norm"] == "l2" and first["eps"] == 0.5 and first["seed"] == 3
    assert first["robust_accuracy"] == again["robust_accuracy"] and first["per_attack"] == again["per_attack"]
    linf = _eval(run, tmp_path, "c", "--suite", "pgd20")
    assert linf["norm"] == "linf" and linf["eps"] == pytest.approx(8 / 255) and linf["seed"] == 0
    assert "L2 eps = 0.5" in capsys.readouterr().out


def test_a_radius_the_norm_cannot_take_is_one_error_line(run, capsys):
    data = str(next(run.parents[1].glob("cifar*")))
    assert cli.main(["eval", str(run), "--data", data, "--eps", "8"]) == 2
    assert "did you mean 8/255" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--data", data, "--norm", "l2", "--eps", "-1"]) == 2
    assert "L2 radius must be finite and >= 0" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--data", data, "--norm", "l2", "--eps", "half"]) == 2
    assert "not a number or fraction" in capsys.readouterr().err
    assert cli.parse_eval_eps("1.5", "l2") == 1.5 and cli.parse_eval_eps(None, "l2") == 0.5

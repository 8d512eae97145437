"""``advtrain study`` end to end at a tiny scale: a killed study resumes
where it stopped (finished methods kept, the unfinished one from its
checkpoint), a budget leaves what does not fit for the next run and the
table marks it, a study with other settings is refused, and the report's
numbers are the ones the run directories hold."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.cli_study import parse_duration
from advtrain.data import cifar10
from advtrain.study import Study, StudySpec, planned_order, report, run_study
from advtrain.study.runner import BudgetStop

SPEC = StudySpec(methods=("pgd", "fgsm"), protocol="apart", model="smallcnn", model_kwargs={"width": 4},
                 train_examples=64, epochs=2, eval_examples=16, batch_size=32, strength=True, strength_examples=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)
    return root, cifar10(root, train=True), cifar10(root, train=False)


def _study(data, out, **kwargs):
    _, train, test = data
    return Study(kwargs.pop("spec", SPEC), out, train, test, progress=False, log=kwargs.pop("log", lambda _: None),
                 **kwargs)


def test_a_killed_study_resumes_where_it_stopped_and_reports_every_method(data, tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert planned_order(SPEC.methods) == ["fgsm", "pgd"]  # cheap first, PGD-10 last

    def kill_in_pgds_second_epoch(self, trainer, epoch):
        if trainer.run_dir.name == "pgd" and epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(BudgetStop, "on_epoch_start", kill_in_pgds_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _study(data, out).run()
    monkeypatch.undo()
    fgsm_result = (out / "fgsm" / "result.json").read_text()
    pgd_epoch_1 = (out / "pgd" / "metrics.jsonl").read_text()
    assert not (out / "pgd" / "result.json").exists() and len(pgd_epoch_1.splitlines()) == 1

    lines = []
    results = run_study(SPEC, out, *data[1:], progress=False, log=lines.append)
    assert lines[0] == "[1/2] fgsm: finished in an earlier run" and lines[1].startswith("[2/2] pgd: 2 epochs (1 done)")
    assert (out / "fgsm" / "result.json").read_text() == fgsm_result  # not rerun
    pgd_records = (out / "pgd" / "metrics.jsonl").read_text()
    assert pgd_records.startswith(pgd_epoch_1) and len(pgd_records.splitlines()) == 2  # resumed, not restarted

    rows = {row["method"]: row for row in results["rows"]}
    assert [r["status"] for r in results["rows"]] == ["finished", "finished"]
    for name in ("fgsm", "pgd"):
        result = json.loads((out / name / "result.json").read_text())
        raw = result["raw"]
        assert rows[name]["raw"] == raw and rows[name]["epochs"] == 2
        assert 0 <= raw["aa_grade"] <= min(raw["pgd20"], raw["cw"], raw["autoattack"]) <= raw["clean"] <= 1
        epochs = [json.loads(line)["time"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[name]["train_seconds"] == pytest.approx(sum(epochs))
    assert rows["pgd"]["epoch_ratio"] == 1.0 and 0 < rows["fgsm"]["epoch_ratio"] < 1
    table = (out / "results.md").read_text()
    assert "| FGSM | " in table and "| PGD-10 | " in table and "Not finished" not in table
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    # the strength part: FGSM's two epochs of perturbations on the final PGD-10 model
    strength = results["strength"]["methods"]["fgsm"]
    assert strength["epochs"] == [1, 2] and len(strength["noise_accuracy"]) == 2


def test_a_budget_leaves_what_does_not_fit_and_the_table_marks_it(data, tmp_path):
    out = tmp_path / "study"

    def clock():  # the budget runs out the moment FGSM's result is written
        return 100.0 if (out / "fgsm" / "result.json").is_file() else 0.0

    spec = StudySpec(**{**SPEC.to_dict(), "methods": ("fgsm", "pgd"), "strength": False})
    lines = []
    _study(data, out, spec=spec, budget=50.0, clock=clock, log=lines.append).run()
    results = report(_study(data, out, spec=spec))
    status = {r["method"]: r["status"] for r in results["rows"]}
    assert status["fgsm"] == "finished" and status["pgd"] != "finished"
    assert any(line.startswith("[2/2] pgd: skipped") for line in lines), lines
    assert "Not finished: PGD-10" in (out / "results.md").read_text()
    # a later run without a budget finishes it and keeps FGSM's result
    run_study(spec, out, *data[1:], progress=False, log=lambda _: None)
    assert {r["status"] for r in report(_study(data, out, spec=spec))["rows"]} == {"finished"}


def test_a_study_with_other_settings_is_refused_naming_the_difference(data, tmp_path):
    out = tmp_path / "study"
    spec = StudySpec(**{**SPEC.to_dict(), "methods": ("fgsm",), "strength": False, "epochs": 1})
    run_study(spec, out, *data[1:], progress=False, log=lambda _: None)
    other = StudySpec(**{**spec.to_dict(), "epochs": 3})
    with pytest.raises(ValueError, match="epochs: 1 -> 3"):
        _study(data, out, spec=other).run()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no study.json"):
        _study(data, tmp_path / "busy", spec=spec).run()


def test_bad_study_settings_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        StudySpec(methods=("fgsm", "pgd-99"))
    with pytest.raises(ValueError, match="twice"):
        StudySpec(methods=("fgsm", "fgsm"))
    with pytest.raises(ValueError, match="did you mean"):
        StudySpec(eps=8)
    assert [parse_duration(t) for t in ("90", "90s", "45m", "2h", "1h30m")] == [90, 90, 2700, 7200, 5400]
    for bad in ("soon", "10 parsecs", "0", "-5m"):
        with pytest.raises(Exception, match="duration|> 0"):
            parse_duration(bad)


def test_the_cli_runs_a_study_and_records_the_command(data, tmp_path, capsys):
    root = data[0]
    out = tmp_path / "study"
    argv = ["study", "--data", str(root), "--out", str(out), "--methods", "fgsm", "--model", "smallcnn",
            "--width", "4", "--train-examples", "32", "--epochs", "1", "--eval-examples", "8", "--batch-size", "16",
            "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "1 of 1 methods finished" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "advtrain study " + " ".join(argv[1:])
    assert results["spec"]["model_kwargs"] == {"width": 4} and results["spec"]["scale"] == "cpu"
    assert results["spec"]["method_options"] == {}  # no APART here: nothing of the scale's
    out = tmp_path / "apart-study"
    assert cli.main(["study", "--data", str(root), "--out", str(out), "--methods", "apart"] + argv[7:]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("protocol apart; apart with --step-weight-decay 400; order apart")
    assert json.loads((out / "study.json").read_text())["method_options"] == {"apart": {"step_weight_decay": 400.0}}
    assert "apart with step_weight_decay = 400.0" in (out / "results.md").read_text()
    assert cli.main(["study", "--data", str(root), "--out", str(out), "--methods", "fgsm,nosuch"]) == 2
    assert "unknown method nosuch" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_killed_by_sigkill_resumes_to_the_same_table(data, tmp_path):
    """The real thing: the process is killed (no Python cleanup) while PGD-10
    trains, and the same command finishes the study."""
    root = data[0]
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "advtrain", "study", "--data", str(root), "--out", str(out), "--methods",
            "fgsm,pgd", "--model", "smallcnn", "--width", "4", "--train-examples", "64", "--epochs", "3",
            "--eval-examples", "16", "--batch-size", "32", "--no-progress", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "pgd" / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "fgsm" / "result.json").is_file() and not (out / "pgd" / "result.json").is_file()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fgsm: finished in an earlier run" in done.stdout and "(1 done)" in done.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["finished", "finished"] and [r["epochs"] for r in rows] == [3, 3]


def test_the_strength_part_records_only_methods_without_a_per_example_store(data, tmp_path):
    spec = StudySpec(**{**SPEC.to_dict(), "methods": ("apart", "fgsm", "pgd"), "epochs": 1})
    results = run_study(spec, tmp_path / "study", *data[1:], progress=False, log=lambda _: None)
    assert {r["status"] for r in results["rows"]} == {"finished"}
    assert set(results["strength"]["methods"]) == {"fgsm"}  # APART's store has no rows for test images


def test_the_cpu_scale_gives_apart_its_step_decay_in_a_study_and_the_spec_records_it(data, tmp_path):
    from advtrain.cli_study import study_spec

    def spec_of(*argv):
        return study_spec(cli.make_parser().parse_args(["study", "--data", "d", "--out", "o", *argv]))

    assert spec_of("--methods", "fgsm,apart").method_options == {"apart": {"step_weight_decay": 400.0}}
    assert spec_of("--methods", "fgsm").method_options == {}
    assert spec_of("--methods", "apart", "--model", "preactresnet18").method_options == {}
    assert spec_of("--methods", "apart", "--scale", "gpu").method_options == {}
    spec = StudySpec(**{**SPEC.to_dict(), "methods": ("apart",), "strength": False,
                        "method_options": {"apart": {"step_weight_decay": 400.0}}})
    assert StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    earlier = {k: v for k, v in spec.to_dict().items() if k != "method_options"}  # a study.json of before
    assert StudySpec.from_dict(earlier).differences(spec) == [
        "method_options: {} -> {'apart': {'step_weight_decay': 400.0}}"]
    study = _study(data, tmp_path / "study", spec=spec)
    trainer = study._trainer("apart", None, study.estimator())
    assert trainer.policy.weight_decay == 400.0
    with pytest.raises(ValueError, match="not among the methods"):
        StudySpec(methods=("fgsm",), method_options={"apart": {"step_weight_decay": 400.0}})
    with pytest.raises(ValueError, match="takes no option steps"):
        StudySpec(methods=("apart",), method_options={"apart": {"steps": 3}})

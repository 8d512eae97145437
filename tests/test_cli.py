"""The ``advtrain`` command line: train with a config file and overrides,
resume, eval reports, plots, bench discovery, and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.config import ConfigError, load_config, resolve_config
from advtrain.models import PreActResNet18
from advtrain.training import Trainer

TINY = ["--model", "smallcnn", "--batch-size", "64", "--eval-examples", "32", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=128, n_test=64)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """A 1-epoch FGSM-RS SmallCNN run directory, shared by the eval and plot tests."""
    out = tmp_path_factory.mktemp("runs") / "fgsm-rs"
    assert cli.main(["train", "--method", "fgsm-rs", "--data", str(data_dir), "--epochs", "1", "--out", str(out),
                     *TINY]) == 0
    return out


def run_cli(capsys, *argv: str):
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> str:
    """The last stderr line is the error, mentioning every fragment; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert "Traceback" not in err
    assert lines[-1].startswith("advtrain: error: ")
    assert all(not line.startswith("advtrain: error") for line in lines[:-1])
    for fragment in fragments:
        assert fragment in lines[-1]
    return lines[-1]


def read_metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------- train
def test_train_with_a_toml_config_and_a_flag_override(data_dir, tmp_path, capsys):
    config = tmp_path / "fast.toml"
    config.write_text(f'''
method = "fgsm-rs"
model = "smallcnn"
data = "{data_dir}"
epochs = 3
batch-size = 64          # dashed and underscored keys both work
eval_examples = 32
eps = "8/255"
no_progress = true
device = "cpu"
''')
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(capsys, "train", "--config", config, "--epochs", "1", "--out", out)
    assert rc == 0
    assert "done: fgsm-rs smallcnn 1 epochs" in stdout
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["epochs"] == 1  # the flag beat the file
    assert recorded["method"] == "fgsm-rs" and recorded["model"] == "smallcnn"
    assert recorded["batch_size"] == 64 and recorded["eval_examples"] == 32
    assert recorded["eps"] == pytest.approx(8 / 255)
    assert "config" not in recorded and "func" not in recorded
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["model"] == "SmallCNN" and state["config"]["batch_size"] == 64
    assert "eps=0.0313725" in state["config"]["policy"]


def test_recorded_config_json_is_a_valid_config_file(data_dir, trained_run, tmp_path, capsys):
    parser = cli.make_parser()
    sub = cli._subparser(parser, "train")
    options = resolve_config(sub, load_config(trained_run / "config.json"))
    assert options["method"] == "fgsm-rs" and options["epochs"] == 1 and options["data"] == str(data_dir)


def test_json_config_values_are_checked_like_flags(tmp_path):
    sub = cli._subparser(cli.make_parser(), "train")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch-size": 32, "eps": 0.031, "lr": 1, "compile": False, "steps": 3}))
    assert resolve_config(sub, load_config(path)) == {"batch_size": 32, "eps": 0.031, "lr": 1.0,
                                                      "compile": False, "steps": 3}
    bad = {"epochs": "ten", "batch_size": 0, "eps": 8, "method": "foo", "compile": "yes", "lr": float("nan"),
           "device": 3}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key):
            resolve_config(sub, {key: value}, source="c.json")
    path.write_text(json.dumps({"batch-size": 32, "batch_size": 64}))
    with pytest.raises(ConfigError, match="given twice"):
        load_config(path)


@pytest.mark.parametrize("content, fragments", [
    ('method = "apart"\nlearning_rate = 0.1\nfoo = 1\n', ["unknown options 'learning_rate', 'foo'", "known:"]),
    ('method = "sgd"\n', ["method", "invalid choice 'sgd'"]),
    ('eps = 8\n', ["eps", "did you mean 8/255"]),
    ('epochs = 2.5\n', ["epochs: not an integer"]),
    ('method = \n', ["not valid TOML"]),
])
def test_bad_config_files_are_one_error_line(data_dir, tmp_path, capsys, content, fragments):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    rc, _, err = run_cli(capsys, "train", "--config", config, "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, str(config), *fragments)


def test_missing_config_file(data_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.toml", "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "nope.toml", "does not exist")


def test_resume_continues_an_interrupted_run_with_its_recorded_settings(data_dir, tmp_path, capsys, monkeypatch):
    common = ["--method", "fgsm-rs", "--data", data_dir, "--epochs", "2", *TINY]
    full = tmp_path / "full"
    assert run_cli(capsys, "train", *common, "--out", full)[0] == 0

    interrupted = tmp_path / "interrupted"
    original = Trainer._train_epoch

    def crash_in_second_epoch(self, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, loader, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_in_second_epoch)
    rc, _, err = run_cli(capsys, "train", *common, "--out", interrupted)
    assert rc == 130 and "interrupted" in err
    assert [r["epoch"] for r in read_metrics(interrupted)] == [1]
    monkeypatch.setattr(Trainer, "_train_epoch", original)

    # Only --out and --resume: everything else comes from OUT/config.json.
    rc, stdout, err = run_cli(capsys, "train", "--out", interrupted, "--resume")
    assert rc == 0, err
    assert "done: fgsm-rs smallcnn 2 epochs" in stdout
    resumed, reference = read_metrics(interrupted), read_metrics(full)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(resumed, reference):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["clean_acc"] == pytest.approx(b["clean_acc"])
    assert json.loads((interrupted / "config.json").read_text())["resume"] is True


def test_resume_with_another_model_is_refused_and_keeps_the_record(trained_run, capsys):
    before = (trained_run / "config.json").read_text()
    rc, _, err = run_cli(capsys, "train", "--out", trained_run, "--resume", "--model", "wideresnet")
    assert rc == 2
    assert_one_error_line(err, "different model", "SmallCNN")
    assert (trained_run / "config.json").read_text() == before


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--method", "sgd", "--data", "{data}"], ["--method", "invalid choice: 'sgd'"]),
    (["train", "--model", "resnet50", "--data", "{data}"], ["--model", "invalid choice"]),
    (["train", "--data", "{missing}"], ["data directory", "does not exist", "--download"]),
    (["train", "--eps", "-1", "--data", "{data}"], ["--eps", "must be >= 0"]),
    (["train", "--eps", "8", "--data", "{data}"], ["--eps", "did you mean 8/255"]),
    (["train", "--eps", "eight", "--data", "{data}"], ["--eps", "not a number"]),
    (["train", "--epochs", "0", "--data", "{data}"], ["--epochs", "must be >= 1"]),
    (["train", "--method", "apart", "--steps", "3", "--data", "{data}", "--model", "smallcnn"],
     ["--steps applies to", "not apart", "use --method"]),
    (["train", "--resume", "--data", "{data}"], ["--resume needs --out"]),
    (["train"], ["needs --data"]),
    (["eval", "{missing}", "--data", "{data}"], ["does not exist"]),
    (["plot", "{missing}", "--out", "x.png"], ["does not exist"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_errors_are_one_line_with_exit_status_2(data_dir, tmp_path, capsys, argv, fragments):
    argv = [a.format(data=data_dir, missing=tmp_path / "missing") for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert_one_error_line(err, *fragments)


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("device, fragments", [
    ("foo", ["--device 'foo' is not a device name", "use cpu, cuda or cuda:N"]),
    ("cuda:x", ["--device 'cuda:x' is not a device name"]),
    ("meta", ["advtrain runs on cpu, cuda", "use --device cpu"]),
])
def test_a_bad_device_is_one_line_saying_what_to_use(data_dir, trained_run, capsys, command, device, fragments):
    target = ["--data", data_dir] if command == "train" else [trained_run, "--data", data_dir]
    rc, _, err = run_cli(capsys, command, *target, "--device", device)
    assert rc == 2
    assert_one_error_line(err, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_cuda_without_cuda_is_one_line_saying_use_cpu(data_dir, trained_run, capsys, command):
    target = ["--data", data_dir] if command == "train" else [trained_run, "--data", data_dir]
    rc, _, err = run_cli(capsys, command, *target, "--device", "cuda")
    assert rc == 2
    line = assert_one_error_line(err, "--device cuda", "CUDA", "use --device cpu")
    if torch.version.cuda is None:
        assert f"CUDA is not available in this torch build ({torch.__version__}" in line


def _raise_in_training(monkeypatch, exc):
    def fit(self, *args, **kwargs):
        raise exc
    monkeypatch.setattr(Trainer, "fit", fit)


@pytest.mark.parametrize("exc, fragments", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     ["CUDA out of memory", "lower --batch-size"]),
    (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), ["file write failed", "free disk space", "--out"]),
    (RuntimeError("CUDA error: invalid device ordinal"), ["invalid device ordinal", "--device cuda:N"]),
    (PermissionError(13, "Permission denied", "/runs/a/checkpoint.pt"),
     ["Permission denied: '/runs/a/checkpoint.pt'", "choose a path you may write to"]),
])
def test_fixable_torch_and_os_errors_are_one_line_saying_what_to_do(data_dir, capsys, monkeypatch, exc,
                                                                       fragments):
    _raise_in_training(monkeypatch, exc)
    rc, _, err = run_cli(capsys, "train", "--data", data_dir, "--epochs", "1", *TINY)
    assert rc == 2
    assert_one_error_line(err, *fragments)
    monkeypatch.setenv("ADVTRAIN_TRACEBACK", "1")
    with pytest.raises(type(exc)):
        cli.main(["train", "--data", str(data_dir), "--epochs", "1", *TINY])


def test_a_compiler_failure_says_run_without_compile(data_dir, capsys, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    _raise_in_training(monkeypatch, TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found"))
    rc, _, err = run_cli(capsys, "train", "--data", data_dir, "--epochs", "1", "--compile", *TINY)
    assert rc == 2
    assert_one_error_line(err, "torch.compile failed", "No working C++ compiler", "run without --compile")


def test_other_runtime_errors_keep_their_traceback(data_dir, monkeypatch):
    _raise_in_training(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(["train", "--data", str(data_dir), "--epochs", "1", *TINY])


# -------------------------------------------------------------------- eval
def test_eval_writes_a_json_report_and_prints_a_table(trained_run, data_dir, tmp_path, capsys):
    report_path = tmp_path / "reports" / "report.json"
    rc, stdout, err = run_cli(capsys, "eval", trained_run, "--data", data_dir, "--n-examples", "32",
                              "--batch-size", "16", "--out", report_path, "--no-progress")
    assert rc == 0, err
    report = json.loads(report_path.read_text())
    assert report["model"] == "smallcnn" and report["dataset"] == "cifar10" and report["epoch"] == 1
    assert report["suite"] == "pgd20" and report["n_examples"] == 32
    assert report["eps"] == pytest.approx(8 / 255)
    assert list(report["per_attack"]) == ["PGD-20"]
    assert 0.0 <= report["robust_accuracy"] <= report["clean_accuracy"] <= 1.0
    assert "clean" in stdout and "PGD-20" in stdout and str(report_path) in stdout

    # The same model given as a checkpoint file, with a matching --model.
    rc, stdout2, _ = run_cli(capsys, "eval", trained_run / "checkpoint.pt", "--model", "smallcnn",
                             "--data", data_dir, "--n-examples", "8", "--no-progress")
    assert rc == 0 and "smallcnn" in stdout2


def test_eval_clean_accuracy_matches_the_training_run(trained_run, data_dir, capsys):
    rc, _, _ = run_cli(capsys, "eval", trained_run, "--data", data_dir, "--n-examples", "32", "--no-progress",
                       "--out", trained_run / "eval.json")
    assert rc == 0
    report = json.loads((trained_run / "eval.json").read_text())
    assert report["clean_accuracy"] == pytest.approx(read_metrics(trained_run)[-1]["clean_acc"])


def test_eval_rebuilds_a_python_trained_model_of_another_width(data_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = PreActResNet18(width=4)
    Trainer(model, None, run_dir=tmp_path, progress=False, device="cpu").save_checkpoint()
    rc, stdout, err = run_cli(capsys, "eval", tmp_path / "checkpoint.pt", "--data", data_dir, "--n-examples", "4",
                              "--no-progress")
    assert rc == 0, err
    assert "preactresnet18" in stdout


def test_eval_refuses_a_checkpoint_of_another_model(trained_run, data_dir, capsys):
    rc, _, err = run_cli(capsys, "eval", trained_run, "--model", "preactresnet18", "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "SmallCNN", "not preactresnet18")


def test_eval_refuses_a_file_that_is_not_a_checkpoint(trained_run, data_dir, capsys):
    rc, _, err = run_cli(capsys, "eval", trained_run / "metrics.jsonl", "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "not a readable advtrain checkpoint")


# -------------------------------------------------------------------- plot
def test_plot_writes_a_png(trained_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    second = tmp_path / "copy"
    second.mkdir()
    (second / "metrics.jsonl").write_text((trained_run / "metrics.jsonl").read_text())
    out = tmp_path / "fig" / "curves.png"
    rc, stdout, err = run_cli(capsys, "plot", trained_run, second, "--out", out, "--title", "two runs")
    assert rc == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(trained_run, tmp_path, capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real(name, *a))
    rc, _, err = run_cli(capsys, "plot", trained_run, "--out", tmp_path / "x.png")
    assert rc == 2
    assert_one_error_line(err, 'pip install "advtrain[plot]"')


def test_plot_run_without_metrics(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "plot", tmp_path, "--out", tmp_path / "x.png")
    assert rc == 2
    assert_one_error_line(err, "no metrics.jsonl")


# ----------------------------------------------------------------- methods
class _BetaTrainer(Trainer):
    """A preset with an option no built-in method has, as a newly registered method would bring."""

    def __init__(self, model, *, eps: float = 8 / 255, beta: float = 6.0, **kwargs):
        super().__init__(model, **kwargs)
        self.eps, self.beta = eps, beta


def _train_args(*argv: str):
    return cli.make_parser().parse_args(["train", "--data", "unused", "--model", "smallcnn", "--device", "cpu",
                                         "--no-progress", *argv])


def test_method_choices_and_option_flags_come_from_the_registry():
    from advtrain.methods import METHODS

    train = cli._subparser(cli.make_parser(), "train")
    flags = {a.dest: a for a in train._actions}
    assert list(flags["method"].choices) == list(METHODS)
    for method in METHODS.values():
        for option in method.options:
            assert option in flags, f"no flag for {method.name}'s option {option}"


def test_a_newly_registered_method_and_its_option_need_no_cli_edit(monkeypatch):
    from advtrain.methods import METHODS, Method, Passes

    monkeypatch.setitem(METHODS, "beta-at", Method("beta-at", "β-AT", _BetaTrainer, "docs/concepts.md",
                                                   lambda **_: Passes(2, 1, 1), options=("eps", "beta")))
    trainer = cli.build_trainer(_train_args("--method", "beta-at", "--beta", "2.5", "--eps", "4/255"), 10)
    assert type(trainer) is _BetaTrainer and trainer.beta == 2.5 and trainer.eps == 4 / 255
    assert cli.build_trainer(_train_args("--method", "beta-at"), 10).beta == 6.0  # the preset's default
    with pytest.raises(ValueError, match=r"^--beta applies to beta-at, not pgd: drop --beta, or use --method beta-at$"):
        cli.build_trainer(_train_args("--method", "pgd", "--beta", "1"), 10)
    with pytest.raises(ConfigError, match="beta: must be a finite number"):  # config files check it like the flag
        resolve_config(cli._subparser(cli.make_parser(), "train"), {"beta": "six"})


@pytest.mark.parametrize("option, value", [("steps", "3"), ("eps", "4/255")])
def test_an_option_the_method_does_not_take_names_the_methods_that_do(data_dir, capsys, option, value):
    from advtrain.methods import METHODS

    takers = [name for name, m in METHODS.items() if option in m.options]
    other = next(name for name in METHODS if name not in takers)
    rc, _, err = run_cli(capsys, "train", "--data", data_dir, "--method", other, f"--{option}", value, *TINY)
    assert rc == 2
    line = assert_one_error_line(err, f"--{option} applies to", f"not {other}", f"drop --{option}")
    named = line.split(" applies to ", 1)[1].split(", not ", 1)[0].replace(" and ", ", ").split(", ")
    assert named == takers


def test_compile_for_a_method_that_does_not_compile_is_one_line(data_dir, capsys, monkeypatch):
    from advtrain.methods import METHODS, Method, Passes

    monkeypatch.setitem(METHODS, "no-compile", Method("no-compile", "No compile", _BetaTrainer, "docs/concepts.md",
                                                      lambda **_: Passes(2, 1, 1), options=(), compiles=False))
    rc, _, err = run_cli(capsys, "train", "--data", data_dir, "--method", "no-compile", "--compile", *TINY)
    assert rc == 2
    assert_one_error_line(err, "--method no-compile cannot train with --compile", "drop --compile",
                          "methods that compile: standard")


# ------------------------------------------------------------------- bench
def test_bench_without_a_benchmarks_folder_says_so(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "bench", "--benchmarks", tmp_path / "nowhere")
    assert rc == 2
    assert_one_error_line(err, "no benchmark suite", "source checkout")


def test_bench_command_line():
    folder = Path("/repo/benchmarks")
    cmd = cli.bench_command(folder, "gpu", "docs/benchmarks.md", ["--", "-k", "apart"])
    assert cmd[:4] == [sys.executable, "-m", "pytest", str(folder)]
    assert cmd[cmd.index("--bench-size") + 1] == "gpu"
    assert cmd[-2:] == ["-k", "apart"]


# --------------------------------------------------------------- the script
def test_python_dash_m_advtrain_help():
    result = subprocess.run([sys.executable, "-m", "advtrain", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: advtrain" in result.stdout
    for command in ("train", "eval", "plot", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command, option", [("train", "--config"), ("eval", "--suite"), ("plot", "--out"),
                                             ("bench", "--size")])
def test_subcommand_help(capsys, command, option):
    rc, stdout, _ = run_cli(capsys, command, "--help")
    assert rc == 0
    assert stdout.startswith(f"usage: advtrain {command}") and option in stdout


def _console_script() -> str:
    """The installed ``advtrain`` script: beside this interpreter (a venv that
    is not activated), else on PATH; the test is skipped when neither has it."""
    beside = Path(sysconfig.get_path("scripts")) / ("advtrain.exe" if os.name == "nt" else "advtrain")
    found = str(beside) if beside.is_file() else shutil.which("advtrain")
    if found is None:
        pytest.skip("the advtrain console script is not installed (pip install -e . puts it beside python)")
    return found


def test_console_script_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([_console_script(), "train", "--data", str(tmp_path / "missing")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("advtrain: error: data directory")
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------- real data
@pytest.mark.realdata
def test_train_apart_on_the_real_subset(cifar10_dir, tmp_path, capsys):
    out = tmp_path / "apart"
    rc, stdout, err = run_cli(capsys, "train", "--method", "apart", "--model", "smallcnn", "--data", cifar10_dir,
                              "--train-examples", "128", "--epochs", "1", "--eval-examples", "32",
                              "--batch-size", "64", "--no-progress", "--device", "cpu", "--out", out)
    assert rc == 0, err
    record = read_metrics(out)[-1]
    assert 0.0 <= record["robust_acc"] <= record["clean_acc"] <= 1.0
    assert len(record["apart_alpha_sites"]) == 2  # SmallCNN's two declared sites


# ------------------------------------------------------------- model rebuild
@pytest.mark.parametrize("shortcut", ["preact", "input"])
def test_eval_rebuilds_the_recorded_preactresnet18_variant(tmp_path, shortcut):
    torch.manual_seed(0)
    model = PreActResNet18(width=2, normalize=False, shortcut=shortcut)
    Trainer(model, epochs=1, batch_size=16, progress=False, eval_every=0, run_dir=tmp_path).fit(
        (torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10))
    rebuilt, name, _, _ = cli.load_model(str(tmp_path))
    assert name == "preactresnet18"
    assert rebuilt.layer2[0].shortcut_from_input == (shortcut == "input")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model.cpu().eval()(x), rtol=0, atol=0)


def _fit_checkpoint(run_dir: Path, model: torch.nn.Module) -> Path:
    """Train ``model`` one epoch on 16 random images; returns its checkpoint file."""
    Trainer(model, epochs=1, batch_size=16, progress=False, eval_every=0, run_dir=run_dir).fit(
        (torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10))
    return run_dir / "checkpoint.pt"


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", dict(width=2, normalize=False)),
    ("wideresnet", dict(depth=10, widen=1, dropout=0.25)),  # dropout leaves no trace in the weights
])
def test_eval_rebuilds_the_recorded_registry_model_and_arguments(tmp_path, name, kwargs):
    from advtrain.models import build_model, model_record

    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs)
    _fit_checkpoint(tmp_path, model)
    rebuilt, rebuilt_name, state, _ = cli.load_model(str(tmp_path))
    assert rebuilt_name == name == state["config"]["model_name"]
    assert model_record(rebuilt) == model_record(model) == (name, {**state["config"]["model_kwargs"]})
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model.cpu().eval()(x))


def test_a_checkpoint_without_a_model_record_is_refused_by_eval_and_resume(data_dir, tmp_path, capsys):
    """Checkpoints of an advtrain that recorded no registry name and
    arguments: eval and resume refuse them in one line saying what to do."""
    from advtrain.training import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--method", "standard", "--data", data_dir, "--epochs", "1", "--out", run,
                   *TINY)[0] == 0
    state = load_checkpoint(run / "checkpoint.pt")
    del state["config"]["model_name"], state["config"]["model_kwargs"]
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version", "sha256")})
    rc, _, err = run_cli(capsys, "eval", run, "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "does not record its model's registry name", "advtrain.evaluation.evaluate")
    before = (run / "config.json").read_text()
    rc, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--epochs", "2")
    assert rc == 2
    assert_one_error_line(err, "does not record its model's registry name", "Trainer.fit(..., resume=path)")
    assert (run / "config.json").read_text() == before


def test_eval_refuses_a_model_outside_the_registry(data_dir, tmp_path, capsys):
    class Wider(PreActResNet18):  # a subclass is another model: its forward may differ
        pass

    _fit_checkpoint(tmp_path, Wider(width=2))
    rc, _, err = run_cli(capsys, "eval", tmp_path, "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "holds a Wider", "not in advtrain's model registry", "resnet18")


def test_resume_rebuilds_the_model_the_checkpoint_records(data_dir, tmp_path, capsys):
    """A run whose checkpoint holds a SmallCNN of width 4 (not --model's
    default width 16) resumes with that model, from the record alone."""
    from advtrain.data import cifar10
    from advtrain.models import SmallCNN
    from advtrain.training import load_checkpoint

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--method", "standard", "--data", data_dir, "--epochs", "1", "--out", run,
                   *TINY)[0] == 0
    torch.manual_seed(0)
    other = tmp_path / "other"
    Trainer(SmallCNN(width=4), epochs=1, batch_size=64, progress=False, eval_every=0, run_dir=other, seed=0,
            device="cpu").fit(cifar10(data_dir, train=True))
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    rc, stdout, err = run_cli(capsys, "train", "--out", run, "--resume", "--epochs", "2")
    assert rc == 0, err
    assert "done: standard smallcnn 2 epochs" in stdout
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["model_kwargs"]["width"] == 4


def test_resume_refuses_a_dataset_with_another_number_of_classes(data_dir, tmp_path, capsys):
    from advtrain.models import SmallCNN

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--method", "standard", "--data", data_dir, "--epochs", "1", "--out", run,
                   *TINY)[0] == 0
    other = tmp_path / "other"
    Trainer(SmallCNN(3, width=4), epochs=1, batch_size=16, progress=False, eval_every=0, run_dir=other).fit(
        (torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 3))
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    rc, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--epochs", "2")
    assert rc == 2
    assert_one_error_line(err, "cannot resume", "its model has 3 classes and cifar10 has 10", "--dataset")


def test_checkpoints_record_the_registry_name_and_arguments_or_only_the_class(tmp_path):
    from advtrain.models import SmallCNN
    from advtrain.training import CheckpointError

    config = Trainer(SmallCNN(3, width=4), progress=False).config()
    assert (config["model"], config["model_name"]) == ("SmallCNN", "smallcnn")
    assert config["model_kwargs"] == {"num_classes": 3, "width": 4, "normalize": True}
    custom = Trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), progress=False)
    assert {k: custom.config()[k] for k in ("model", "model_name", "model_kwargs")} == \
        {"model": "Sequential", "model_name": None, "model_kwargs": {}}
    # another registered model is refused by name
    _fit_checkpoint(tmp_path, PreActResNet18(width=2))
    from advtrain.models import ResNet18
    with pytest.raises(CheckpointError, match=r"different model: preactresnet18 \(PreActResNet18\), not this resnet18"):
        Trainer(ResNet18(width=2), epochs=2, progress=False, run_dir=tmp_path).fit(
            (torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10), resume=True)


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("text, milestones, gamma", [("multistep:100,150", (100.0, 150.0), 0.1),
                                                     ("multistep:2.5:0.5", (2.5,), 0.5)])
def test_multistep_schedule_flag(text, milestones, gamma):
    from advtrain.training import MultiStep

    spec = cli.schedule_spec(cli.parse_schedule(text))
    assert isinstance(spec, MultiStep) and (spec.milestones, spec.gamma) == (milestones, gamma)
    args = cli.make_parser().parse_args(["train", "--model", "smallcnn", "--schedule", text, "--lr", "0.4",
                                         "--epochs", "200", "--device", "cpu", "--no-progress"])
    trainer = cli.build_trainer(args, num_classes=10)
    assert trainer.lr_schedule(milestones[0] - 0.01) == pytest.approx(0.4)
    assert trainer.lr_schedule(milestones[0]) == pytest.approx(0.4 * gamma)
    assert resolve_config(cli._subparser(cli.make_parser(), "train"), {"schedule": text}) == {"schedule": text}


@pytest.mark.parametrize("value, fragment", [("cosine", "multistep:EPOCHS[:GAMMA]"), ("multistep:", "multistep:"),
                                             ("multistep:150,100", "increasing"), ("multistep:10:0", "gamma"),
                                             ("multistep:ten", "could not convert")])
def test_bad_schedule_values_are_one_error_line(data_dir, capsys, value, fragment):
    rc, _, err = run_cli(capsys, "train", "--schedule", value, "--data", data_dir)
    assert rc == 2
    assert_one_error_line(err, "--schedule", fragment)


def test_onecycle_is_a_schedule_choice(data_dir, tmp_path, capsys):
    args = cli.make_parser().parse_args(["train", "--model", "smallcnn", "--schedule", "onecycle", "--lr", "0.1",
                                         "--epochs", "10", "--device", "cpu"])
    trainer = cli.build_trainer(args, num_classes=10)
    assert trainer.lr_schedule(0) == pytest.approx(0.1 / 25) and trainer.lr_schedule(3) == pytest.approx(0.1)

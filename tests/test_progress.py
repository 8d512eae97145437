"""What a training run prints: the startup line, the live bar from step 1, the
evaluation lines and the per-epoch summary with the run's elapsed time and ETA."""
import io
import re
import time

import pytest
import torch

from advtrain import Trainer
from advtrain.cli import main as cli_main
from advtrain.models import SmallCNN
from advtrain.policies.attack_policy import CleanPolicy
from advtrain.training.callbacks import Callback
from advtrain.utils.progress import LOG_LINES, progress_bar
from _tiny_cifar import write_tiny_cifar10


def tiny_data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g))


def tiny_trainer(**kw) -> Trainer:
    torch.manual_seed(0)
    settings = dict(epochs=2, batch_size=8, eval_every=0, eval_attack=None, seed=0, device="cpu")
    settings.update(kw)
    return Trainer(SmallCNN(num_classes=3, width=4), **settings)


def test_the_startup_line_says_what_runs_and_where_a_resume_starts(tmp_path, capsys):
    model_params = sum(p.numel() for p in SmallCNN(num_classes=3, width=4).parameters())
    tiny_trainer(run_dir=tmp_path, progress=False).fit(tiny_data())
    first = capsys.readouterr().out.splitlines()[0]
    for fragment in (f"training smallcnn ({model_params:,} parameters)", "with Trainer (CleanPolicy)",
                     "2 epochs x 4 steps", "batch 8", "fp32", "device cpu",
                     f"{torch.get_num_threads()} torch threads", f"run dir {tmp_path}", "starting at epoch 1"):
        assert fragment in first, (fragment, first)
    with pytest.warns(UserWarning, match="'epochs': \\(2, 3\\)"):
        tiny_trainer(run_dir=tmp_path, epochs=3, progress=False).fit(tiny_data(), resume=True)
    first = capsys.readouterr().out.splitlines()[0]
    assert "3 epochs x 4 steps" in first and first.endswith("resuming at epoch 3")


def test_the_bar_shows_the_first_step_and_stays_short_off_a_terminal(capsys):
    tiny_trainer(epochs=1, batch_size=2, policy=CleanPolicy()).fit(tiny_data(80))  # 40 steps
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 1/1 [") and " 0/40 " in lines[0]
    assert " 1/40 " in lines[1] and "loss=" in lines[1]
    assert len(lines) <= LOG_LINES + 1 and "40/40" in lines[-1]


def test_a_log_bar_draws_its_first_update_even_below_its_line_interval():
    log = io.StringIO()
    bar = progress_bar(1000, "epoch 1/1", file=log)
    bar.update(1)
    assert [line.split("] ")[1].split()[0] for line in log.getvalue().splitlines()] == ["0/1000", "1/1000"]
    bar.update(1)  # the next lines come at the interval again
    assert len(log.getvalue().splitlines()) == 2
    bar.close()


def test_without_progress_the_lines_stay_and_the_bar_goes(capsys):
    tiny_trainer(progress=False).fit(tiny_data())
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].startswith("training smallcnn")
    assert [line.split("  ")[0] for line in lines[1:]] == ["epoch 1", "epoch 2"]


def test_verbose_false_prints_nothing(capsys):
    tiny_trainer(verbose=False).fit(tiny_data(), tiny_data(8, seed=1))
    assert capsys.readouterr() == ("", "")


class _Clock:
    """A stand-in for ``time.perf_counter`` that moves only when an epoch ends."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _MinutePerEpoch(Callback):
    name = "minute"

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_epoch_end(self, trainer, epoch, record) -> None:
        self.clock.now += 60.0


def _elapsed_and_eta(out: str):
    return re.findall(r"^epoch \d+ .*elapsed=(\S+)  eta=(\S+)$", out, flags=re.MULTILINE)


def test_the_summary_has_the_runs_elapsed_time_and_eta_from_the_mean_epoch(tmp_path, capsys, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    tiny_trainer(epochs=3, progress=False, run_dir=tmp_path, callbacks=[_MinutePerEpoch(clock)]).fit(tiny_data())
    assert _elapsed_and_eta(capsys.readouterr().out) == [
        ("0:01:00", "0:02:00"), ("0:02:00", "0:01:00"), ("0:03:00", "0:00:00")]
    # A resumed run's mean counts its own epochs only.
    with pytest.warns(UserWarning, match="'epochs': \\(3, 5\\)"):
        tiny_trainer(epochs=5, progress=False, run_dir=tmp_path, callbacks=[_MinutePerEpoch(clock)]).fit(
            tiny_data(), resume=True)
    assert _elapsed_and_eta(capsys.readouterr().out) == [("0:01:00", "0:01:00"), ("0:02:00", "0:00:00")]


@pytest.mark.parametrize("averaged", [False, True])
def test_a_line_announces_each_evaluation_before_it_runs(capsys, averaged):
    from advtrain.attacks import PGD

    trainer = tiny_trainer(epochs=1, progress=False, eval_every=1, eval_examples=6, eval_attack=PGD(8 / 255, steps=2),
                           val_examples=4, val_attack=None, weight_average=0.9 if averaged else None)
    trainer.fit(tiny_data(), tiny_data(8, seed=1))
    lines = capsys.readouterr().out.splitlines()
    models = "; raw and averaged models" if averaged else ""
    assert lines[1:3] == [f"evaluating 6 images (clean, PGD-2{models}) ...",
                          f"validating on 4 held-out images (clean{models}) ..."]
    assert lines[3].startswith("epoch 1  ")


def test_cli_no_progress_keeps_the_startup_and_epoch_lines(tmp_path, capsys):
    data = write_tiny_cifar10(tmp_path / "cifar", n_train=32, n_test=16)
    argv = ["train", "--method", "fgsm-rs", "--model", "smallcnn", "--data", str(data), "--epochs", "2",
            "--batch-size", "16", "--eval-examples", "8", "--device", "cpu", "--no-progress"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "epoch 1/2 [" not in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("training smallcnn (") and "2 epochs x 2 steps, batch 16" in lines[0]
    assert sum(line.startswith("epoch ") and "eta=" in line for line in lines) == 2
    assert sum(line.startswith("evaluating 8 images (clean, PGD-20)") for line in lines) == 2

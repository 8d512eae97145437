"""Mid-epoch checkpoints (``checkpoint_every_steps``): a run killed after one
and resumed equals an uninterrupted run bit for bit on the CPU; and the
messages that say what checkpoint is on disk (Trainer and CLI)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from _helpers import kill_before_step
from advtrain import PGD, AttackPolicy, Trainer, cli
from advtrain.attacks import FGSMRS
from advtrain.models import SmallCNN
from advtrain.policies import APARTPolicy, ATTAPolicy
from advtrain.training import CheckpointInfo, load_checkpoint

from _tiny_cifar import write_tiny_cifar10

# These tests run APART for a few steps on purpose, with the reference
# step-size schedule: its short-run warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:APART's step-size learning rate .* is tuned for")

EPS = 8 / 255
STEPS_PER_EPOCH = 4  # 64 examples in batches of 16


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (64,), generator=g)
    x = torch.randint(0, 120, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[torch.arange(64), y] += 120
    return x, y


POLICIES = {
    "fgsm-rs": lambda: AttackPolicy(FGSMRS(EPS, bn_mode="train")),
    "atta": lambda: ATTAPolicy(EPS, reset_every=0),
    "apart": lambda: APARTPolicy(EPS, lr=1e-3),  # large enough for the step sizes to move in 8 steps
}


def make_trainer(policy: str, run_dir, **kw) -> Trainer:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, width=4)
    defaults = dict(epochs=2, batch_size=16, lr=0.05, eval_every=1, eval_examples=16,
                    eval_attack=PGD(EPS, steps=1), progress=False, seed=0, device="cpu", run_dir=run_dir,
                    checkpoint_every_steps=3)
    defaults.update(kw)
    return Trainer(model, POLICIES[policy](), **defaults)


def without_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("time")} for r in records]


def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("policy,kill", [("fgsm-rs", 3), ("fgsm-rs", 7), ("atta", 7), ("apart", 7)])
def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_one(tmp_path, policy, kill):
    x, y = data()
    reference = make_trainer(policy, tmp_path / "full")
    reference.fit((x, y), eval_data=(x, y))

    run = tmp_path / "killed"
    killed = make_trainer(policy, run)
    kill_before_step(killed, kill)
    with pytest.raises(KeyboardInterrupt):
        killed.fit((x, y), eval_data=(x, y))
    saved = (kill // 3) * 3  # checkpoints every 3 steps; steps 4 and 8 end epochs
    assert killed.last_checkpoint == CheckpointInfo(run / "checkpoint.pt", saved // STEPS_PER_EPOCH, saved,
                                                    saved % STEPS_PER_EPOCH)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["global_step"] == saved and state["epoch_progress"]["batch"] == saved % STEPS_PER_EPOCH
    assert state["loader"]["position"] == saved % STEPS_PER_EPOCH

    resumed = make_trainer(policy, run)
    resumed.fit((x, y), eval_data=(x, y), resume=True)
    assert resumed.global_step == reference.global_step == 2 * STEPS_PER_EPOCH
    assert_same_tensors(resumed.model.state_dict(), reference.model.state_dict(), "model")
    assert_same_tensors(resumed.optimizer.state_dict(), reference.optimizer.state_dict(), "optimizer")
    assert_same_tensors(resumed.policy.state_dict(), reference.policy.state_dict(), "policy")
    assert without_times(resumed.history.records) == without_times(reference.history.records)
    assert resumed.history.records[-1]["time"] > 0


def test_mid_epoch_checkpoints_follow_the_optimizer_steps_and_skip_epoch_ends(tmp_path):
    x, y = data()
    trainer = make_trainer("fgsm-rs", tmp_path, epochs=1, eval_every=0, checkpoint_every_steps=2)
    written = []
    original = trainer.save_checkpoint

    def save_checkpoint(*args, **kw):
        path = original(*args, **kw)
        written.append((trainer.global_step, trainer.last_checkpoint.batch))
        return path

    trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    trainer.fit((x, y))
    # step 2 mid-epoch; step 4 is the epoch's last, written once by the epoch-end checkpoint
    assert written == [(2, 2), (4, None)]


def test_checkpoint_every_steps_is_checked():
    with pytest.raises(ValueError, match="checkpoint_every_steps"):
        make_trainer("fgsm-rs", None, checkpoint_every_steps=0)


def test_checkpoint_note_says_what_is_on_disk(tmp_path):
    assert "no run_dir" in make_trainer("fgsm-rs", None).checkpoint_note()
    fresh = make_trainer("fgsm-rs", tmp_path, checkpoint_every_steps=None)
    assert fresh.last_checkpoint is None
    assert fresh.checkpoint_note() == "no checkpoint yet: the first is written at the end of epoch 1"
    assert make_trainer("fgsm-rs", tmp_path, checkpoint_every=5).checkpoint_note().endswith(
        "at the end of epoch 2 (or at step 3, whichever comes first)")

    x, y = data()
    trainer = make_trainer("fgsm-rs", tmp_path)
    kill_before_step(trainer, 7)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit((x, y))
    assert trainer.checkpoint_note() == f"checkpoint of step 6 (batch 2 of epoch 2) kept in {tmp_path / 'checkpoint.pt'}"
    resumed = make_trainer("fgsm-rs", tmp_path)
    resumed.setup((x, y), resume=True)
    assert resumed.last_checkpoint == CheckpointInfo(tmp_path / "checkpoint.pt", 1, 6, 2)


def test_a_non_finite_loss_in_epoch_1_says_there_is_no_checkpoint_yet(tmp_path):
    trainer = make_trainer("fgsm-rs", tmp_path, checkpoint_every_steps=None)
    trainer.train_step = lambda batch: (torch.tensor(math.nan), torch.tensor(0))  # type: ignore[method-assign]
    x, y = data()
    with pytest.raises(FloatingPointError, match="no checkpoint yet: the first is written at the end of epoch 1"):
        trainer.fit((x, y))


# ------------------------------------------------------------------------ CLI
TINY = ["--method", "fgsm-rs", "--model", "smallcnn", "--batch-size", "64", "--eval-examples", "16",
        "--no-progress", "--device", "cpu", "--epochs", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=128, n_test=32)


def interrupt_at_step(monkeypatch, step: int) -> None:
    original = Trainer.train_step

    def train_step(self, batch):
        if self.global_step == step:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_cli_interrupt_in_epoch_1_says_no_checkpoint_yet(data_dir, tmp_path, capsys, monkeypatch):
    interrupt_at_step(monkeypatch, 1)
    rc = cli.main(["train", *TINY, "--data", str(data_dir), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == "advtrain: interrupted; no checkpoint yet: the first is written at the end of epoch 1"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_interrupt_after_epoch_1_names_its_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    interrupt_at_step(monkeypatch, 3)  # two steps per epoch
    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--data", str(data_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == f"advtrain: interrupted; checkpoint of epoch 1 (step 2) kept in {out / 'checkpoint.pt'}"


def test_cli_checkpoint_every_steps_writes_mid_epoch_and_resumes(data_dir, tmp_path, capsys, monkeypatch):
    interrupt_at_step(monkeypatch, 3)
    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--data", str(data_dir), "--out", str(out), "--checkpoint-every-steps", "3"])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == (f"advtrain: interrupted; checkpoint of step 3 (batch 1 of epoch 2) kept in "
                           f"{out / 'checkpoint.pt'}")
    monkeypatch.undo()
    rc = cli.main(["train", "--out", str(out), "--resume"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 4


@pytest.mark.slow
def test_two_processes_resume_a_mid_epoch_checkpoint_exactly(tmp_path):
    from test_distributed import launch

    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(here.parent))
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(here / "_midepoch_worker.py"), str(tmp_path)], env)
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert out["note"].startswith("checkpoint of step 3 (batch 3 of epoch 1)")
        assert without_times(out["records"][0]) == without_times(out["records"][1])
        assert_same_tensors(out["models"][0], out["models"][1], f"rank {r} model")
        assert torch.equal(out["stores"][0], out["stores"][1])

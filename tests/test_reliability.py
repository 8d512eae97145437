"""Checkpoints a user can trust: a checkpoint of another method is refused
(unless only its weights are asked for), no checkpoint holds inf or NaN and a
diverged run stops within a bounded number of steps, the run directory is
locked against a second training, interrupted writes leave nothing behind,
damaged files are detected by their checksum, and a failed write (full disk)
is a clear error that keeps the previous checkpoint."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from _tiny_cifar import write_tiny_cifar10
from advtrain import cli
from advtrain.attacks import FGSM
from advtrain.models import SmallCNN, build_model
from advtrain.policies import APARTPolicy, ATTAPolicy, AttackPolicy, PolicyContext
from advtrain.training import (AtomicWriteError, Callback, CheckpointError, History, NonFiniteCheckpointError,
                               RunLockError, Trainer, load_checkpoint, save_checkpoint)
from advtrain.training import run_lock, trainer as trainer_module
from advtrain.training.atomic import TEMP_NAME
from advtrain.training.checkpoint import FORMAT
from advtrain.training.run_lock import LOCK_NAME, RunLock, lock_run_dir

# These tests run APART for a few steps on purpose, with the reference
# step-size schedule: its short-run warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:APART's step-size learning rate .* is tuned for")

RUN_LOCK_FILE = Path(run_lock.__file__)


def tiny_data(n: int = 16, seed: int = 0):
    """8×8 uint8 images whose class (of 3) is the brighter colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def make_policy(kind: str):
    return {"apart": lambda: APARTPolicy(8 / 255), "atta": lambda: ATTAPolicy(8 / 255),
            "fgsm": lambda: AttackPolicy(FGSM(8 / 255)), "clean": lambda: None}[kind]()


def tiny_trainer(run_dir, policy=None, *, seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    settings = dict(epochs=1, batch_size=8, lr=0.05, eval_every=0, progress=False, seed=0, run_dir=run_dir)
    settings.update(kw)
    return Trainer(SmallCNN(num_classes=3, width=4), policy, **settings)


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def temp_files(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------ 1. checkpoints of another method
@pytest.mark.parametrize("saved, resumed", [("apart", "atta"), ("atta", "apart"), ("atta", "fgsm"),
                                            ("fgsm", "apart"), ("clean", "fgsm")])
def test_resuming_with_another_method_is_refused_naming_both_and_the_way_out(tmp_path, saved, resumed):
    tiny_trainer(tmp_path, make_policy(saved)).fit(tiny_data())
    other = tiny_trainer(tmp_path, make_policy(resumed), epochs=2)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as info:
        other.fit(tiny_data(), resume=True)
    message = str(info.value)
    assert checkpoint["policy_type"] in message and type(other.policy).__name__ in message
    assert "init_weights" in message and "--init-weights" in message
    if (saved, resumed) == ("apart", "atta"):  # APART's ω store was not loaded as ATTA's δ store
        assert not torch.equal(other.policy.store.data, checkpoint["policy"]["store"]["data"])


@pytest.mark.filterwarnings("ignore:resuming .* with settings that differ")
def test_a_checkpoint_missing_keys_is_refused_by_name(tmp_path):
    tiny_trainer(tmp_path, make_policy("atta")).fit(tiny_data())
    state = {k: v for k, v in load_checkpoint(tmp_path / "checkpoint.pt").items()
             if k not in ("format", "version", "sha256", "global_step")}
    save_checkpoint(tmp_path / "partial.pt", state)
    with pytest.raises(CheckpointError, match=r"lacks \['global_step'\].*init_weights"):
        tiny_trainer(tmp_path, make_policy("atta"), epochs=2).fit(tiny_data(), resume=tmp_path / "partial.pt")


def test_each_policy_validates_the_keys_of_its_state():
    context = PolicyContext(num_examples=4, image_shape=(3, 8, 8), padding=4, epochs=1, steps_per_epoch=1,
                            device=torch.device("cpu"))
    model = SmallCNN(num_classes=3, width=4)
    apart, atta = APARTPolicy(8 / 255), ATTAPolicy(8 / 255)
    apart.setup(model, context)
    atta.setup(model, context)
    with pytest.raises(ValueError, match=r"ATTAPolicy \(missing keys \['store'\]\)"):
        atta.load_state_dict({})
    with pytest.raises(ValueError, match=r"ATTAPolicy.*unexpected keys \['alpha'"):
        atta.load_state_dict(apart.state_dict())
    with pytest.raises(ValueError, match=r"APARTPolicy \(missing keys \['alpha'.*'step'\]\)"):
        apart.load_state_dict(atta.state_dict())
    with pytest.raises(ValueError, match=r"AttackPolicy \(unexpected keys \['store'\]\)"):
        AttackPolicy(FGSM(8 / 255)).load_state_dict(atta.state_dict())
    atta.load_state_dict(atta.state_dict())  # its own state loads


def test_init_weights_starts_a_fresh_run_from_another_methods_model_weights_only(tmp_path):
    source = tiny_trainer(tmp_path / "apart", make_policy("apart"))
    source.fit(tiny_data())
    saved = load_checkpoint(tmp_path / "apart" / "checkpoint.pt")

    class Capture(Callback):
        def on_fit_start(self, trainer):
            self.weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            self.store = trainer.policy.store.data.clone()
            self.epoch = trainer.epoch

    capture = Capture()
    fresh = tiny_trainer(tmp_path / "atta", make_policy("atta"), seed=123, epochs=2, callbacks=[capture])
    history = fresh.fit(tiny_data(), init_weights=tmp_path / "apart" / "checkpoint.pt")
    assert all(torch.equal(capture.weights[k], v) for k, v in saved["model"].items())
    assert not torch.equal(capture.store, saved["policy"]["store"]["data"])  # ATTA's own fresh store
    assert capture.epoch == 0 and len(history) == 2
    with pytest.raises(ValueError, match="resume and init_weights exclude each other"):
        fresh.fit(tiny_data(), resume=True, init_weights=tmp_path / "apart" / "checkpoint.pt")


def test_init_weights_of_another_model_is_refused(tmp_path):
    tiny_trainer(tmp_path / "a").fit(tiny_data())
    torch.manual_seed(0)
    wider = Trainer(SmallCNN(num_classes=3, width=8), epochs=1, batch_size=8, eval_every=0, progress=False)
    with pytest.raises(CheckpointError, match="cannot take the initial weights from .*different model"):
        wider.fit(tiny_data(), init_weights=tmp_path / "a" / "checkpoint.pt")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), n_train=32, n_test=16)


CLI_TINY = ["--model", "smallcnn", "--batch-size", "16", "--eval-examples", "16", "--epochs", "1",
            "--no-progress", "--device", "cpu"]


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()][-1]


def test_cli_refuses_another_method_on_resume_and_starts_from_its_weights_with_init_weights(cifar_dir, tmp_path,
                                                                                           capsys):
    fgsm = tmp_path / "fgsm"
    torch.manual_seed(0)
    Trainer(build_model("smallcnn", num_classes=10), AttackPolicy(FGSM(8 / 255)), run_dir=fgsm, progress=False,
            device="cpu").save_checkpoint()
    common = ["train", "--data", str(cifar_dir), "--method", "atta", *CLI_TINY]
    assert cli.main([*common, "--out", str(fgsm), "--resume"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("advtrain: error:") and "AttackPolicy" in line and "ATTAPolicy" in line
    assert "--init-weights" in line

    assert cli.main([*common, "--out", str(tmp_path / "atta"), "--init-weights", str(fgsm)]) == 0
    capsys.readouterr()
    state = load_checkpoint(tmp_path / "atta" / "checkpoint.pt")
    assert state["policy_type"] == "ATTAPolicy" and state["epoch"] == 1
    assert json.loads((tmp_path / "atta" / "config.json").read_text())["init_weights"] == str(fgsm)
    # the recorded --init-weights does not stop a resume; a new one does
    assert cli.main(["train", "--out", str(tmp_path / "atta"), "--resume", "--epochs", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "atta"), "--resume", "--init-weights", str(tmp_path)]) == 2
    assert "cannot be combined with --resume" in last_error_line(capsys)


# ----------------------------------------------------------- 2. never non-finite
class At(Callback):
    """Runs ``action(trainer)`` at the start or end of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int, action, when: str = "end") -> None:
        self.epoch, self.action, self.when = epoch, action, when

    def on_epoch_start(self, trainer, epoch):
        if self.when == "start" and epoch == self.epoch:
            self.action(trainer)

    def on_epoch_end(self, trainer, epoch, record):
        if self.when == "end" and epoch == self.epoch:
            self.action(trainer)


def test_a_blow_up_on_the_last_step_is_never_saved_and_the_error_names_the_kept_epoch(tmp_path):
    def blow_up(trainer):  # what a last step that diverges leaves behind: an inf BatchNorm variance
        trainer.model.stage2[1].running_var[0] = float("inf")

    trainer = tiny_trainer(tmp_path, make_policy("fgsm"), epochs=2, keep_checkpoints=True,
                           callbacks=[At(1, blow_up)])
    with pytest.raises(FloatingPointError, match=r"stage2\.1\.running_var.*checkpoint of epoch 1 \(step \d+\) kept in .*checkpoint\.pt"):
        trainer.fit(tiny_data())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and all_finite(state)
    assert not (tmp_path / "checkpoint_epoch002.pt").exists() and temp_files(tmp_path) == []


def test_finite_but_huge_weights_with_non_finite_logits_are_caught_by_the_loss(tmp_path):
    def huge(trainer):
        with torch.no_grad():
            trainer.model.linear.weight.fill_(1e37)  # finite, but the logits overflow

    trainer = tiny_trainer(tmp_path, epochs=2, callbacks=[At(1, huge, when="start")])
    with pytest.raises(FloatingPointError, match=r"non-finite in epoch 2 .*checkpoint of epoch 1 \(step \d+\) kept in"):
        trainer.fit(tiny_data())
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_divergence_is_noticed_within_the_check_interval_without_progress(tmp_path, monkeypatch):
    every = trainer_module.FINITE_CHECK_STEPS
    steps = []
    original = Trainer.train_step

    def counted(self, batch):
        steps.append(1)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", counted)
    trainer = tiny_trainer(tmp_path, batch_size=2, lr=1e20, schedule="constant", momentum=0.0, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match=rf"by step {every};.*no checkpoint yet: the first is written at the end of epoch 1"):
        trainer.fit(tiny_data(3 * every * 2))  # 3 × the interval of steps per epoch
    assert len(steps) == every
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_huge_learning_rate_never_leaves_a_checkpoint_with_inf_batchnorm_statistics(tmp_path):
    trainer = tiny_trainer(tmp_path, batch_size=2, lr=1e6, schedule="constant", momentum=0.0, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match=r"running_var.*no checkpoint yet: the first is written at the end of epoch 1"):
        trainer.fit(tiny_data())
    assert not (tmp_path / "checkpoint.pt").exists() and temp_files(tmp_path) == []


def test_save_checkpoint_refuses_non_finite_tensors_and_names_them(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()
    state = {"model": {"w": torch.tensor([1.0, float("nan")])},
             "optimizer": {"state": {3: {"momentum_buffer": torch.tensor([float("-inf")]), "step": 2}}}}
    with pytest.raises(NonFiniteCheckpointError) as info:
        save_checkpoint(path, state)
    assert info.value.entries == ["model.w", "optimizer.state.3.momentum_buffer"]
    assert path.read_bytes() == before and temp_files(tmp_path) == []
    # Large finite values are saved: fp16 near its maximum, and float32 whose
    # L1 norm overflows float32.
    save_checkpoint(path, {"a": torch.full((4000,), 60000.0, dtype=torch.float16), "b": torch.full((8,), 1e38)})


# ------------------------------------------------------------- 3. run directory lock
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lock = module.RunLock(sys.argv[2])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


@contextlib.contextmanager
def lock_held_by_another_process(run_dir: Path):
    """A subprocess holding the lock of ``run_dir`` until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(RUN_LOCK_FILE), str(run_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=10)


def test_a_second_training_into_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    with lock_held_by_another_process(tmp_path) as holder:
        with pytest.raises(RunLockError, match=rf"in use by another training \(PID {holder.pid} on host "
                                               rf"{socket.gethostname()}"):
            tiny_trainer(tmp_path).fit(tiny_data())
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint.pt").exists()
    tiny_trainer(tmp_path).fit(tiny_data())  # released: trains
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_cli_refuses_a_locked_out_directory_in_one_line(cifar_dir, tmp_path, capsys):
    with lock_held_by_another_process(tmp_path) as holder:
        assert cli.main(["train", "--data", str(cifar_dir), "--method", "fgsm", *CLI_TINY, "--out", str(tmp_path)]) == 2
    line = last_error_line(capsys)
    assert line.startswith("advtrain: error: run directory") and f"PID {holder.pid}" in line


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    with lock_held_by_another_process(tmp_path) as holder:
        holder.kill()
        holder.wait(timeout=10)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    with pytest.warns(UserWarning, match=rf"took over the lock left by PID {holder.pid}"):
        tiny_trainer(tmp_path).fit(tiny_data())
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_fcntl_a_live_holder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    with lock_held_by_another_process(tmp_path) as holder:
        with pytest.raises(RunLockError, match=f"PID {holder.pid}"):
            RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning, match=f"PID {dead.pid}"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunLockError, match=rf"host elsewhere.*delete .*{LOCK_NAME}\)$"):
        RunLock(tmp_path).acquire()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with lock_run_dir(tmp_path), lock_run_dir(tmp_path / "." ):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


# -------------------------------------------------- 4. leftovers and atomic files
@pytest.mark.filterwarnings("ignore:resuming .* with settings that differ")
def test_stale_temp_files_are_removed_when_a_run_resumes_and_other_files_kept(tmp_path):
    tiny_trainer(tmp_path).fit(tiny_data())
    stale = [".checkpoint.pt.k3j_9x2a.tmp", ".metrics.jsonl.abcdefgh.tmp", ".config.json.q1w2e3r4.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 4096)
    kept = ["notes.tmp", ".hidden", "checkpoint.pt.tmp.bak"]
    for name in kept:
        (tmp_path / name).write_text("mine")
    tiny_trainer(tmp_path, epochs=2).fit(tiny_data(), resume=True)
    assert temp_files(tmp_path) == ["notes.tmp"]
    assert all((tmp_path / name).read_text() == "mine" for name in kept)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes beyond ``limit`` bytes of any file fail with EFBIG (a real
    kernel write failure, as on a full disk)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_config_json_is_written_atomically(cifar_dir, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"old": true}\n')
    record = cli._RecordConfig(path, {"key": "x" * 5000})
    with file_size_limit(1000), pytest.raises(AtomicWriteError, match="could not write run configuration"):
        record.on_fit_start(None)
    assert path.read_text() == '{"old": true}\n' and temp_files(tmp_path) == []
    record.on_fit_start(None)
    assert json.loads(path.read_text()) == {"key": "x" * 5000}


def test_metrics_rewrites_use_unique_temporary_names(tmp_path, monkeypatch):
    sources = []
    real_replace = os.replace

    def recording_replace(src, dst):
        sources.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    history = History([{"epoch": 1}], path=tmp_path / "metrics.jsonl")
    history.rewrite()
    history.rewrite()
    assert len(set(sources)) == 2 and all(TEMP_NAME.match(name) for name in sources)
    assert History.read(tmp_path / "metrics.jsonl").records == [{"epoch": 1}]


# ---------------------------------------------------------------- 5. checksum
def largest_record_offset(path: Path) -> tuple:
    """(offset, size) of the data of the largest record in a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_zeroed_bytes_inside_the_store_are_detected_by_the_checksum(tmp_path):
    tiny_trainer(tmp_path, make_policy("apart")).fit(tiny_data())
    path = tmp_path / "checkpoint.pt"
    store = load_checkpoint(path)["policy"]["store"]["data"]
    offset, size = largest_record_offset(path)
    assert size == store.numel() * store.element_size()  # the largest record is the ω store
    data = bytearray(path.read_bytes())
    at = offset + size // 2
    assert any(data[at:at + 64])
    data[at:at + 64] = bytes(64)
    path.write_bytes(bytes(data))

    damaged = torch.load(path, weights_only=True)  # torch alone loads it without complaint
    assert int((damaged["policy"]["store"]["data"] != store).sum()) == 16
    with pytest.raises(CheckpointError, match="is damaged: its contents do not match the checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="damaged"):
        tiny_trainer(tmp_path, make_policy("apart"), epochs=2).fit(tiny_data(), resume=True)


def test_the_checksum_covers_plain_values_too(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"epoch": 3, "w": torch.ones(2)})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    payload["epoch"] = 4
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.filterwarnings("ignore:resuming .* with settings that differ")
def test_version_1_checkpoints_load_unverified_and_foreign_ones_are_still_refused(tmp_path):
    trainer = tiny_trainer(tmp_path / "v2", make_policy("apart"))
    trainer.fit(tiny_data())
    state = trainer.state_dict()
    del state["policy_type"]  # version 1 did not record it
    v1 = tmp_path / "v1" / "checkpoint.pt"
    v1.parent.mkdir()
    torch.save({"format": FORMAT, "version": 1, **state}, v1)
    resumed = tiny_trainer(tmp_path / "v1", make_policy("apart"), epochs=2)
    assert len(resumed.fit(tiny_data(), resume=True)) == 2
    assert load_checkpoint(v1)["version"] == 2  # rewritten in the current format

    torch.save({"format": FORMAT, "version": 1, **state}, v1)
    with pytest.raises(CheckpointError, match=r"does not fit this run's ATTAPolicy"):
        tiny_trainer(tmp_path / "v1", make_policy("atta"), epochs=2).fit(tiny_data(), resume=True)
    torch.save({"format": FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99; this advtrain reads versions 1, 2"):
        load_checkpoint(tmp_path / "future.pt")


# ---------------------------------------------------------- 6. failed writes
def test_a_full_disk_during_torch_save_is_a_clear_error_that_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, make_policy("fgsm"))
    trainer.fit(tiny_data())
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()

    def full_disk_save(obj, f, *args, **kwargs):  # what torch.save does when the disk fills up
        f.write(b"\0" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(AtomicWriteError) as info:
        trainer.save_checkpoint()
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert f"could not write checkpoint {path}: the disk holding {tmp_path} is full" in message
    assert f"the previous checkpoint {path} is intact" in message
    assert path.read_bytes() == before and temp_files(tmp_path) == []


def test_an_interrupt_during_a_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == before and temp_files(tmp_path) == []


def test_a_real_write_failure_removes_the_temporary_file(tmp_path):
    path = tmp_path / "c.pt"
    big = {"w": torch.zeros(100_000)}
    with file_size_limit(50_000), pytest.raises(AtomicWriteError, match=r"the write failed \(File too large\); "
                                                                        "there was no previous checkpoint"):
        save_checkpoint(path, big)
    assert list(tmp_path.iterdir()) == []

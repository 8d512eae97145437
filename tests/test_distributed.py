"""Data-parallel training on torch.distributed: 2 CPU processes (gloo)
launched by torchrun end with identical weights, and match one process that
trains on the same global batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from advtrain.data import DeviceLoader
from advtrain.models import SmallCNN
from advtrain.policies import PerExampleStore
from advtrain.training import ATTATrainer

HERE = Path(__file__).parent


def dataset():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (66,), generator=g)  # 66: shards of 33, padded by wrap-around
    x = torch.randint(0, 150, (66, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(66), y] += 100
    return x, y


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=3, width=4)


def settings():
    return dict(epochs=2, lr=0.05, eval_every=0, progress=False, seed=0, device="cpu")


def launch(cmd, env):
    """Run a torchrun command; once more if the first launch dies. A gloo
    process occasionally aborts ("terminate called without an active
    exception") on this 2-core VM; the retry keeps CI meaningful while the
    first failure's output stays visible in the test log."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print("first torchrun launch failed, retrying:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sharded_loader_yields_the_global_batches_of_a_stratified_loader():
    x, y = dataset()
    whole = DeviceLoader((x, y), 16, num_shards=2, seed=5, device="cpu")
    parts = [DeviceLoader((x, y), 8, num_shards=2, shard=r, seed=5, device="cpu") for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 5
    for epoch in range(2):
        whole.set_epoch(epoch)
        for p in parts:
            p.set_epoch(epoch)
        for b, b0, b1 in zip(whole, *parts):
            assert torch.equal(b.index, torch.cat([b0.index, b1.index]))
            assert torch.equal(b.x, torch.cat([b0.x, b1.x]))
            assert bool((b0.index % 2 == 0).all()) and bool((b1.index % 2 == 1).all())
    seen = torch.cat([b.index for b in parts[1]])
    assert set(seen.tolist()) == set(range(1, 66, 2))


def test_sharded_store_keeps_only_its_examples():
    store = PerExampleStore(66, (3, 32, 32), 4, torch.device("cpu"), shard=1, num_shards=2)
    assert store.data.shape[0] == 33
    index = torch.tensor([1, 65, 7])
    values = torch.rand(3, 3, 32, 32)
    store.write(index, None, values)
    assert torch.equal(store.read(index, None), values)
    assert torch.equal(store.data[32, :, 4:36, 4:36], values[1])


@pytest.mark.slow
def test_two_processes_match_each_other_and_a_single_process_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "_distributed_worker.py"), str(tmp_path)]
    launch(cmd, env)

    ranks = [torch.load(tmp_path / f"atta{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    bn = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(2)]
    for part in ("model", "average"):
        for key, value in bn[0][part].items():
            assert torch.equal(value, bn[1][part][key]), f"{part} {key} differs between ranks"
    assert {p.name for p in (tmp_path / "atta").iterdir()} >= {"checkpoint.pt", "checkpoint.rank0.pt",
                                                               "checkpoint.rank1.pt", "metrics.jsonl"}

    # One process over the same global batches (16 = 2 ranks x 8).
    single = ATTATrainer(plain_model(), batch_size=16, init="zero", **settings())
    single.fit(DeviceLoader(dataset(), 16, num_shards=2, seed=0, device="cpu", pad_fill=single.pad_fill))
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Each rank's store holds its shard of the single process's store.
    for r in range(2):
        torch.testing.assert_close(ranks[r]["store"], single.policy.store.data[r::2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_runs_the_command_line_on_two_cpu_processes(tmp_path):
    sys.path.insert(0, str(HERE))
    from _tiny_cifar import write_tiny_cifar10

    data = write_tiny_cifar10(tmp_path / "data", n_train=128, n_test=32)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "advtrain",
           "train", "--method", "fgsm", "--model", "smallcnn", "--data", str(data), "--epochs", "2",
           "--batch-size", "16", "--eval-examples", "32", "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = launch(cmd, env)
    assert proc.stdout.count("done: fgsm smallcnn 2 epochs") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"checkpoint.pt", "checkpoint.rank0.pt", "checkpoint.rank1.pt", "config.json"} <= {
        p.name for p in out.iterdir()}

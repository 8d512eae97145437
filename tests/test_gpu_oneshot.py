"""``benchmarks/gpu_oneshot.sh``'s logic, run on the CPU with ``--dry-run``:
the benchmark table, then the study within what is left of the budget, all
in one output folder, from the source tree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny_cifar import write_tiny_cifar10

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_the_dry_run_writes_the_benchmark_and_the_study_into_one_folder(tmp_path):
    data = write_tiny_cifar10(tmp_path / "cifar", n_train=64, n_test=16)
    out = tmp_path / "out"
    env = {**os.environ, "ADVTRAIN_ONESHOT_BUDGET": "55", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_oneshot.sh"), "--dry-run", str(data), str(out)],
                          env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "torch" in (out / "environment.txt").read_text()
    bench = (out / "benchmarks.md").read_text()
    assert "| pgd |" in bench and "| apart |" in bench and "| baseline (plain PyTorch PGD-10) |" in bench
    results = json.loads((out / "study" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["pgd", "apart"]  # PGD-10 and APART first, as given
    assert results["rows"][0]["epochs"] >= 1 and (out / "study" / "results.md").is_file()
    assert "budget left" in done.stdout and "== done in" in done.stdout

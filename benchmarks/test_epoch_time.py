"""Wall time of one training epoch per method, and its ratio to PGD-10.

Every method trains the same model (same initialization), on the same data,
batches (loader seed 0) and batch size, through advtrain's real code path:
``Trainer.fit`` sets up the policy and loader (stopped before its first
epoch), the first ``warmup_steps`` batches run untimed through
``Trainer.train_step`` with the pass counter attached, and then each timed
round is one ``Trainer._train_epoch`` — the code ``fit`` runs per epoch, with
evaluation, checkpoints and the progress bar off. The plain-PyTorch reference
PGD-10 loop (``benchmarks/baseline.py``) runs the same batches.

Rounds are interleaved — round 1 of every method (PGD-10 first), then round 2
of every method, ... — each round a one-round pytest-benchmark of one epoch,
with each method's trainer kept between its rounds. A change in the machine's
load during the run then affects every method alike instead of whichever
method happened to be running; the report aggregates the rounds per method.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest

from .harness import (
    BASELINE,
    REFERENCE,
    MemoryReading,
    PeakMemory,
    Runner,
    make_runner,
    method_names,
)
from .report import TrainingResult


def _short(name: str) -> str:
    return "baseline" if name == BASELINE else name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "method" in metafunc.fixturenames and "round_index" in metafunc.fixturenames:
        from .conftest import _SIZE_KEY

        size = metafunc.config.stash[_SIZE_KEY]
        names = method_names(size) + [
            BASELINE
        ]  # PGD-10 first in every round: every ratio refers to it
        params = [(r, n) for r in range(size.rounds) for n in names]
        metafunc.parametrize(
            ("round_index", "method"), params, ids=[f"round{r + 1}-{_short(n)}" for r, n in params]
        )


@pytest.fixture(scope="module")
def runners() -> Dict[str, Tuple[Runner, MemoryReading]]:
    """Each method's runner (trainer, loader, counted passes) and its peak
    memory, kept across the interleaved rounds."""
    return {}


def test_epoch_time(benchmark, round_index, method, bench_size, bench_data, bench_results, runners):
    images, labels = bench_data
    if method not in runners:
        # Peak memory over building the method, the warm-up and its first timed epoch.
        meter = PeakMemory(bench_size.device).start()
        runner = make_runner(method, bench_size, images, labels)
        runner.warmup(bench_size.warmup_steps)
        benchmark.pedantic(runner.epoch, rounds=1, iterations=1, warmup_rounds=0)
        runners[method] = (runner, meter.stop())
    else:
        runner = runners[method][0]
        benchmark.pedantic(runner.epoch, rounds=1, iterations=1, warmup_rounds=0)
    memory = runners[method][1]
    passes = runner.passes
    benchmark.group = f"epoch ({bench_size.name}): {method}"
    benchmark.extra_info.update(passes)
    benchmark.extra_info["round"] = round_index + 1
    benchmark.extra_info["peak_memory_mib"] = memory.peak_mib
    bench_results.add_training(
        TrainingResult(
            method,
            list(runner.times),
            passes,
            memory.peak_mib,
            memory.kind,
            cpu_times=list(runner.cpu_times),
        )
    )

    # The counts the cost model assumes, checked against what ran.
    if method in (REFERENCE, BASELINE):
        assert passes["forward"] == 11
    assert passes["backward_full"] == (11 if method == BASELINE else 1)
    assert all(t > 0 for t in runner.times)

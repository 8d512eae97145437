"""pytest wiring of the benchmark suite: options, shared data, results and
the Markdown report.

    python -m pytest benchmarks/ --bench-size cpu --bench-report docs/benchmarks.md

Options (all optional):

``--bench-size cpu|gpu|smoke``
    cpu (default): PreActResNet18(width=16), batch 128, 4 batches per epoch,
    3 timed epochs per method, fp32 — a few minutes on 2 CPU cores.
    gpu: PreActResNet18 (width 64) on a full 50,000-image CIFAR-10 epoch,
    batch 128, bf16 autocast, channels_last (needs CUDA). smoke: a tiny model
    for checking the machinery in seconds.
``--bench-report PATH``
    write/refresh this size's section of the Markdown file PATH.
``--bench-json PATH``
    save the raw results (re-render with ``python benchmarks/report.py``).
``--bench-data DIR|synthetic``
    CIFAR-10 directory (official layout); default ``$ADVTRAIN_CIFAR10_DIR``,
    else synthetic data of CIFAR-10's shape.
``--bench-rounds N``, ``--bench-batches N`` (0: full 50,000-image epoch),
``--bench-pgd-steps K[,K...]`` (extra PGD-k besides PGD-10),
``--bench-compile`` (``torch.compile`` the model), ``--bench-channels-last
on|off``, ``--bench-threads N``, ``--bench-peak-tflops X`` (the device's
dense bf16 peak for the fraction-of-peak column; known GPUs default to their
data sheet's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import Tensor

from .harness import (
    SIZES,
    BenchSize,
    bf16_peak_tflops,
    machine_info,
    make_data,
    make_runner,
    make_size,
    pass_flops,
    size_summary,
)
from .report import BenchResults, render_section, write_report

_RESULTS_KEY = pytest.StashKey[BenchResults]()
_SIZE_KEY = pytest.StashKey[BenchSize]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("advtrain-bench", "advtrain benchmarks")
    group.addoption(
        "--bench-size",
        choices=sorted(SIZES),
        default="cpu",
        help="benchmark size: cpu (minutes on 2 cores), gpu (full CIFAR-10 epoch, bf16), smoke",
    )
    group.addoption(
        "--bench-report",
        default=None,
        metavar="PATH",
        help="write this size's results section into the Markdown file PATH",
    )
    group.addoption(
        "--bench-json", default=None, metavar="PATH", help="save the raw results as JSON"
    )
    group.addoption(
        "--bench-data",
        default=None,
        metavar="DIR",
        help="CIFAR-10 directory (default $ADVTRAIN_CIFAR10_DIR); "
        "'synthetic' forces synthetic data",
    )
    group.addoption("--bench-rounds", type=int, default=None, help="timed epochs per method")
    group.addoption(
        "--bench-batches",
        type=int,
        default=None,
        help="batches per epoch (0: a full 50,000-image epoch)",
    )
    group.addoption(
        "--bench-pgd-steps",
        default=None,
        metavar="K[,K...]",
        help="extra PGD-k methods to time besides PGD-10",
    )
    group.addoption(
        "--bench-compile", action="store_true", default=False, help="torch.compile the model"
    )
    group.addoption(
        "--bench-channels-last",
        choices=("on", "off"),
        default=None,
        help="override the size's memory format (channels_last in every preset size) "
        "for advtrain's trainers and attacks",
    )
    group.addoption("--bench-threads", type=int, default=None, help="torch intra-op threads")
    group.addoption(
        "--bench-peak-tflops",
        type=float,
        default=None,
        metavar="TFLOPS",
        help="the device's dense bf16 peak for the fraction-of-peak column "
        "(default: the data sheet's for H200/H100/A100, none on a CPU)",
    )


def _size_from_options(config: pytest.Config) -> BenchSize:
    batches = config.getoption("--bench-batches")
    pgd = config.getoption("--bench-pgd-steps")
    size = make_size(
        config.getoption("--bench-size"),
        rounds=config.getoption("--bench-rounds"),
        pgd_steps=(
            tuple(sorted({10} | {int(k) for k in pgd.split(",") if k.strip()})) if pgd else None
        ),
        compile=True if config.getoption("--bench-compile") else None,
        threads=config.getoption("--bench-threads"),
    )
    channels_last = config.getoption("--bench-channels-last")
    if channels_last is not None:
        size = dataclasses.replace(size, channels_last=channels_last == "on")
    if batches is not None:
        size = dataclasses.replace(
            size,
            batches=batches if batches > 0 else None,
            examples=50_000 if batches <= 0 else size.examples,
        )
    if size.rounds < 1:
        raise pytest.UsageError("--bench-rounds must be >= 1")
    return size


def pytest_configure(config: pytest.Config) -> None:
    size = _size_from_options(config)
    if size.device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--bench-size {size.name} needs a CUDA GPU; this machine has none "
            "(use --bench-size cpu)"
        )
    if size.threads:
        torch.set_num_threads(size.threads)
    config.stash[_SIZE_KEY] = size
    args = " ".join(shlex.quote(a) for a in config.invocation_params.args)
    preset = SIZES[size.name]
    variant = "-".join(
        v
        for v, on in (
            ("channels-last", size.channels_last and not preset.channels_last),
            ("contiguous", preset.channels_last and not size.channels_last),
            ("compile", size.compile and not preset.compile),
        )
        if on
    )
    peak = config.getoption("--bench-peak-tflops")
    if peak is not None and peak <= 0:
        raise pytest.UsageError("--bench-peak-tflops must be > 0")
    peak_source = "given with --bench-peak-tflops"
    if peak is None:
        peak, peak_source = bf16_peak_tflops(size)
    config.stash[_RESULTS_KEY] = BenchResults(
        size=size.name,
        variant=variant,
        command=f"python -m pytest {args}".strip(),
        machine=machine_info(size),
        config=size_summary(size),
        peak_tflops=peak,
        peak_source=peak_source,
    )


@pytest.fixture(scope="session")
def bench_size(pytestconfig: pytest.Config) -> BenchSize:
    """The benchmark configuration selected by ``--bench-size`` and friends."""
    return pytestconfig.stash[_SIZE_KEY]


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> BenchResults:
    """The session's results, written to the report at the end."""
    return pytestconfig.stash[_RESULTS_KEY]


@pytest.fixture(scope="session")
def bench_data(
    pytestconfig: pytest.Config, bench_size: BenchSize, bench_results: BenchResults
) -> Tuple[Tensor, Tensor]:
    """The same images and labels for every method (uint8, on the CPU)."""
    choice = (
        pytestconfig.getoption("--bench-data") or os.environ.get("ADVTRAIN_CIFAR10_DIR") or None
    )
    data_dir = None if choice in (None, "", "synthetic") else choice
    images, labels, desc = make_data(bench_size, data_dir)
    bench_results.data = desc
    # One untimed step before any measurement, so that process-wide one-off
    # costs (thread pools, kernel libraries, CUDA context and allocator) are
    # not charged to the first method's time or memory.
    make_runner("FGSM", bench_size, images, labels).warmup(1)
    bench_results.pass_flops = pass_flops(bench_size)
    return images, labels


def _results(session: pytest.Session) -> BenchResults:
    return session.config.stash[_RESULTS_KEY]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not hasattr(session.config, "stash") or _RESULTS_KEY not in session.config.stash:
        return
    results = _results(session)
    if not results.training and not results.attacks:
        return
    report = session.config.getoption("--bench-report")
    base = Path(session.config.invocation_params.dir)
    if report:
        write_report(base / report, results)
    out = session.config.getoption("--bench-json")
    if out:
        (base / out).write_text(json.dumps(results.to_json(), indent=2) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _RESULTS_KEY not in config.stash:
        return
    results = config.stash[_RESULTS_KEY]
    if not results.training and not results.attacks:
        return
    terminalreporter.section(f"advtrain benchmarks ({results.size})")
    terminalreporter.write(render_section(results))
    report = config.getoption("--bench-report")
    if report:
        terminalreporter.write_line(f"results written to {report}")


def pytest_report_header(config: pytest.Config) -> str:
    size = config.stash.get(_SIZE_KEY, None)
    if size is None:
        return ""
    return (
        f"advtrain benchmarks: size={size.name}, model={size.describe_model()}, "
        f"batch={size.batch_size}, "
        f"epoch={size.steps_per_epoch} batches, rounds={size.rounds}, device={size.device}, "
        f"precision={size.precision}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}"
    )

"""pytest wiring of the epoch-time benchmark (:mod:`benchmarks.epoch_time`)::

    python -m pytest benchmarks/ --bench-size cpu --bench-report docs/benchmarks.md

Options: ``--bench-size cpu|gpu|smoke``, ``--bench-report PATH`` (write the
size's section of that Markdown file), ``--bench-data DIR|synthetic``
(default ``$ADVTRAIN_CIFAR10_DIR``, else synthetic images), ``--bench-rounds
N``, ``--bench-examples N`` (images per epoch), ``--bench-methods a,b``
(default: every registered method; PGD-10 always runs), ``--bench-threads
N``, ``--bench-compile``.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import pytest
import torch

from .epoch_time import SIZES, Results, render, write_report

_RESULTS = pytest.StashKey[Results]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("advtrain-bench", "advtrain epoch-time benchmark")
    group.addoption("--bench-size", choices=sorted(SIZES), default="cpu",
                    help="cpu (minutes on 2 cores), gpu (full CIFAR-10 epoch, bf16, CUDA), smoke (seconds)")
    group.addoption("--bench-report", default=None, metavar="PATH", help="write the table into this Markdown file")
    group.addoption("--bench-data", default=None, metavar="DIR",
                    help="CIFAR-10 directory (default $ADVTRAIN_CIFAR10_DIR); 'synthetic' for random images")
    group.addoption("--bench-rounds", type=int, default=None, metavar="N", help="timed epochs per method")
    group.addoption("--bench-examples", type=int, default=None, metavar="N", help="images per epoch")
    group.addoption("--bench-methods", default=None, metavar="A,B", help="registered methods to time (PGD-10 always)")
    group.addoption("--bench-threads", type=int, default=None, metavar="N", help="torch intra-op threads")
    group.addoption("--bench-compile", action="store_true", help="Trainer(compile=True) for the methods that compile")


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> dict:
    """The run's keyword arguments of :func:`benchmarks.epoch_time.run`."""
    get = pytestconfig.getoption
    size = SIZES[get("--bench-size")]
    for option, field in (("--bench-rounds", "rounds"), ("--bench-examples", "examples")):
        if get(option) is not None:
            if get(option) < 1:
                raise pytest.UsageError(f"{option} must be >= 1")
            size = dataclasses.replace(size, **{field: get(option)})
    if size.device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-size {size.name} needs a CUDA GPU (use --bench-size cpu)")
    if get("--bench-threads"):
        torch.set_num_threads(get("--bench-threads"))
    data = get("--bench-data") or os.environ.get("ADVTRAIN_CIFAR10_DIR") or None
    methods = get("--bench-methods")
    return dict(size=size, data_dir=None if data == "synthetic" else data, compile=get("--bench-compile"),
                methods=[m.strip() for m in methods.split(",")] if methods else None,
                command=" ".join(["python -m pytest"] + [shlex.quote(a) for a in pytestconfig.invocation_params.args]))


@pytest.fixture(scope="session")
def record_results(pytestconfig: pytest.Config):
    """Hands a run's results to the report and the terminal summary."""
    def record(results: Results) -> None:
        pytestconfig.stash[_RESULTS] = results
        report = pytestconfig.getoption("--bench-report")
        if report:
            write_report(Path(pytestconfig.invocation_params.dir) / report, results)
    return record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _RESULTS in config.stash:
        terminalreporter.section(f"advtrain epoch-time benchmark ({config.stash[_RESULTS].size.name})")
        terminalreporter.write(render(config.stash[_RESULTS]))

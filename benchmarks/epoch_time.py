"""Epoch time of every registered training method against PGD-10, measured
in one process on the same model, data and batches.

Each method of :data:`advtrain.methods.METHODS` is built through
``Method.build`` with its preset's defaults and driven through the public
``Trainer.setup(train)`` / ``Trainer.train_epoch()``; one untimed warm-up
epoch counts its passes per example (:mod:`benchmarks.passes`), then the timed
epochs run in interleaved rounds (every method's first epoch, then every
method's second, ...), so a change in the machine's load hits every method
alike. Each row reports the minimum and median epoch wall time, the ratio of
the minima to PGD-10's, the counted passes, the cost model's ratio from them
and the peak memory from building the method to its first timed epoch. The
last row is the plain-PyTorch PGD-10 loop of the reference scripts.

``benchmarks/conftest.py`` runs it under pytest (``--bench-*`` options);
:func:`write_report` puts the table into a Markdown file between markers.
"""
from __future__ import annotations

import abc
import ctypes
import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from advtrain.data import DeviceLoader, cifar10
from advtrain.methods import METHODS, Method, Passes
from advtrain.models import build_model

from .passes import PassCounter

REFERENCE = "pgd"
"""The method every ratio divides by: PGD with its preset's 10 steps."""
BASELINE = "baseline (plain PyTorch PGD-10)"
COLUMNS = ("Method", "Epoch (s), min", "Epoch (s), median", "Ratio to PGD-10", "Steps / batch", "Forward / example",
           "Input-only backward / example", "Full backward / example", "Cost-model ratio", "Peak memory (MiB)")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchSize:
    """A benchmark configuration: the model, ``examples`` per epoch in batches
    of ``batch_size``, the device and precision, and ``rounds`` timed epochs
    per method."""

    name: str
    model: str
    model_kwargs: Tuple[Tuple[str, Any], ...]
    batch_size: int
    examples: int
    device: str
    precision: str
    rounds: int

    def describe(self) -> str:
        kwargs = ", ".join(f"{k}={v}" for k, v in self.model_kwargs)
        return (f"{self.model}({kwargs}), batch {self.batch_size}, {self.examples} images per epoch, "
                f"{self.device}, {self.precision}, {self.rounds} timed epochs per method")


SIZES: Dict[str, BenchSize] = {s.name: s for s in (
    # Minutes on a 2-core CPU; the same architecture and sites as the GPU size.
    BenchSize("cpu", "preactresnet18", (("width", 16),), 128, 512, "cpu", "fp32", 3),
    # A full CIFAR-10 epoch of PreActResNet18 in bf16 (the GPU targets' setting).
    BenchSize("gpu", "preactresnet18", (("width", 64),), 128, 50_000, "cuda", "bf16", 3),
    # Seconds: checks the machinery (tests/test_benchmarks_smoke.py).
    BenchSize("smoke", "smallcnn", (("width", 4),), 16, 16, "cpu", "fp32", 1),
)}


@dataclass
class Row:
    """One method's measurements: epoch wall times (s), counted passes per
    example and optimizer step (None under ``torch.compile``, whose graphs
    hide the passes from hooks), peak memory (MiB), and its optimizer steps
    per batch (Free-AT's replays)."""

    name: str
    times: List[float] = field(default_factory=list)
    passes: Optional[Passes] = None
    memory_mib: float = 0.0
    steps_per_batch: int = 1


@dataclass
class Results:
    """A benchmark run: its rows (PGD-10 first, the baseline last) and where
    and how it ran (``compiled``: ``Trainer(compile=True)`` for the methods
    that compile)."""

    size: BenchSize
    rows: List[Row]
    data: str = ""
    command: str = ""
    machine: Dict[str, str] = field(default_factory=dict)
    compiled: bool = False

    @property
    def section(self) -> str:
        """The report section's name: the size, ``-compile`` for a compiled run."""
        return self.size.name + ("-compile" if self.compiled else "")

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def ratio(self, name: str) -> float:
        """Minimum epoch time of ``name`` over PGD-10's."""
        return min(self.row(name).times) / min(self.row(REFERENCE).times)

    def cost_ratio(self, name: str) -> Optional[float]:
        """The cost model's prediction of :meth:`ratio` from the counted
        passes: the cost of an epoch's optimizer steps over PGD-10's."""
        mine, reference = self.row(name), self.row(REFERENCE)
        if mine.passes is None or reference.passes is None:
            return None
        return mine.passes.cost * mine.steps_per_batch / (reference.passes.cost * reference.steps_per_batch)


# ---------------------------------------------------------------- the runs
def make_data(size: BenchSize, data_dir: Optional[str] = None) -> Tuple[Tensor, Tensor, str]:
    """``(uint8 images, labels, description)``, ``size.examples`` of them: the
    first CIFAR-10 training images in ``data_dir`` (repeated when it holds
    fewer), else seeded uniform noise of CIFAR-10's shape."""
    n = size.examples
    if data_dir:
        train = cifar10(data_dir, train=True)
        reps = -(-n // len(train.labels))
        images, labels = train.images.repeat(reps, 1, 1, 1)[:n], train.labels.repeat(reps)[:n]
        return images.contiguous(), labels.contiguous(), f"CIFAR-10 from {data_dir}, {len(train.labels)} images"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=g), "synthetic (uniform random images and labels)"


def _model(size: BenchSize) -> torch.nn.Module:
    torch.manual_seed(0)  # every method starts from the same weights
    return build_model(size.model, **dict(size.model_kwargs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run(abc.ABC):
    """One row's training loop: :meth:`warm_up` trains one untimed epoch and
    counts its passes, :meth:`epoch` trains and times one epoch."""

    row: Row
    device: torch.device
    model: torch.nn.Module
    #: Training examples per epoch, summed over optimizer steps.
    examples: int
    compiled: bool = False

    @abc.abstractmethod
    def _train(self) -> None:
        """Train one epoch."""

    def warm_up(self) -> None:
        if self.compiled:
            self._train()
        else:
            with PassCounter(self.model) as counter:
                self._train()
            self.row.passes = counter.passes(self.examples)
        _sync(self.device)

    def epoch(self) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self._train()
        _sync(self.device)
        self.row.times.append(time.perf_counter() - start)


class MethodRun(_Run):
    """A registered method built through ``Method.build`` on the benchmark
    model (its preset's defaults; no evaluation), set up on the data with
    ``Trainer.setup``; an epoch is ``Trainer.train_epoch``."""

    def __init__(self, method: Method, size: BenchSize, data: Tuple[Tensor, Tensor], compile: bool = False) -> None:
        self.compiled = compile and method.compiles
        self.trainer = method.build(_model(size), batch_size=size.batch_size, precision=size.precision,
                                    device=size.device, compile=self.compiled, eval_every=0, eval_attack=None,
                                    progress=False, seed=0)
        loader = self.trainer.setup(data)
        self.row = Row(method.name, steps_per_batch=self.trainer.replays)
        self.model, self.device = self.trainer.model, self.trainer.device
        self.examples = loader.num_examples * self.trainer.replays

    def _train(self) -> None:
        self.trainer.train_epoch()


class BaselineRun(_Run):
    """The reference scripts' PGD-10 training loop in plain fp32 eager
    PyTorch, as they wrote it: train mode throughout, ``loss.backward()`` in
    each of the 10 attack steps (weight gradients computed and thrown away),
    NCHW tensors and a host sync per batch for the logged loss and accuracy.
    A constant learning rate: the schedule costs nothing measurable."""

    def __init__(self, size: BenchSize, data: Tuple[Tensor, Tensor], eps: float = 8 / 255,
                 step_size: float = 2 / 255, steps: int = 10) -> None:
        self.row = Row(BASELINE)
        self.device = torch.device(size.device)
        self.model = _model(size).to(self.device)
        self.loader = DeviceLoader(data, size.batch_size, device=self.device, seed=0)
        self.examples = self.loader.num_examples
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.eps, self.step_size, self.steps = eps, step_size, steps

    def _train(self) -> None:
        self.model.train()
        loss_sum, correct = 0.0, 0
        for batch in self.loader:
            x, y = batch.x, batch.y
            delta = torch.zeros_like(x).uniform_(-self.eps, self.eps)
            delta = torch.max(torch.min(delta, 1 - x), -x).requires_grad_(True)
            for _ in range(self.steps):
                F.cross_entropy(self.model(x + delta), y).backward()
                step = (delta + self.step_size * delta.grad.sign()).clamp(-self.eps, self.eps)
                delta.data = torch.max(torch.min(step, 1 - x), -x)
                delta.grad.zero_()
            output = self.model((x + delta.detach()).clamp(0, 1))
            loss = F.cross_entropy(output, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            loss_sum += loss.item()
            correct += int((output.argmax(1) == y).sum().item())


class PeakMemory:
    """Peak memory of a block above its start, in MiB: on CUDA the caching
    allocator's peak; on a CPU the process's peak resident set size, after
    returning freed memory to the OS and resetting the kernel's peak mark
    (Linux), so each method gets its own high-water mark — everything the
    process touched, an upper bound on its tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            try:  # resets the kernel's peak mark to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.mib = max(peak - self.base, 0.0)


def run(size: BenchSize, data_dir: Optional[str] = None, methods: Optional[Sequence[str]] = None,
        compile: bool = False, command: str = "") -> Results:
    """Benchmark ``methods`` (default: every registered one; PGD-10 always,
    first) and the baseline at ``size``."""
    names = [REFERENCE] + [n for n in (methods or METHODS) if n != REFERENCE]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    images, labels, description = make_data(size, data_dir)
    # One untimed step first: the process's one-off costs (thread pools,
    # kernel libraries, a CUDA context) are not charged to the first row.
    BaselineRun(size, (images[:size.batch_size], labels[:size.batch_size]), steps=1).warm_up()
    runs: List[_Run] = []
    for name in names + [BASELINE]:
        with PeakMemory(torch.device(size.device)) as memory:
            one = (BaselineRun(size, (images, labels)) if name == BASELINE
                   else MethodRun(METHODS[name], size, (images, labels), compile))
            one.warm_up()
            one.epoch()
        one.row.memory_mib = memory.mib
        runs.append(one)
    for _ in range(size.rounds - 1):
        for one in runs:
            one.epoch()
    return Results(size, [one.row for one in runs], description, command, machine_info(size), compile)


# ------------------------------------------------------------------ report
def machine_info(size: BenchSize) -> Dict[str, str]:
    """Date, code version and machine of a run."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    git = ["git", "-C", str(ROOT)]
    try:
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        rev, dirty = "", ""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "code": (rev or "unknown") + (" with uncommitted changes" if dirty else ""),
            "machine": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
                       f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
            "software": f"torch {torch.__version__}, Python {platform.python_version()}"}
    if size.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(size.device))
    return info


def _number(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def table_rows(results: Results) -> List[List[str]]:
    """The table's cells, one list per row in :data:`COLUMNS` order."""
    out = []
    for row in results.rows:
        p = row.passes
        counted = ["n/a"] * 3 if p is None else [f"{v:g}" for v in (p.forward, p.input_backward, p.full_backward)]
        out.append([row.name, _number(min(row.times)), _number(statistics.median(row.times)),
                    _number(results.ratio(row.name)), str(row.steps_per_batch), *counted,
                    _number(results.cost_ratio(row.name)),
                    _number(row.memory_mib)])
    return out


def render(results: Results) -> str:
    """The Markdown section of a run (without its markers)."""
    m = results.machine
    lines = [f"### `{results.section}`, measured {m.get('date', '')}", "", "```bash", results.command, "```", "",
             f"Code {m.get('code', '')}; {m.get('machine', '')}" + (f"; GPU {m['gpu']}" if "gpu" in m else "")
             + f"; {m.get('software', '')}. Model and run: {results.size.describe()}"
             + (", compiled where the method compiles" if results.compiled else "") + f"; data: {results.data}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(results)]
    lines += ["", "Each method runs with its preset's defaults (`pgd`: 10 steps). *Ratio to PGD-10*: minimum "
              "epoch time over PGD-10's, same run. *Steps / batch*: optimizer steps per batch (Free-AT's "
              "replays). Passes are counted per example and optimizer step by hooks on the model in the warm-up "
              "epoch; *cost-model ratio*: an epoch's passes (per step × steps per batch) priced at forward = "
              "input-only backward = F, full backward = 2F, over PGD-10's 23F. *Peak memory*: from building the "
              "method to the end of its "
              "first timed epoch (CUDA: allocator peak; CPU: peak RSS above the start, an upper bound).", ""]
    return "\n".join(lines)


def markers(size: str) -> Tuple[str, str]:
    return f"<!-- benchmark-results:{size}:begin -->", f"<!-- benchmark-results:{size}:end -->"


def write_report(path: Path, results: Results) -> None:
    """Put ``results``' section into the Markdown file ``path``, between the
    markers of :attr:`Results.section` (appended with them when the file has none); the text
    outside the markers is kept."""
    begin, end = markers(results.section)
    block = f"{begin}\n{render(results)}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text)


__all__ = ["BASELINE", "COLUMNS", "REFERENCE", "SIZES", "BenchSize", "Results", "Row", "make_data", "render",
           "run", "table_rows", "write_report"]

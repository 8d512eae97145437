"""Benchmark machinery: sizes, data, the method factory, pass counting, peak
memory, and runners that time one training epoch through advtrain's real code
path (``Trainer.fit``'s setup, then ``Trainer._train_epoch``).

Everything here is plain Python so that ``tests/test_benchmarks_smoke.py``
can exercise it in a few seconds; ``benchmarks/conftest.py`` and the
``test_*.py`` files wire it into pytest-benchmark.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from advtrain.attacks import APGD, PGD
from advtrain.data import DeviceLoader, cifar10
from advtrain.models import build_model
from advtrain.training import (
    APARTTrainer,
    ATTATrainer,
    FastATTrainer,
    FGSMTrainer,
    NFGSMTrainer,
    PGDTrainer,
    Trainer,
)
from advtrain.training.callbacks import Callback

from .baseline import ReferencePGDTraining
from .report import BASELINE, REFERENCE, cost_units

EPS = 8 / 255


# --------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class BenchSize:
    """One benchmark configuration (``--bench-size``).

    ``batches``: batches per epoch (the dataset then has ``batches *
    batch_size`` examples); ``None`` means ``examples`` images (a full
    CIFAR-10 epoch is 50,000 images = 391 batches of 128).
    """

    name: str
    model: str
    model_kwargs: Tuple[Tuple[str, Any], ...]
    batch_size: int
    batches: Optional[int]
    examples: int
    device: str
    precision: str
    channels_last: bool
    rounds: int
    warmup_steps: int
    attack_batches: int
    attack_rounds: int
    apgd_steps: int
    pgd_steps: Tuple[int, ...] = (10,)
    compile: bool = False
    threads: Optional[int] = None

    @property
    def num_examples(self) -> int:
        return self.batches * self.batch_size if self.batches is not None else self.examples

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def describe_model(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.model_kwargs)
        names = {
            "preactresnet18": "PreActResNet18",
            "smallcnn": "SmallCNN",
            "wideresnet": "WideResNet",
        }
        return f"{names.get(self.model, self.model)}({kw})"


SIZES: Dict[str, BenchSize] = {
    # A few minutes on a 2-core CPU: the real code path on a narrow
    # PreActResNet18 (same architecture and perturbation sites as the GPU size).
    "cpu": BenchSize(
        name="cpu",
        model="preactresnet18",
        model_kwargs=(("width", 16),),
        batch_size=128,
        batches=4,
        examples=512,
        device="cpu",
        precision="fp32",
        channels_last=True,
        rounds=3,
        warmup_steps=1,
        attack_batches=1,
        attack_rounds=2,
        apgd_steps=100,
    ),
    # The GPU speed targets' setting: PreActResNet18, CIFAR-10, batch 128,
    # bf16 autocast, channels_last, a full epoch.
    "gpu": BenchSize(
        name="gpu",
        model="preactresnet18",
        model_kwargs=(("width", 64),),
        batch_size=128,
        batches=None,
        examples=50_000,
        device="cuda",
        precision="bf16",
        channels_last=True,
        rounds=3,
        warmup_steps=3,
        attack_batches=20,
        attack_rounds=3,
        apgd_steps=100,
    ),
    # Seconds: only checks that the machinery runs (tests/test_benchmarks_smoke.py).
    "smoke": BenchSize(
        name="smoke",
        model="smallcnn",
        model_kwargs=(("width", 4),),
        batch_size=16,
        batches=2,
        examples=32,
        device="cpu",
        precision="fp32",
        channels_last=True,
        rounds=1,
        warmup_steps=1,
        attack_batches=1,
        attack_rounds=1,
        apgd_steps=5,
        threads=1,
    ),
}


def make_size(name: str, **overrides: Any) -> BenchSize:
    """A preset size with some fields replaced (``None`` values are ignored)."""
    if name not in SIZES:
        raise ValueError(f"unknown benchmark size {name!r}; known: {', '.join(SIZES)}")
    return replace(SIZES[name], **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------- data
def make_data(size: BenchSize, data_dir: Optional[str] = None) -> Tuple[Tensor, Tensor, str]:
    """``(uint8 images, int64 labels, description)`` with ``size.num_examples``
    examples: the first ones of the CIFAR-10 training split in ``data_dir``
    (repeated if the directory holds a smaller subset), else synthetic
    uniform-random images and labels of CIFAR-10's shape (seeded: every
    method sees the same data)."""
    n = size.num_examples
    if data_dir:
        train = cifar10(data_dir, train=True)
        images, labels = train.images, train.labels
        have = images.shape[0]
        if have < n:
            reps = -(-n // have)
            images, labels = images.repeat(reps, 1, 1, 1), labels.repeat(reps)
            desc = f"real CIFAR-10 from {data_dir} ({have} training images, repeated to {n})"
        else:
            desc = f"real CIFAR-10 from {data_dir} (first {n} training images)"
        return images[:n].contiguous(), labels[:n].contiguous(), desc
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return (
        images,
        labels,
        f"synthetic (uniform random uint8 images and labels, CIFAR-10 shape, {n} images)",
    )


def make_loader(size: BenchSize, images: Tensor, labels: Tensor) -> DeviceLoader:
    """The loader every method trains from: shuffled, pad-4 crop + flip,
    seed 0 (so all methods see the same batches in the same order)."""
    return DeviceLoader(
        (images, labels), size.batch_size, shuffle=True, augment=True, device=size.device, seed=0
    )


def make_model(size: BenchSize, seed: int = 0) -> nn.Module:
    """The benchmark model, identically initialized for every method."""
    torch.manual_seed(seed)
    return build_model(size.model, **dict(size.model_kwargs))


# ------------------------------------------------------------------- methods
def _trainer_kwargs(size: BenchSize, epochs: int) -> Dict[str, Any]:
    return dict(
        epochs=epochs,
        batch_size=size.batch_size,
        precision=size.precision,
        channels_last=size.channels_last,
        compile=size.compile,
        device=size.device,
        eval_every=0,
        eval_attack=None,
        progress=False,
        seed=0,
    )


def method_factories(size: BenchSize) -> Dict[str, Callable[[nn.Module, int], Trainer]]:
    """Method name → ``factory(model, epochs) -> Trainer`` (advtrain's presets
    with their paper defaults; evaluation off, no progress bar)."""

    def kw(epochs: int) -> Dict[str, Any]:
        return _trainer_kwargs(size, epochs)

    methods: Dict[str, Callable[[nn.Module, int], Trainer]] = {}
    for k in sorted(set(size.pgd_steps) | {10}, reverse=True):
        methods[f"PGD-{k}"] = (lambda k: lambda m, e: PGDTrainer(m, steps=k, **kw(e)))(k)
    methods.update(
        {
            "FGSM": lambda m, e: FGSMTrainer(m, **kw(e)),
            "FGSM-RS": lambda m, e: FastATTrainer(m, **kw(e)),
            "N-FGSM": lambda m, e: NFGSMTrainer(m, **kw(e)),
            "ATTA-1": lambda m, e: ATTATrainer(m, steps=1, **kw(e)),
            "APART": lambda m, e: APARTTrainer(m, **kw(e)),
        }
    )
    return methods


def method_names(size: BenchSize) -> List[str]:
    """The methods benchmarked at ``size``, PGD-10 (the reference) first."""
    names = list(method_factories(size))
    names.remove(REFERENCE)
    return [REFERENCE] + names


# --------------------------------------------------------------- pass counter
def first_weight(model: nn.Module) -> Tensor:
    """The weight of the first module (in definition order) that has its own
    trainable parameters: for advtrain's models the stem convolution, the last
    layer a backward pass reaches."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            return weight
    raise ValueError(f"{type(model).__name__} has no trainable weight")


@dataclass
class _Backward:
    rows: int
    full: bool = False
    reached_input: bool = False


class PassCounter:
    """Counts forward and backward passes through ``model``, per example.

    * A **forward pass** is one call of ``model`` (a forward hook); it counts
      the number of rows (examples) of its output.
    * A **backward pass** is one backward through that output (a tensor hook
      on the output fires when its gradient is computed), counting the rows
      of that gradient. It is a **full** backward when it also reaches the
      weight of the model's first layer (a hook on that parameter fires only
      when its gradient is computed, i.e. for ``loss.backward()``), and an
      **input-only** backward otherwise (``torch.autograd.grad`` with respect
      to the input and/or perturbation sites, which skips every
      weight-gradient kernel). ``reached_input`` records whether it also
      reached the model's input (a hook on the input when it requires grad).

    Use as a context manager around the code to count, and add the number of
    training examples processed to :attr:`examples`::

        with PassCounter(model) as counter:
            trainer.train_step(batch)
            counter.examples += len(batch)
        counter.per_example()  # {'forward': 11.0, 'backward_input_only': 10.0, ...}
    """

    def __init__(self, model: nn.Module, weight: Optional[Tensor] = None) -> None:
        self.model = model
        self.weight = weight if weight is not None else first_weight(model)
        self.examples = 0
        self.forward_calls = 0
        self.forward_rows = 0
        self.backwards: List[_Backward] = []
        self._handles: List[Any] = []

    # hooks
    def _on_forward_pre(self, _module: nn.Module, args: Tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.requires_grad:
            x.register_hook(self._on_input_grad)

    def _on_forward(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        self.forward_calls += 1
        self.forward_rows += int(output.shape[0])
        if output.requires_grad:
            output.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: Tensor) -> None:
        self.backwards.append(_Backward(rows=int(grad.shape[0])))

    def _latest(self, attribute: str) -> Optional[_Backward]:
        for event in reversed(self.backwards):
            if not getattr(event, attribute):
                return event
        return None

    def _on_weight_grad(self, _grad: Tensor) -> None:
        event = self._latest("full")
        if event is not None:
            event.full = True

    def _on_input_grad(self, _grad: Tensor) -> None:
        event = self._latest("reached_input")
        if event is not None:
            event.reached_input = True

    def __enter__(self) -> "PassCounter":
        self._handles = [
            self.model.register_forward_pre_hook(self._on_forward_pre),
            self.model.register_forward_hook(self._on_forward),
            self.weight.register_hook(self._on_weight_grad),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # results
    def totals(self) -> Dict[str, int]:
        """Rows summed over passes (one row = one example through the model)."""
        return {
            "forward": self.forward_rows,
            "backward_input_only": sum(b.rows for b in self.backwards if not b.full),
            "backward_full": sum(b.rows for b in self.backwards if b.full),
            "backward_reaching_input": sum(b.rows for b in self.backwards if b.reached_input),
        }

    def per_example(self) -> Dict[str, float]:
        """:meth:`totals` divided by :attr:`examples`."""
        if self.examples <= 0:
            raise ValueError(
                "PassCounter.examples is 0: add the number of training examples processed"
            )
        return {k: v / self.examples for k, v in self.totals().items()}


# -------------------------------------------------------------- peak memory
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_KIB
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (and so ``ru_maxrss``) to the current
    RSS (Linux >= 4.0, ``/proc/self/clear_refs``). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class MemoryReading:
    peak_mib: float
    kind: str


class PeakMemory:
    """Peak memory of a block of work above its starting point.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at
    the start (tensors allocated by PyTorch's caching allocator: model,
    optimizer state, per-example stores, activations, workspaces).

    CPU: the process's peak resident set size (``getrusage(RUSAGE_SELF)
    .ru_maxrss``) minus its RSS at the start. Freed memory is first returned to
    the OS (``gc.collect``, ``malloc_trim``) and the kernel's peak mark reset
    to the current RSS (``/proc/self/clear_refs``), so the number is this
    block's own high-water mark: everything the process touched — tensors,
    but also allocator caching and fragmentation, oneDNN scratch and code
    pages. It is an upper bound on the tensors' footprint, not a tensor
    count. Where the peak mark cannot be reset, the reading is the growth of
    the process-wide peak (0 if an earlier block went higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.base = 0
        self.reset_ok = True

    def start(self) -> "PeakMemory":
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.reset_ok = _reset_peak_rss()
            self.base = (
                _rss_kib() if self.reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            )
        return self

    def stop(self) -> MemoryReading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return MemoryReading(peak / 2**20, "CUDA max_memory_allocated above start")
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base
        kind = (
            "peak RSS (ru_maxrss) above start"
            if self.reset_ok
            else "growth of process peak RSS (ru_maxrss)"
        )
        return MemoryReading(max(peak_kib, 0) / 1024, kind)


# --------------------------------------------------------------- FLOP count
def pass_flops(size: BenchSize) -> Dict[str, float]:
    """Matrix FLOPs per example of one pass of each kind through the benchmark
    model, counted by ``torch.utils.flop_counter.FlopCounterMode`` (the
    convolutions and the linear layer, forward and backward; elementwise work
    is not counted) on a batch of ``size.batch_size``, the model in train mode:

    * ``forward``: one forward pass;
    * ``backward_input_only``: the gradient with respect to the input only
      (``autograd.grad``; the convolutions' weight-gradient kernels are
      skipped);
    * ``backward_full``: ``loss.backward()`` with the input not requiring
      grad (weight gradients, no gradient for the input image).

    Multiplied by a method's counted passes this gives its model FLOPs per
    example, the numerator of the fraction of the hardware's peak (the
    convention of "model FLOPs utilisation")."""
    device = torch.device(size.device)
    model = make_model(size).to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(size.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (size.batch_size,), generator=g).to(device)
    out: Dict[str, float] = {}
    with FlopCounterMode(display=False) as counter:
        model(x)
    out["forward"] = counter.get_total_flops() / size.batch_size
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(loss, [xr])
    out["backward_input_only"] = counter.get_total_flops() / size.batch_size
    loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    out["backward_full"] = counter.get_total_flops() / size.batch_size
    return out


BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data
sheets, matched in this order against the GPU's name."""


def bf16_peak_tflops(size: BenchSize) -> Tuple[Optional[float], str]:
    """``(peak, source)``: the data-sheet dense bf16 peak of the size's CUDA
    device, or ``(None, reason)`` on a CPU or an unlisted GPU (pass
    ``--bench-peak-tflops`` then)."""
    if not size.device.startswith("cuda") or not torch.cuda.is_available():
        return None, "no bf16 peak for a CPU run"
    name = torch.cuda.get_device_name(torch.device(size.device))
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"{name}: dense bf16 data-sheet peak"
    return None, f"{name}: peak unknown (pass --bench-peak-tflops)"


# ------------------------------------------------------------------- runners
class _StopBeforeFirstEpoch(Callback):
    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.stop_training = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """A prepared training method: ``warmup()`` counts passes on the first
    ``warmup_steps`` batches (untimed), ``epoch()`` trains one full epoch (the
    benchmarked function; on CUDA it ends synchronized), ``times`` collects
    the wall time of every ``epoch()`` call (``time.perf_counter``) and
    ``cpu_times`` the process's CPU time over it (``time.process_time``, all
    threads: on a CPU shared with other jobs it measures the work done, where
    wall time also measures the waiting)."""

    name: str
    model: nn.Module
    loader: DeviceLoader
    device: torch.device
    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)
    passes: Dict[str, float] = field(default_factory=dict)

    def warmup(self, steps: int) -> Dict[str, float]:
        raise NotImplementedError

    def _epoch(self) -> None:
        raise NotImplementedError

    def epoch(self) -> None:
        _sync(self.device)
        cpu, start = time.process_time(), time.perf_counter()
        self._epoch()
        _sync(self.device)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu)


class TrainerRunner(Runner):
    """An advtrain :class:`Trainer`, set up by its own ``fit`` (policy setup,
    loader, seeding) stopped before the first epoch; each ``epoch()`` is
    ``Trainer._train_epoch`` — the code ``fit`` runs per epoch (evaluation and
    checkpoints are off)."""

    def __init__(self, name: str, trainer: Trainer, loader: DeviceLoader) -> None:
        super().__init__(name=name, model=trainer.model, loader=loader, device=trainer.device)
        self.trainer = trainer
        stop = _StopBeforeFirstEpoch()
        trainer.callbacks.append(stop)
        try:
            trainer.fit(loader)
        finally:
            trainer.callbacks.remove(stop)

    def warmup(self, steps: int) -> Dict[str, float]:
        with PassCounter(self.trainer.model) as counter:
            for i, batch in enumerate(self.loader):
                if i >= steps:
                    break
                self.trainer.train_step(batch)
                counter.examples += len(batch)
        _sync(self.device)
        self.passes = counter.per_example()
        return self.passes

    def _epoch(self) -> None:
        self.trainer._train_epoch(self.loader, self.trainer.epoch)
        self.trainer.epoch += 1


class BaselineRunner(Runner):
    """The reference scripts' loop (:class:`~benchmarks.baseline.ReferencePGDTraining`)."""

    def __init__(self, name: str, baseline: ReferencePGDTraining, loader: DeviceLoader) -> None:
        super().__init__(name=name, model=baseline.model, loader=loader, device=baseline.device)
        self.baseline = baseline
        self._epoch_index = 0

    def warmup(self, steps: int) -> Dict[str, float]:
        with PassCounter(self.baseline.model) as counter:
            for i, batch in enumerate(self.loader):
                if i >= steps:
                    break
                self.baseline.train_step(batch.x, batch.y)
                counter.examples += len(batch)
        _sync(self.device)
        self.passes = counter.per_example()
        return self.passes

    def _epoch(self) -> None:
        self.loader.set_epoch(self._epoch_index)
        self.baseline.train_epoch(self.loader, self._epoch_index, len(self.loader))
        self._epoch_index += 1


def make_runner(name: str, size: BenchSize, images: Tensor, labels: Tensor) -> Runner:
    """A fresh model (same initialization for every method), loader and
    method, ready for ``warmup`` and ``epoch``."""
    model = make_model(size)
    loader = make_loader(size, images, labels)
    epochs = size.rounds + 1  # LR schedule long enough for every timed epoch
    if name == BASELINE:
        return BaselineRunner(
            name, ReferencePGDTraining(model, epochs=epochs, device=size.device), loader
        )
    factories = method_factories(size)
    if name not in factories:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(factories)} and {BASELINE!r}")
    return TrainerRunner(name, factories[name](model, epochs), loader)


# ------------------------------------------------------------------ attacks
def attack_factories(size: BenchSize) -> Dict[str, Callable[[], Any]]:
    """Evaluation attacks: PGD-20 (ε = 8/255, step 2/255, random start,
    BatchNorm in eval mode, as in ``advtrain.training.pgd20``) and APGD-CE
    with ``size.apgd_steps`` iterations (100 in the protocol)."""
    return {
        "PGD-20": lambda: PGD(EPS, steps=20, step_size=EPS / 4, random_start=True, bn_mode="eval"),
        f"APGD-CE ({size.apgd_steps} steps)": lambda: APGD(EPS, steps=size.apgd_steps, loss="ce"),
    }


class AttackRunner:
    """Runs an evaluation attack the way evaluation does (``attack(model, x,
    y)``, input checks on, model in eval mode, the size's autocast) over
    ``size.attack_batches`` pre-staged batches."""

    def __init__(
        self, name: str, attack: Any, size: BenchSize, images: Tensor, labels: Tensor
    ) -> None:
        self.name = name
        self.attack = attack
        self.device = torch.device(size.device)
        model = make_model(size).to(self.device)
        if size.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if size.compile else model
        self.model.eval()
        self.autocast = torch.bfloat16 if size.precision == "bf16" else None
        n = min(size.attack_batches * size.batch_size, images.shape[0])
        x = images[:n].to(self.device).float().div_(255)
        if size.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[:n].to(self.device)
        self.batches = [
            (x[i : i + size.batch_size], y[i : i + size.batch_size])
            for i in range(0, n, size.batch_size)
        ]
        self.images = n
        self.times: List[float] = []
        self.passes: Dict[str, float] = {}

    def _run(self, batches: List[Tuple[Tensor, Tensor]]) -> None:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
        ):
            for x, y in batches:
                self.attack(self.model, x, y)

    def warmup(self) -> Dict[str, float]:
        with PassCounter(model_of(self.model)) as counter:
            self._run(self.batches[:1])
            counter.examples += int(self.batches[0][0].shape[0])
        _sync(self.device)
        self.passes = counter.per_example()
        return self.passes

    def run(self) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self._run(self.batches)
        _sync(self.device)
        self.times.append(time.perf_counter() - start)


def model_of(module: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper (hooks go on it)."""
    return getattr(module, "_orig_mod", module)


# ------------------------------------------------------------------ machine
def machine_info(size: BenchSize) -> Dict[str, str]:
    """Where and with what the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores visible, "
        f"torch threads {torch.get_num_threads()}",
        "memory": _mem_total(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": size.device,
    }
    if size.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(size.device))
        info["gpu"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    try:
        info["load average"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def size_summary(size: BenchSize) -> Dict[str, Any]:
    out = asdict(size)
    out["model"] = size.describe_model()
    out["examples per epoch"] = size.num_examples
    out["batches per epoch"] = size.steps_per_epoch
    return out


__all__ = [
    "BenchSize",
    "SIZES",
    "make_size",
    "make_data",
    "make_loader",
    "make_model",
    "method_factories",
    "method_names",
    "PassCounter",
    "pass_flops",
    "bf16_peak_tflops",
    "cost_units",
    "PeakMemory",
    "MemoryReading",
    "Runner",
    "TrainerRunner",
    "BaselineRunner",
    "make_runner",
    "attack_factories",
    "AttackRunner",
    "machine_info",
    "REFERENCE",
    "BASELINE",
    "first_weight",
]

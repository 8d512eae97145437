"""Where a training step's time goes: the pieces behind the epoch ratios.

1. Per-pass cost of the benchmark model: one forward pass (BatchNorm in train
   mode, graph kept), a backward to the input only (``autograd.grad``), a full
   backward (weight gradients, as in the training step), in NCHW and
   channels_last, and what they predict for PGD-10 vs the reference loop and
   for a single-step method vs PGD-10.
2. Per-batch cost of ``Trainer.train_step`` for some methods, including APART
   without its layer perturbations (``layerwise=False``), to separate what the
   perturbation sites cost.

Every timing is the minimum over ``--repeats`` interleaved repetitions, in
process CPU time and wall time. Compare numbers within one part: on a machine
shared with other jobs even CPU time drifts over minutes (a busy SMT sibling
slows every instruction), and the two parts run minutes apart::

    python benchmarks/step_costs.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    TrainerRunner,
    _trainer_kwargs,
    make_data,
    make_loader,
    make_model,  # noqa: E402
    make_runner,
    make_size,
)
from advtrain.training import APARTTrainer  # noqa: E402


def _timed(fn: Callable[[], object]) -> Tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def pass_costs(size_name: str, repeats: int) -> Dict[str, Dict[str, float]]:
    size = make_size(size_name)
    out: Dict[str, Dict[str, List[float]]] = {}
    for _ in range(repeats):
        for channels_last in (False, True):
            model = make_model(size).train()
            g = torch.Generator().manual_seed(0)
            x = torch.rand(size.batch_size, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (size.batch_size,), generator=g)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            state: Dict[str, torch.Tensor] = {}

            def forward() -> None:
                state["delta"] = torch.zeros_like(x, requires_grad=True)
                state["loss"] = F.cross_entropy(model(x + state["delta"]), y)

            def input_backward() -> None:
                torch.autograd.grad(state["loss"], [state["delta"]])

            def train_forward() -> None:
                state["loss"] = F.cross_entropy(model(x), y)

            def full_backward() -> None:
                state["loss"].backward()

            for _ in range(2):  # warm up kernels and allocator
                forward(), input_backward(), train_forward(), full_backward()
            row = out.setdefault(
                "channels_last" if channels_last else "NCHW",
                {"forward": [], "input-only backward": [], "full backward": []},
            )
            row["forward"].append(_timed(forward)[0])
            row["input-only backward"].append(_timed(input_backward)[0])
            train_forward()
            row["full backward"].append(_timed(full_backward)[0])
    return {fmt: {k: min(v) for k, v in row.items()} for fmt, row in out.items()}


def step_costs(size_name: str, repeats: int, batches: int) -> Dict[str, Tuple[float, float]]:
    size = make_size(size_name, batches=batches)
    images, labels, _ = make_data(size)
    runners = {}
    for name in ("PGD-10", "FGSM", "APART"):
        runners[name] = make_runner(name, size, images, labels)
    model, loader = make_model(size), make_loader(size, images, labels)
    runners["APART, layerwise=False"] = TrainerRunner(
        "APART, layerwise=False",
        APARTTrainer(model, layerwise=False, **_trainer_kwargs(size, 2)),
        loader,
    )
    data = {}
    for name, runner in runners.items():
        runner.warmup(1)
        runner.loader.set_epoch(0)  # the warm-up left the loader mid-epoch
        data[name] = [b for _, b in zip(range(batches), runner.loader)]
        assert len(data[name]) == batches
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            step = runner.trainer.train_step  # type: ignore[attr-defined]
            cpu, wall = _timed(lambda: [step(b) for b in data[name]])
            times[name].append((cpu / batches, wall / batches))
    return {name: (min(t[0] for t in ts), min(t[1] for t in ts)) for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu", help="benchmark size preset (model and batch)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--batches", type=int, default=4, help="batches per repetition of the step timing"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = make_size(args.size)
    print(
        f"{size.describe_model()}, batch {size.batch_size}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; minimum over {args.repeats} interleaved repetitions"
    )
    print("\nPer pass (CPU time; F = one forward pass):")
    for fmt, c in pass_costs(args.size, args.repeats).items():
        f, bi, bf = c["forward"], c["input-only backward"], c["full backward"]
        print(
            f"  {fmt:13s} forward {f * 1e3:6.1f} ms | "
            f"input-only backward {bi * 1e3:6.1f} ms ({bi / f:.2f}F) | "
            f"full backward {bf * 1e3:6.1f} ms ({bf / f:.2f}F; "
            f"weight gradients {(bf - bi) / f:.2f}F)"
        )
        pgd, ref, single = 11 * f + 10 * bi + bf, 11 * f + 11 * bf, 2 * f + bi + bf
        print(
            f"  {'':13s} predicted: PGD-10 step {pgd * 1e3:.0f} ms, "
            f"reference loop {ref * 1e3:.0f} ms (speedup {ref / pgd:.2f}x), "
            f"single-step {single * 1e3:.0f} ms (ratio {single / pgd:.3f})"
        )
    print("\nPer training batch (Trainer.train_step; CPU time / wall time):")
    for name, (cpu, wall) in step_costs(args.size, args.repeats, args.batches).items():
        print(f"  {name:24s} {cpu * 1e3:7.1f} ms / {wall * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark results → Markdown (``docs/benchmarks.md``).

The suite collects its measurements in a :class:`BenchResults` and, with
``--bench-report PATH``, writes them as one Markdown section per benchmark
size (and variant: ``cpu-channels-last``, ``gpu-compile``, ...) between the
markers ``<!-- benchmark-results:SECTION:begin -->`` and
``<!-- benchmark-results:SECTION:end -->``. A file that has the markers keeps
everything outside them (hand-written analysis); a file without them gets the
section appended; a missing file is created. Every number in the section is a
measurement of that run, or arithmetic on those measurements.

Re-render a saved run (``--bench-json PATH``) without re-running it::

    python benchmarks/report.py results.json --out docs/benchmarks.md

This module imports nothing from the rest of ``benchmarks/`` so that it runs
as a script.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REFERENCE = "PGD-10"
BASELINE = "Reference PGD-10 (plain PyTorch)"
RATIO_TARGET = 0.25
"""The single-step methods' epoch time relative to PGD-10 (APART's claim: 1/4)."""
RATIO_TARGET_METHODS = ("FGSM-RS", "N-FGSM", "ATTA-1", "APART")
SPEEDUP_TARGETS = {"cpu": 1.3, "gpu": 3.0}
"""advtrain's PGD-10 epoch vs the plain-PyTorch reference loop."""
EPOCH_TARGETS_S = {"gpu": {"PGD-10": 8.0, "APART": 2.0}}
"""Absolute epoch-time targets (only for a full 50,000-image epoch)."""

TRAINING_COLUMNS = (
    "Method",
    "Epoch time (s), min",
    "Epoch time (s), median",
    "Ratio to PGD-10",
    "CPU time (s), min",
    "Ratio to PGD-10 by CPU time",
    "Cost-model ratio",
    "Forward / example",
    "Input-only backward / example",
    "Full backward / example",
    "Model TFLOP/s",
    "Fraction of bf16 peak",
    "Peak memory (MiB)",
)
ATTACK_COLUMNS = (
    "Attack",
    "Images / s",
    "Time (s), min",
    "Images",
    "Forward / example",
    "Input-only backward / example",
)
TARGET_COLUMNS = ("Target", "Required", "Measured", "Met", "Margin")


def cost_units(passes: Dict[str, float]) -> float:
    """The cost model in units of one forward pass F: a forward
    and an input-only backward ≈ F each, a full backward (input gradient and
    weight gradients) ≈ 2F. PGD-10 training: 11 + 10 + 2 = 23F; a
    single-step method: 2 + 1 + 2 = 5F."""
    return passes["forward"] + passes["backward_input_only"] + 2.0 * passes["backward_full"]


def _margin(value: float, limit: float, *, upper: bool) -> str:
    """How far ``value`` is inside (or outside) ``limit``, relative to the limit."""
    rel = (limit - value) / limit if upper else (value - limit) / limit
    return f"{abs(rel):.0%} {'inside' if rel >= 0 else 'outside'} the limit"


# ------------------------------------------------------------------ results
@dataclass
class TrainingResult:
    method: str
    times: List[float]
    passes: Dict[str, float]
    memory_mib: Optional[float] = None
    memory_kind: str = ""
    cpu_times: List[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_cpu(self) -> Optional[float]:
        return min(self.cpu_times) if self.cpu_times else None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class AttackResult:
    attack: str
    times: List[float]
    images: int
    passes: Dict[str, float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def images_per_s(self) -> float:
        return self.images / self.best


@dataclass
class BenchResults:
    """Everything one benchmark session measured, plus where and how."""

    size: str
    variant: str = ""
    """Non-default settings (e.g. ``"channels-last"``); a run with a variant
    gets its own section (``SIZE-VARIANT``) in the report."""
    command: str = ""
    machine: Dict[str, str] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    data: str = ""
    training: List[TrainingResult] = field(default_factory=list)
    attacks: List[AttackResult] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    pass_flops: Dict[str, float] = field(default_factory=dict)
    """Matrix FLOPs per example of one ``forward``, ``backward_input_only`` and
    ``backward_full`` pass of the model (``harness.pass_flops``)."""
    peak_tflops: Optional[float] = None
    """The device's dense bf16 peak in TFLOP/s, when known."""
    peak_source: str = ""

    @property
    def section(self) -> str:
        return f"{self.size}-{self.variant}" if self.variant else self.size

    def add_training(self, result: TrainingResult) -> None:
        self.training = [r for r in self.training if r.method != result.method] + [result]

    def add_attack(self, result: AttackResult) -> None:
        self.attacks = [r for r in self.attacks if r.attack != result.attack] + [result]

    def find(self, method: str) -> Optional[TrainingResult]:
        return next((r for r in self.training if r.method == method), None)

    def ratio(self, method: str) -> Optional[float]:
        """Epoch time of ``method`` over PGD-10's (minimum over rounds of each)."""
        ref, res = self.find(REFERENCE), self.find(method)
        if ref is None or res is None or not ref.times or not res.times:
            return None
        return res.best / ref.best

    def cpu_ratio(self, method: str) -> Optional[float]:
        """Like :meth:`ratio` with process CPU time instead of wall time."""
        ref, res = self.find(REFERENCE), self.find(method)
        if (
            ref is None
            or res is None
            or ref.best_cpu is None
            or res.best_cpu is None
            or ref.best_cpu <= 0
        ):
            return None
        return res.best_cpu / ref.best_cpu

    def cost_ratio(self, method: str) -> Optional[float]:
        ref, res = self.find(REFERENCE), self.find(method)
        if ref is None or res is None or not ref.passes or not res.passes:
            return None
        return cost_units(res.passes) / cost_units(ref.passes)

    def model_tflops(self, method: str) -> Optional[float]:
        """Achieved model TFLOP/s of ``method``'s fastest epoch: its counted
        passes per example times each pass's matrix FLOPs
        (:attr:`pass_flops`), times the examples per epoch, over the epoch's
        wall time. Elementwise work is not counted, so this is the "model
        FLOPs" convention, not everything the hardware executed."""
        res = self.find(method)
        examples = int(self.config.get("examples per epoch", 0) or 0)
        if res is None or not res.times or not res.passes or not self.pass_flops or not examples:
            return None
        per_example = sum(
            res.passes.get(kind, 0.0) * flops for kind, flops in self.pass_flops.items()
        )
        return per_example * examples / res.best / 1e12

    def peak_fraction(self, method: str) -> Optional[float]:
        """:meth:`model_tflops` over the device's bf16 peak (:attr:`peak_tflops`)."""
        achieved = self.model_tflops(method)
        if achieved is None or not self.peak_tflops:
            return None
        return achieved / self.peak_tflops

    def speedup(self) -> Optional[float]:
        """Reference loop's PGD-10 epoch time over advtrain's."""
        ref, base = self.find(REFERENCE), self.find(BASELINE)
        if ref is None or base is None or not ref.times or not base.times:
            return None
        return base.best / ref.best

    def targets(self) -> List[Tuple[str, str, Optional[float], Optional[bool], str]]:
        """``(target, required, measured, met, margin)`` rows for this size."""
        rows: List[Tuple[str, str, Optional[float], Optional[bool], str]] = []
        for method in RATIO_TARGET_METHODS:
            r = self.ratio(method)
            rows.append(
                (
                    f"{method} epoch / PGD-10 epoch",
                    f"≤ {RATIO_TARGET:.2f}",
                    r,
                    None if r is None else r <= RATIO_TARGET,
                    "" if r is None else _margin(r, RATIO_TARGET, upper=True),
                )
            )
        need = SPEEDUP_TARGETS.get(self.size)
        if need is not None:
            s = self.speedup()
            rows.append(
                (
                    f"advtrain PGD-10 vs {BASELINE}",
                    f"≥ {need:.1f}×",
                    s,
                    None if s is None else s >= need,
                    "" if s is None else _margin(s, need, upper=False),
                )
            )
        full_epoch = int(self.config.get("examples per epoch", 0) or 0) >= 50_000
        for method, limit in EPOCH_TARGETS_S.get(self.size, {}).items():
            res = self.find(method)
            t = res.best if res is not None and res.times and full_epoch else None
            rows.append(
                (
                    f"{method} epoch time (s), full 50,000-image epoch",
                    f"≤ {limit:g} s",
                    t,
                    None if t is None else t <= limit,
                    "" if t is None else _margin(t, limit, upper=True),
                )
            )
        if self.peak_tflops:
            for method in EPOCH_TARGETS_S.get(self.size, {}):
                rows.append(
                    (
                        f"{method}: fraction of the bf16 peak ({self.peak_tflops:g} TFLOP/s)",
                        "reported",
                        self.peak_fraction(method),
                        None,
                        "",
                    )
                )
        return rows

    # serialisation
    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "BenchResults":
        known = {f.name for f in fields(cls)} - {"training", "attacks"}
        out = cls(**{k: v for k, v in data.items() if k in known})
        out.training = [TrainingResult(**r) for r in data.get("training", [])]
        out.attacks = [AttackResult(**r) for r in data.get("attacks", [])]
        return out


# ------------------------------------------------------------------ render
def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _measured(required: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if "×" in required:
        return f"{value:.2f}×"
    if required == "reported":
        return _percent(value)
    return f"{value:.3f}"


def _passes(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}" if abs(value - round(value)) < 1e-9 else f"{value:.3f}"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def training_rows(results: BenchResults) -> List[List[str]]:
    rows = []
    order = [r.method for r in results.training]
    if REFERENCE in order:  # PGD-10 first, the baseline last
        order.remove(REFERENCE)
        order.insert(0, REFERENCE)
    if BASELINE in order:
        order.remove(BASELINE)
        order.append(BASELINE)
    for method in order:
        r = results.find(method)
        assert r is not None
        p = r.passes or {}
        rows.append(
            [
                r.method,
                _fmt(r.best) if r.times else "n/a",
                _fmt(r.median) if r.times else "n/a",
                _fmt(results.ratio(method)),
                _fmt(r.best_cpu),
                _fmt(results.cpu_ratio(method)),
                _fmt(results.cost_ratio(method)),
                _passes(p.get("forward")),
                _passes(p.get("backward_input_only")),
                _passes(p.get("backward_full")),
                _fmt(results.model_tflops(method)),
                _percent(results.peak_fraction(method)),
                _fmt(r.memory_mib, 4) if r.memory_mib is not None else "n/a",
            ]
        )
    return rows


def attack_rows(results: BenchResults) -> List[List[str]]:
    return [
        [
            a.attack,
            f"{a.images_per_s:.1f}",
            _fmt(a.best),
            str(a.images),
            _passes(a.passes.get("forward")),
            _passes(a.passes.get("backward_input_only")),
        ]
        for a in results.attacks
        if a.times
    ]


def render_section(results: BenchResults) -> str:
    """The Markdown section for one size (without the markers)."""
    cfg, m = results.config, results.machine
    title = f"`--bench-size {results.size}`" + (f" ({results.variant})" if results.variant else "")
    lines = [f"### {title} — measured {m.get('date', 'n/a')}", ""]
    if results.command:
        lines += ["Command:", "", "```bash", results.command, "```", ""]
    lines += ["| Setting | Value |", "|---|---|"]
    settings = [
        ("Machine", m.get("cpu", "")),
        ("GPU", m.get("gpu", "")),
        ("Memory", m.get("memory", "")),
        ("torch", m.get("torch", "")),
        ("Python", m.get("python", "")),
        ("Platform", m.get("platform", "")),
        ("Load average at start (1, 5, 15 min)", m.get("load average", "")),
        ("Model", cfg.get("model", "")),
        ("Batch size", cfg.get("batch_size", "")),
        (
            "Epoch",
            f"{cfg.get('batches per epoch', '')} batches = "
            f"{cfg.get('examples per epoch', '')} images",
        ),
        ("Data", results.data),
        ("Device", cfg.get("device", "")),
        (
            "Precision",
            f"{cfg.get('precision', '')}, channels_last={cfg.get('channels_last', '')}, "
            f"torch.compile={cfg.get('compile', '')}",
        ),
        (
            "Timed epochs per method",
            f"{cfg.get('rounds', '')}, in interleaved rounds (every method's epoch 1, "
            f"then every method's epoch 2, ...), after {cfg.get('warmup_steps', '')} "
            "untimed warm-up batch(es) per method on which the passes are counted",
        ),
        ("Threads", f"torch intra-op threads {cfg.get('threads') or 'default'}"),
    ]
    lines += [f"| {k} | {v} |" for k, v in settings if v not in ("", None)]
    lines += ["", "#### Training: one epoch per method", ""]
    lines += _table(TRAINING_COLUMNS, training_rows(results))
    lines += [
        "",
        "*Ratio to PGD-10*: minimum epoch wall time over the timed epochs divided by advtrain "
        "PGD-10's, same run, model, batches and data. *CPU time*: the process's CPU time (all "
        "threads) over the epoch; on a CPU shared with other jobs it counts the work done, where "
        "wall time also counts the waiting, so its ratio cross-checks the wall-time ratio. "
        "*Cost-model ratio*: the same ratio predicted from the **counted** passes with the "
        "cost model (forward = input-only backward = F, full backward = 2F): PGD-10 = 23F, "
        "single-step = 5F, limit 5/23 ≈ 0.217. Passes are counted per training example by hooks "
        "on the model (forward: calls × rows; backward: gradients reaching the model output; "
        "*full* = also reaching the first layer's weight, i.e. with weight gradients; "
        "*input-only* = `autograd.grad` to the input and/or perturbation sites, no "
        "weight-gradient kernels). "
        f"*Model TFLOP/s*: {_flops_note(results)} "
        f"*Peak memory*: {_memory_kind(results)}.",
    ]
    if results.attacks:
        lines += ["", "#### Evaluation attack throughput", ""]
        lines += _table(ATTACK_COLUMNS, attack_rows(results))
        lines += [
            "",
            "`attack(model, x, y)` as evaluation calls it (input checks on, BatchNorm in eval "
            "mode, the size's precision), batches of the training batch size; images / s from "
            "the minimum time.",
        ]
    rows = results.targets()
    if rows:
        lines += ["", "#### Targets", ""]
        lines += _table(
            TARGET_COLUMNS,
            [
                [
                    t,
                    req,
                    _measured(req, val),
                    "n/a" if met is None else ("yes" if met else "**no**"),
                    margin,
                ]
                for t, req, val, met, margin in rows
            ],
        )
    if results.notes:
        lines += [""] + [f"- {n}" for n in results.notes]
    return "\n".join(lines) + "\n"


def _flops_note(results: BenchResults) -> str:
    if not results.pass_flops:
        return "not counted in this run."
    f = results.pass_flops
    text = (
        "the counted passes per example times each pass's matrix FLOPs (convolutions and the "
        "linear layer, counted by `torch.utils.flop_counter.FlopCounterMode` on this model: "
        f"forward {f['forward'] / 1e9:.3g} GFLOP, input-only backward "
        f"{f['backward_input_only'] / 1e9:.3g} GFLOP, full backward "
        f"{f['backward_full'] / 1e9:.3g} GFLOP per example), times the examples per epoch, "
        "over the fastest epoch; elementwise work is not counted."
    )
    if results.peak_tflops:
        text += f" *Fraction of bf16 peak*: of {results.peak_tflops:g} TFLOP/s ({results.peak_source})."
    else:
        text += f" *Fraction of bf16 peak*: n/a ({results.peak_source or 'no peak given'})."
    return text


def _memory_kind(results: BenchResults) -> str:
    kinds = sorted({r.memory_kind for r in results.training if r.memory_kind})
    text = "; ".join(kinds) if kinds else "n/a"
    if any("RSS" in k for k in kinds):
        text += (
            " — from just before the model and method are built through the warm-up and timed "
            "epochs; freed memory is returned to the OS and the kernel's peak mark reset first, so "
            "it is this method's own high-water mark of the whole process (tensors plus allocator "
            "caching, oneDNN scratch), an upper bound on its tensors, comparable between rows of "
            "one run"
        )
    return text


def markers(size: str) -> Tuple[str, str]:
    return f"<!-- benchmark-results:{size}:begin -->", f"<!-- benchmark-results:{size}:end -->"


HEADER = """# Benchmarks

Epoch-time ratios against PGD-10, passes per example and peak memory, measured by
the suite in `benchmarks/` (see `benchmarks/README.md`). Sections between
`benchmark-results` markers are written by the suite; do not edit them by hand.
"""


def write_report(path: Path, results: BenchResults) -> Path:
    """Write (or refresh) ``results``' section in the Markdown file ``path``."""
    path = Path(path)
    begin, end = markers(results.section)
    block = f"{begin}\n{render_section(results)}{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render benchmark results (--bench-json output) as Markdown."
    )
    parser.add_argument(
        "results", type=Path, help="JSON written by `pytest benchmarks/ --bench-json PATH`"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown file to update (default: print)"
    )
    args = parser.parse_args(argv)
    results = BenchResults.from_json(json.loads(args.results.read_text()))
    if args.out is None:
        print(render_section(results))
    else:
        write_report(args.out, results)
        print(f"wrote the {results.section} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

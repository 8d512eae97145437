"""A study's results: ``results.json``, the ``results.md`` table and the
figures, made from what the study directory holds — finished methods'
``result.json``, every method's ``metrics.jsonl`` — so a report can be
rebuilt at any time and marks what is missing.

Accuracies are fractions in [0, 1] in the JSON and percentages in the table.
The epoch-time ratio is a method's median training seconds per epoch over
PGD-10's, both measured in this study (so on the same machine, in the same
session).
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..training.atomic import atomic_write_text
from .runner import RESULT_NAME, _clock, _epoch_records
from .spec import REFERENCE_METHOD, StudySpec, method_title

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CURVES_PNG = "robust_accuracy.png"
STRENGTH_PNG = "strength.png"


def machine() -> str:
    """The machine in a few words: the CUDA device's name, or the CPU's
    architecture and core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def code_version() -> str:
    """The git commit of the advtrain source (with ``+dirty`` when it has
    uncommitted changes), or the package version outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"advtrain {version('advtrain')}"
        except PackageNotFoundError:
            return "unknown"


def _row(out: Path, name: str, planned: Optional[int]) -> Dict[str, Any]:
    path = out / name / RESULT_NAME
    records = _epoch_records(out / name)
    times = [r["time"] for r in records if "time" in r]
    row: Dict[str, Any] = {"method": name, "title": method_title(name), "epochs": len(records),
                           "planned_epochs": planned, "train_seconds": sum(times),
                           "median_epoch_seconds": statistics.median(times) if times else None,
                           "robust_per_epoch": [r.get("robust_acc") for r in records]}
    if path.is_file():
        result = json.loads(path.read_text())
        row.update(status="finished", planned_epochs=result["planned_epochs"], raw=result["raw"],
                   averaged=result.get("averaged"), eval_seconds=result["eval_seconds"])
    elif records:
        row["status"] = "unfinished"
    else:
        row["status"] = "not run"
    return row


def collect(out: Path, spec: StudySpec, command: str = "") -> Dict[str, Any]:
    """Everything the study directory holds, as ``results.json`` writes it."""
    rows = [_row(out, name, spec.epochs) for name in spec.methods]
    reference = next((r for r in rows if r["method"] == REFERENCE_METHOD and r["median_epoch_seconds"]), None)
    for row in rows:
        row["epoch_ratio"] = (row["median_epoch_seconds"] / reference["median_epoch_seconds"]
                              if reference is not None and row["median_epoch_seconds"] else None)
    return {"spec": spec.to_dict(), "command": command, "machine": machine(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "code_version": code_version(), "rows": rows}


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_markdown(results: Dict[str, Any], figures: Sequence[str] = ()) -> str:
    """The ``results.md`` page: how the numbers were made, then one row per
    method (and one per weight-averaged model), missing cells as —."""
    spec = results["spec"]
    size = (f"{spec['model']}{spec['model_kwargs'] or ''}, "
            f"{'all' if spec['train_examples'] is None else format(spec['train_examples'], ',')} training images, "
            f"{spec['epochs'] or 'the preset’s'} epochs, ε = {spec['eps'] * 255:.3g}/255, "
            f"protocol {spec['protocol'] or 'none (each preset)'}")
    options = spec.get("method_options") or {}  # absent from results of earlier versions
    if options:
        size += "; " + "; ".join(f"{name} with " + ", ".join(f"{key} = {value}" for key, value in opts.items())
                                 for name, opts in options.items())
    lines = [
        "# Study results", "",
        f"- Setting: {size}; accuracies on the first {spec['eval_examples']:,} CIFAR-10 test images.",
        f"- Command: `{results['command']}`" if results["command"] else "- Command: (API)",
        f"- Machine: {results['machine']}; torch {results['torch']}; date {results['date']}; "
        f"code {results['code_version']}.",
        "- Clean, PGD-20 (ε/4 steps, random start) and CW-20 (the same on the margin loss) are each attack's own "
        "accuracy; AA-grade is the per-image worst case over PGD-20, CW-20, APGD-CE and APGD-T (9 targets). "
        "Epoch ratio: median training seconds per epoch over PGD-10's, in this run.",
        "",
        "| method | clean | PGD-20 | CW | AA-grade | epochs | train time | epoch ratio to PGD-10 | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        variants = [("raw", row.get("raw"))]
        if row.get("averaged"):
            variants.append(("averaged", row["averaged"]))
        for which, acc in variants:
            acc = acc or {}
            name = row["title"] + (" (weight average)" if which == "averaged" else "")
            epochs = f"{row['epochs']}/{row['planned_epochs']}" if row["planned_epochs"] else str(row["epochs"])
            ratio = "—" if row["epoch_ratio"] is None else f"{row['epoch_ratio']:.2f}"
            minutes = _clock(row["train_seconds"]) if row["epochs"] else "—"
            status = row["status"] if row["status"] != "finished" else ""
            if acc.get("masking_findings"):
                status = (status + "; " if status else "") + "masking checks fired: " + ", ".join(
                    acc["masking_findings"])
            lines.append(f"| {name} | {_pct(acc.get('clean'))} | {_pct(acc.get('pgd20'))} | {_pct(acc.get('cw'))} "
                         f"| {_pct(acc.get('aa_grade'))} | {epochs} | {minutes} | {ratio} | {status} |")
    missing = [r["title"] for r in results["rows"] if r["status"] != "finished"]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)} — run the same command again to continue."]
    if figures:
        lines += [""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def plot_curves(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """Robust accuracy (PGD-20 on the study's test images) per epoch, every
    method with a measured epoch; None when matplotlib is missing."""
    try:
        from ..diagnostics.plots import plot_accuracy_curves
    except ImportError:
        return None
    histories = {row["title"]: _epoch_records(path.parent / row["method"]) for row in results["rows"] if row["epochs"]}
    if not histories:
        return None
    try:
        return plot_accuracy_curves(histories, path, title="CIFAR-10, PGD-20 accuracy per epoch")
    except ImportError:
        return None


def write_report(out: Path, spec: StudySpec, command: str = "", strength: Optional[Dict[str, Any]] = None,
                 strength_figure: bool = False) -> Dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the curves figure into
    ``out``; returns the results."""
    results = collect(out, spec, command)
    if strength is not None:
        results["strength"] = strength
    figures = []
    if plot_curves(results, out / CURVES_PNG) is not None:
        figures.append(CURVES_PNG)
    if strength_figure:
        figures.append(STRENGTH_PNG)
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2) + "\n", what="study results")
    atomic_write_text(out / RESULTS_MD, render_markdown(results, figures), what="study results")
    return results


__all__ = ["CURVES_PNG", "RESULTS_JSON", "RESULTS_MD", "STRENGTH_PNG", "collect", "code_version", "machine",
           "plot_curves", "render_markdown", "write_report"]

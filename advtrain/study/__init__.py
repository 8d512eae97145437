"""``advtrain study``: train a list of methods under one protocol and run
size, evaluate each final model on the same fixed test images, and write a
table, its JSON and figures — resumable, and within a wall-clock budget.

:func:`run_study` is the whole command; :class:`Study` (training and final
evaluation), :mod:`~advtrain.study.report` (the table and figures) and
:mod:`~advtrain.study.strength` (the perturbation-strength part) are its
pieces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .plan import ORDERS, planned_order
from .report import RESULTS_JSON, RESULTS_MD, STRENGTH_PNG, write_report
from .runner import Study
from .spec import DEFAULT_METHODS, StudySpec, read_spec
from .strength import plot_strength, strength_results


def run_study(spec: StudySpec, out: Path, train: Any, test: Any, *, budget: Optional[float] = None,
              order: str = "cost", device: Optional[str] = None, progress: bool = True, command: str = "",
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run what is left of the study ``spec`` in ``out`` within ``budget``
    seconds, then write ``results.json``, ``results.md`` and the figures;
    returns the results (see :func:`advtrain.study.report.collect`). Run it
    again with the same spec to continue an interrupted or budget-limited
    study: finished methods are kept, unfinished ones resume."""
    study = Study(spec, Path(out), train, test, budget=budget, order=order, device=device, progress=progress,
                  log=log)
    study.run()
    return report(study, command)


def report(study: Study, command: str = "") -> Dict[str, Any]:
    """Write the study's results files from what its directory holds."""
    strength = strength_results(study)
    figure = strength is not None and plot_strength(strength, study.out / STRENGTH_PNG) is not None
    return write_report(study.out, study.spec, command, strength=strength, strength_figure=figure)


__all__ = ["DEFAULT_METHODS", "ORDERS", "RESULTS_JSON", "RESULTS_MD", "Study", "StudySpec", "planned_order",
           "read_spec", "report", "run_study"]

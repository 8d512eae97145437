"""The files a training run writes into its run directory: which of them
mark the directory as holding a run, and how to clear them for a fresh one.

A directory holds a run when it has a ``checkpoint.pt``, a non-empty
``metrics.jsonl`` or a ``config.json`` (the command line's record of the
options). Starting a fresh run there would truncate the metrics and replace
the checkpoint, so :meth:`~advtrain.training.Trainer.fit` and ``advtrain
train`` refuse unless told to resume or to overwrite.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Union

MARKERS = ("checkpoint.pt", "metrics.jsonl", "config.json")
WRITTEN = MARKERS + ("best.pt", "metrics.csv")
EPOCH_CHECKPOINTS = "checkpoint_epoch*.pt"


def existing_run(run_dir: Union[str, Path]) -> List[Path]:
    """The files in ``run_dir`` that show it holds a run (empty if none)."""
    found = []
    for name in MARKERS:
        path = Path(run_dir) / name
        if path.is_file() and (name != "metrics.jsonl" or path.stat().st_size > 0):
            found.append(path)
    return found


def clear_run(run_dir: Union[str, Path]) -> List[Path]:
    """Remove what a run wrote into ``run_dir`` (its checkpoint, per-epoch
    checkpoints, ``best.pt``, metrics and configuration) and nothing else.
    Returns the files removed."""
    run_dir = Path(run_dir)
    paths = [run_dir / name for name in WRITTEN] + sorted(run_dir.glob(EPOCH_CHECKPOINTS))
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def describe(paths: List[Path]) -> str:
    """The file names of ``paths``, comma-separated, for a message."""
    return ", ".join(p.name for p in paths)


__all__ = ["MARKERS", "existing_run", "clear_run", "describe"]

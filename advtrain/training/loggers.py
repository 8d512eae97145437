"""Per-epoch metrics in the formats other tools read, beside the run's
``metrics.jsonl``: a CSV table (spreadsheets, pandas) and TensorBoard scalars.

Both are Trainer callbacks that see every epoch's record once it is complete.
On a resumed run they start from the records the checkpoint brought back, so
the file holds the same epochs as ``metrics.jsonl``: epochs recorded after
the checkpoint (by the run that was interrupted) are dropped, not repeated.
"""
from __future__ import annotations

import csv
import io
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from .atomic import atomic_write_text
from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

LOG_FORMATS = ("csv", "tensorboard")
"""The formats :func:`metric_loggers` knows."""
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def _scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The record's real numbers (booleans and None left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class CSVLogger(Callback):
    """Keeps ``path`` a CSV table of the run's epochs: one row per epoch, one
    column per key any record has (empty where an epoch lacks it, e.g. the
    accuracies of an epoch without evaluation). The file is rewritten
    atomically after each epoch, so a crash never leaves half a row."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "advtrain.csv_log"

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.rows = [dict(r) for r in trainer.history]
        self._write()

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        self.rows.append(dict(record))
        self._write()

    def _write(self) -> None:
        columns: Dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in self.rows)
        atomic_write_text(self.path, text.getvalue(), what="CSV metrics")


class TensorBoardLogger(Callback):
    """Writes each epoch's numeric metrics as TensorBoard scalars under
    ``log_dir`` (step = the epoch number, from 1). Needs the ``tensorboard``
    package (``pip install advtrain[tensorboard]``). A resumed run purges the
    events of epochs after its checkpoint, so curves are not doubled."""

    def __init__(self, log_dir: Union[str, Path]) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Optional[Any] = None

    @property
    def name(self) -> str:
        return "advtrain.tensorboard_log"

    def on_fit_start(self, trainer: "Trainer") -> None:
        writer_class = tensorboard_writer()
        # Events at steps >= purge_step left by an earlier, interrupted run are dropped.
        self._writer = writer_class(str(self.log_dir), purge_step=len(trainer.history) + 1)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: Dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(record.get("epoch", epoch + 1))
        for key, value in _scalars(record).items():
            if key != "epoch":
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; ``ImportError`` saying what
    to install when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                          "(or pip install advtrain[tensorboard])") from None
    return SummaryWriter


def metric_loggers(formats: List[str], run_dir: Union[str, Path]) -> List[Callback]:
    """The callbacks writing ``formats`` (from :data:`LOG_FORMATS`) into
    ``run_dir``: ``metrics.csv`` and ``tensorboard/``. A missing tensorboard
    package is an ``ImportError`` here, before any training."""
    loggers: List[Callback] = []
    for fmt in formats:
        if fmt == "csv":
            loggers.append(CSVLogger(Path(run_dir) / CSV_NAME))
        elif fmt == "tensorboard":
            tensorboard_writer()
            loggers.append(TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR))
        else:
            raise ValueError(f"unknown log format {fmt!r}; known formats: {', '.join(LOG_FORMATS)}")
    return loggers


__all__ = ["CSVLogger", "LOG_FORMATS", "TensorBoardLogger", "metric_loggers", "tensorboard_writer"]

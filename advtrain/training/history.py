"""Per-epoch metrics: kept in memory and mirrored to a JSON-lines file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from .atomic import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class History(List[Dict[str, Any]]):
    """The list of per-epoch records of a run (``epoch``, losses, accuracies,
    times, policy metrics; the keys are listed in ``docs/api.md``). It is a
    ``list`` of plain dicts, so ``json.dumps(history)`` writes it as is.
    Non-finite floats are stored as None (JSON has no NaN). With ``path``,
    each record appended is also appended to that JSON-lines file."""

    def __init__(self, records: Optional[Iterable[Dict[str, Any]]] = None,
                 path: Union[str, Path, None] = None) -> None:
        super().__init__(dict(r) for r in (records or []))
        self.path = Path(path) if path is not None else None

    @property
    def records(self) -> List[Dict[str, Any]]:
        """The records, as a plain list (a copy)."""
        return list(self)

    @records.setter
    def records(self, records: Iterable[Dict[str, Any]]) -> None:
        self[:] = [dict(r) for r in records]

    def to_list(self) -> List[Dict[str, Any]]:
        """The records as a plain list of fresh dicts, e.g. to store or send."""
        return [dict(r) for r in self]

    def append(self, record: Dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        super().append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def extend(self, records: Iterable[Dict[str, Any]]) -> None:
        for record in records:
            self.append(record)

    def rewrite(self) -> None:
        """Make the file hold exactly the in-memory records (used on resume,
        dropping epochs recorded after the checkpoint being resumed), replacing
        it atomically through a uniquely named temporary file."""
        if self.path is None:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self), what="metrics file")

    def column(self, key: str) -> List[Any]:
        """Values of ``key`` per epoch (None where an epoch lacks it)."""
        return [r.get(key) for r in self]

    @classmethod
    def read(cls, path: Union[str, Path]) -> "History":
        """Load a JSON-lines metrics file."""
        with open(path) as f:
            return cls([json.loads(line) for line in f if line.strip()])

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"

"""Per-epoch metrics: kept in memory and mirrored to a JSON-lines file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from .atomic import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class History(Sequence[Dict[str, Any]]):
    """The list of per-epoch records of a run (``epoch``, losses, accuracies,
    times, policy metrics). With ``path``, each record is appended to that
    JSON-lines file as it arrives."""

    def __init__(self, records: Optional[List[Dict[str, Any]]] = None, path: Union[str, Path, None] = None) -> None:
        self.records: List[Dict[str, Any]] = [dict(r) for r in (records or [])]
        self.path = Path(path) if path is not None else None

    def append(self, record: Dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def rewrite(self) -> None:
        """Make the file hold exactly the in-memory records (used on resume,
        dropping epochs recorded after the checkpoint being resumed), replacing
        it atomically through a uniquely named temporary file."""
        if self.path is None:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records), what="metrics file")

    def column(self, key: str) -> List[Any]:
        """Values of ``key`` per epoch (None where an epoch lacks it)."""
        return [r.get(key) for r in self.records]

    @classmethod
    def read(cls, path: Union[str, Path]) -> "History":
        """Load a JSON-lines metrics file."""
        with open(path) as f:
            return cls([json.loads(line) for line in f if line.strip()])

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"

"""A dependency-free progress bar for the epoch loop.

On a terminal it redraws one line; elsewhere (CI logs, files) it prints a line
at every tenth of the work, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Dict, Optional


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Progress of ``total`` steps with a description and live metrics."""

    def __init__(self, total: int, desc: str = "", *, stream: Optional[IO[str]] = None, enabled: bool = True,
                 width: int = 24) -> None:
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self.metrics: Dict[str, str] = {}
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, n: int = 1, **metrics: float) -> None:
        """Advance by ``n`` steps; ``metrics`` (already host values) are shown."""
        self.count = min(self.count + n, self.total)
        for k, v in metrics.items():
            self.metrics[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        if not self.enabled:
            return
        if self._tty:
            self._draw("\r", "")
        else:
            decile = (10 * self.count) // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("", "\n")

    def close(self, **metrics: float) -> None:
        """Finish the bar, showing final ``metrics``."""
        for k, v in metrics.items():
            self.metrics[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        if self.enabled and (self._tty or self._last_decile != 10 or metrics):
            self._draw("\r" if self._tty else "", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        filled = (self.width * self.count) // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        extra = " ".join(f"{k}={v}" for k, v in self.metrics.items())
        line = (f"{self.desc} [{bar}] {self.count}/{self.total} {_fmt_time(elapsed)}<{_fmt_time(eta)} "
                f"{rate:.2f}it/s {extra}").rstrip()
        self.stream.write(prefix + line + suffix)
        self.stream.flush()

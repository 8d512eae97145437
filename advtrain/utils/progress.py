"""Progress bars (tqdm).

On a terminal a bar redraws one line in place; in a Jupyter notebook it is a
widget (``tqdm.auto``). Anywhere else — a CI log, a file, a pipe — redrawing
would fill the log, so a bar there writes whole lines, and only a few: one
when it starts, one at its first update (so a log shows the first step's
time at once) and at most ``LOG_LINES - 1`` more — one at each ninth of the
work, and one when it closes unless the last already shows the end —
whatever the number of steps or the time they take: at most
``LOG_LINES + 1`` lines in all. Rates below one step per second are shown
as seconds per step.
"""
from __future__ import annotations

import math
import sys
from typing import IO, Optional

from tqdm.asyncio import tqdm as console_auto_tqdm
from tqdm.auto import tqdm
from tqdm.std import tqdm as console_tqdm

LOG_LINES = 10
"""Lines a bar writes after its starting one when its stream is not a terminal, at most."""
BAR_FORMAT = "{desc} [{bar}] {n_fmt}/{total_fmt} {elapsed}<{remaining}, {rate_fmt}{postfix}"
"""How a bar is drawn: description, bar, steps done and due, time spent and
left, rate (steps per second, or seconds per step when slower), metrics."""

# tqdm.auto gives its console class unless it found a notebook front end.
_IN_NOTEBOOK = tqdm is not console_auto_tqdm


class _LineWriter:
    """A text stream for a bar on a stream that is not a terminal: tqdm
    starts every redraw with a carriage return and pads it with spaces; here
    each redraw becomes one line, and the bare carriage returns and newlines
    with which tqdm finishes or clears a bar are dropped."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(console_tqdm):
    """A bar for a stream that is not a terminal (wrapped in :class:`_LineWriter`)."""

    def update(self, n: float = 1) -> Optional[bool]:
        # The first update is always drawn: a slow run's log shows the time
        # per step right after the first one, not a ninth of the work later.
        first = not self.disable and self.last_print_n == self.initial and self.n == self.initial
        shown = super().update(n)
        if first and not shown and self.n != self.initial:
            self.refresh()
            self.last_print_n, self.last_print_t = self.n, self._time()
            return True
        return shown

    def close(self) -> None:
        # When the last progress line already shows the final count, closing
        # adds no second copy of it.
        if not self.disable and self.n == self.last_print_n:
            self.leave = False
        super().close()


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int, desc: str = "", *, enabled: bool = True, file: Optional[IO[str]] = None,
                 unit: str = "step", leave: bool = True) -> console_tqdm:
    """A tqdm bar over ``total`` steps, advanced with ``bar.update(n)``;
    metrics go in with ``bar.set_postfix({...}, refresh=False)`` right before
    an update, so they are drawn when the update is (a dict keeps their
    order). ``file`` defaults to ``sys.stderr``; ``leave=False`` removes the
    bar from a terminal when it closes (a line already written to a log
    stays). A disabled bar draws nothing and costs nothing."""
    if not enabled:
        return tqdm(total=total, disable=True)
    stream = sys.stderr if file is None else file
    if _IN_NOTEBOOK or _is_terminal(stream):
        return tqdm(total=total, desc=desc, file=stream, unit=unit, leave=leave, bar_format=BAR_FORMAT)
    # After the first, an update is drawn only after a ninth of the work
    # since the last drawn one (miniters, no time limit), so that the start,
    # the first update, these and the closing line are at most LOG_LINES + 1; maxinterval=inf keeps tqdm's monitor thread
    # from forcing extra draws of a slow bar; position=0 because lines in a
    # log never stack like bars on a terminal, even below one left open.
    return _LogBar(total=total, desc=desc, file=_LineWriter(stream), unit=unit, leave=leave, bar_format=BAR_FORMAT,
                   ascii=True, mininterval=0, maxinterval=math.inf, position=0,
                   miniters=max(1, math.ceil(total / (LOG_LINES - 1))))


__all__ = ["progress_bar", "LOG_LINES", "BAR_FORMAT"]

"""Atomic file writes: a crash or a full disk leaves either the old file or
the new one, never a truncated file. A failed write removes its temporary
file; :func:`remove_stale_temp_files` clears those of killed processes."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
#: How temporary files are named: ``.<target name>.<8 random characters>.tmp``
#: (the pattern of :func:`tempfile.mkstemp`), next to the target file.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class AtomicWriteError(OSError):
    """Writing a file failed (the disk is full, or another I/O error). The
    file's previous version, if any, is intact and no temporary file is left."""


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None], *, what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the
    same directory, which is flushed to disk and renamed over ``path``.
    ``what`` names the file in the error message (e.g. ``"checkpoint"``).

    Raises :class:`AtomicWriteError` when the writing fails with an
    ``OSError`` (or with another exception raised from or while handling
    one), after removing the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise AtomicWriteError(_failure_message(path, what, exc)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, _file_mode())  # mkstemp makes it private (0600); give it the usual mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(Path(tmp))
        cause = _os_error(exc)
        if cause is None or not isinstance(exc, Exception) or isinstance(exc, AtomicWriteError):
            raise  # an interrupt, or not a failed write
        raise AtomicWriteError(_failure_message(path, what, cause)) from exc
    _sync_directory(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, *, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what=what)


def remove_stale_temp_files(directory: PathLike) -> List[Path]:
    """Delete the temporary files that interrupted atomic writes left in
    ``directory`` (named like :data:`TEMP_NAME`) and return their paths. Call
    it only while no other process writes there (with the run directory's
    lock held)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if TEMP_NAME.match(entry.name) and entry.is_file():
            _remove(entry)
            removed.append(entry)
    return removed


def _os_error(exc: BaseException) -> Optional[OSError]:
    """``exc`` if it is an OSError, else the OSError it was raised from or
    while handling (``torch.save`` reports a failed write as a RuntimeError
    raised while handling the OSError)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, OSError):
            return candidate
    return None


def _failure_message(path: Path, what: str, cause: OSError) -> str:
    if cause.errno in _DISK_FULL:
        reason = f"the disk holding {path.parent} is full"
    else:
        reason = f"the write failed ({cause.strerror or cause})"
    previous = (f"the previous {what} {path} is intact" if path.exists()
                else f"there was no previous {what} at {path}")
    return f"could not write {what} {path}: {reason}; {previous} and no partial file was left"


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _sync_directory(directory: Path) -> None:
    """Flush the rename to disk (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["AtomicWriteError", "TEMP_NAME", "atomic_write", "atomic_write_text", "remove_stale_temp_files"]

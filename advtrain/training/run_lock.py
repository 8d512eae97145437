"""An exclusive lock on a run directory, so that one training at a time
writes its checkpoints and metrics there.

The lock is the file ``RUN_DIR/.advtrain.lock``, holding the PID, host and
start time of its holder. Where :mod:`fcntl` exists, the holder keeps an
``flock`` on it, which the kernel releases when the process ends however it
ends: a lock file left by a killed process is noticed (the file exists but
nobody holds its ``flock``) and taken over. Elsewhere the file is created
exclusively, and a leftover one is taken over when its PID no longer runs on
this host; a lock file from another host cannot be checked and is refused.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".advtrain.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class RunLockError(OSError):
    """The run directory is in use by another training process."""


class RunLock:
    """The lock of one run directory, taken by :meth:`acquire` and given up
    by :meth:`release` (or use :func:`lock_run_dir`)."""

    def __init__(self, run_dir: Union[str, Path]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock. Raises :class:`RunLockError` naming the holder's
        PID and host when another live process holds it; warns when it takes
        over a lock left by a process that ended without releasing it."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fd, previous = self._acquire_flock() if fcntl is not None else self._acquire_exclusive()
        try:
            _write_holder(self._fd)
        except BaseException:
            self.release()
            raise
        if previous:
            warnings.warn(f"run directory {self.run_dir}: took over the lock left by {_describe(previous)}, "
                          "which ended without releasing it (killed?)", stacklevel=3)

    def release(self) -> None:
        """Give the lock up and remove the lock file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # before unlocking: a waiting process then sees the file is gone
        finally:
            os.close(fd)

    def _acquire_flock(self) -> Tuple[int, Dict[str, Any]]:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in _BUSY:
                    raise RunLockError(self._busy_message(holder)) from None
                raise
            # The holder may have released (removed) the file between our open
            # and flock: then this lock is on a file nobody else will see.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
                return fd, _read_holder(fd)
            os.close(fd)

    def _acquire_exclusive(self) -> Tuple[int, Dict[str, Any]]:
        previous: Dict[str, Any] = {}
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), previous
            except FileExistsError:
                pass
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                holder = _read_holder(fd)
            finally:
                os.close(fd)
            if holder.get("host") != socket.gethostname():  # not recorded yet, or another host's: no check
                raise RunLockError(self._busy_message(holder) + f" (if no training runs there, delete {self.path})")
            if _pid_alive(int(holder.get("pid", -1))):
                raise RunLockError(self._busy_message(holder))
            previous = holder
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _busy_message(self, holder: Dict[str, Any]) -> str:
        return (f"run directory {self.run_dir} is in use by another training ({_describe(holder)}; lock file "
                f"{self.path}): wait for it to finish, or train into another directory")


_held: Dict[str, Tuple[RunLock, int]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def lock_run_dir(run_dir: Union[str, Path]) -> Iterator[RunLock]:
    """Hold the lock of ``run_dir`` for the block. Re-entrant within a
    process: an inner block on a directory this process already holds (the
    command line's ``train`` around ``Trainer.fit``) shares the lock."""
    key = os.path.realpath(run_dir)
    with _held_guard:
        lock, count = _held.get(key, (None, 0))
        if lock is None:
            lock = RunLock(run_dir)
            lock.acquire()
        _held[key] = (lock, count + 1)
    try:
        yield lock
    finally:
        with _held_guard:
            lock, count = _held[key]
            if count == 1:
                del _held[key]
                lock.release()
            else:
                _held[key] = (lock, count - 1)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return "a process whose PID is not recorded yet"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "lock_run_dir"]

"""The command line's one-line reports of problems the user can fix: a
``--device`` this machine does not have, the errors torch raises as
``RuntimeError`` for conditions outside the code (memory, disk, driver,
compiler) and bare operating-system errors. Each line says what is wrong and
what to do."""
from __future__ import annotations

import errno
from typing import Dict, Optional, Tuple

#: Device types advtrain trains and evaluates on.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def device_problem(text: Optional[str]) -> Optional[str]:
    """What is wrong with ``--device text`` on this machine, as one line that
    says what to do; ``None`` when the device exists (or ``text`` is
    ``None``, the default device)."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {text!r} is not a device name: use cpu, cuda or cuda:N (N a GPU index)"
    if device.type not in DEVICE_TYPES:
        return f"--device {text}: advtrain runs on {', '.join(DEVICE_TYPES)}, not {device.type}; use --device cpu"
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return (f"--device {text}: CUDA is not available in this torch build ({torch.__version__}, built "
                    "without CUDA): use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"--device {text}: no CUDA device is visible to torch {torch.__version__} (CUDA "
                    f"{torch.version.cuda or torch.version.hip}): use --device cpu, or check the GPU driver and "
                    "CUDA_VISIBLE_DEVICES")
        if device.index is not None and device.index >= count:
            return (f"--device {text}: this machine has {count} visible CUDA device(s), cuda:0 to "
                    f"cuda:{count - 1}: use one of those, or --device cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {text}: MPS (Apple GPU) is not available on this machine or torch build: use --device cpu"
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return f"--device {text}: no Intel GPU (XPU) is available to this torch build: use --device cpu"
    return None


# Fragments of torch's messages (lowercase) and what the user can do about
# each; the first that matches wins.
_RUNTIME_REMEDIES: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("out of memory", "can't allocate memory"),
     "lower --batch-size, use a smaller model, or free the memory other processes hold"),
    (("file write failed", "no space left on device", "disk quota exceeded"),
     "free disk space, or write the run to another disk with --out"),
    (("invalid device ordinal",),
     "pick a visible GPU with --device cuda:N, or use --device cpu"),
    (("found no nvidia driver", "driver version is insufficient", "no cuda gpus are available",
      "no kernel image is available", "cuda driver"),
     "this GPU setup cannot run the installed torch: use --device cpu, or install a torch build that matches "
     "the driver and GPU"),
)

_COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


def runtime_error_line(exc: RuntimeError, compiled: bool = False) -> Optional[str]:
    """One line for a ``RuntimeError`` from torch that the user can fix —
    torch's own first line, then what to do — or ``None`` when it is not one
    of those (a bug, whose traceback should be seen). ``compiled``: the
    command ran with ``--compile``, so a compiler failure can be avoided by
    running without it."""
    message = " ".join(str(exc).split())
    detail = (message[:200] + "...") if len(message) > 200 else (message or type(exc).__name__)
    lowered = message.lower()
    for fragments, remedy in _RUNTIME_REMEDIES:
        if any(fragment in lowered for fragment in fragments):
            return f"{detail}: {remedy}"
    if compiled and type(exc).__module__.startswith(_COMPILER_MODULES):
        return f"torch.compile failed ({type(exc).__name__}: {detail}): run without --compile"
    return None


_DISK = "free disk space, or write the run to another disk with --out"
_ERRNO_REMEDIES: Dict[int, str] = {
    errno.ENOSPC: _DISK,
    getattr(errno, "EDQUOT", errno.ENOSPC): _DISK,
    errno.EACCES: "choose a path you may write to (e.g. another --out) or fix its permissions",
    errno.EPERM: "choose a path you may write to (e.g. another --out) or fix its permissions",
    errno.EROFS: "the file system is read-only: write to another place with --out",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file, not a directory",
    errno.EISDIR: "check the path: it names a directory where a file is expected",
}


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError``: its message and, for an error straight
    from the operating system (one with an ``errno``), what to do about it.
    advtrain's own OSErrors already say so and are kept as they are."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    remedy = _ERRNO_REMEDIES.get(exc.errno) if exc.errno is not None else None
    return f"{text}: {remedy}" if remedy else text


__all__ = ["DEVICE_TYPES", "device_problem", "os_error_line", "runtime_error_line"]

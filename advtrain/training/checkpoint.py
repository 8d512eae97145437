"""Checkpoint files: written atomically, only with finite values, with a
SHA-256 checksum of their contents that is verified on load; loaded with
``torch.load(weights_only=True)``."""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Tuple, Union

import torch
from torch import Tensor

from .atomic import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "advtrain-checkpoint"
#: Format version written. Version 1 (advtrain before checksums) is still
#: read, without verification: it stores no checksum.
VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Keys of the file's header, next to the saved state's own keys.
HEADER_KEYS = ("format", "version", "sha256")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, or does not fit the run."""


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint was refused because some of its floating-point tensors
    hold inf or NaN (the run diverged). ``entries`` names them."""

    def __init__(self, message: str, entries: List[str]) -> None:
        super().__init__(message)
        self.entries = entries


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts, lists and tuples of tensors and plain
    values) to ``path`` atomically: a crash or a full disk leaves either the
    old file or the new one, never a truncated file or a temporary one.
    Returns the path.

    Raises :class:`NonFiniteCheckpointError` (nothing is written) when a
    floating-point tensor of ``state`` holds inf or NaN, and
    :class:`~advtrain.training.atomic.AtomicWriteError` (an ``OSError``)
    when the write fails, e.g. on a full disk."""
    path = Path(path)
    clash = [k for k in HEADER_KEYS if k in state]
    if clash:
        raise ValueError(f"state must not use the checkpoint header keys {clash}")
    bad = non_finite_entries(state)
    if bad:
        raise NonFiniteCheckpointError(f"refused to write checkpoint {path}: non-finite values in "
                                       f"{_list(bad)}", bad)
    payload = {"format": FORMAT, "version": VERSION, "sha256": state_checksum(state), **state}

    def write(f: IO[bytes]) -> None:
        torch.save(payload, f)

    return atomic_write(path, write, what="checkpoint")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain
    containers only: ``weights_only=True``) and verify its checksum. Raises
    :class:`CheckpointError` naming the file when it is missing, unreadable,
    damaged (its contents do not match its checksum) or not an advtrain
    checkpoint. The returned dict holds the saved state and the header keys
    ``format``, ``version`` and (from version 2 on) ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an advtrain checkpoint")
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this advtrain reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (a newer advtrain wrote it?)")
    if version >= 2:
        content = {k: v for k, v in state.items() if k not in HEADER_KEYS}
        if state.get("sha256") != state_checksum(content):
            raise CheckpointError(
                f"checkpoint {path} is damaged: its contents do not match the checksum written with it (the file "
                "changed on disk after it was written); use another copy or checkpoint, or train again")
    return state


def state_checksum(state: Any) -> str:
    """SHA-256 (hex) of a nested state: its structure, keys, plain values and
    the bytes, dtypes and shapes of its tensors (tensors on any device)."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def non_finite_entries(state: Any) -> List[str]:
    """Names (``model.bn1.running_var``, ``optimizer.state.3.momentum_buffer``)
    of the floating-point tensors in a nested state that hold inf or NaN.

    The check is one fused reduction per device (the L1 norms of all tensors,
    in float32, float64 ones in float64, by ``torch._foreach_norm``) and one
    host synchronisation; tensors are named one by one only when that
    reduction is not finite."""
    named = list(_floating_tensors(state))
    groups: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = defaultdict(list)
    for _, t in named:
        groups[(t.device, t.dtype)].append(t)
    per_device: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for (device, dtype), tensors in groups.items():
        # torch refuses to narrow float64 tensors (a float64 model, ELLE-A's
        # running statistics) into a float32 norm
        norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        per_device[device].extend(n.float() for n in torch._foreach_norm(tensors, 1, dtype=norm_dtype))
    if all(bool(torch.stack(norms).isfinite().all()) for norms in per_device.values()):
        return []
    # The norms may also overflow for huge finite values: name only real inf/NaN.
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


def _floating_tensors(state: Any, prefix: str = "") -> Iterator[Tuple[str, Tensor]]:
    if isinstance(state, Tensor):
        if state.is_floating_point() or state.is_complex():
            yield prefix, state.detach()
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _floating_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _feed(h: Any, value: Any) -> None:
    """Feed ``value`` to hash ``h`` unambiguously: a type tag, then a length
    and the bytes of each part."""
    def token(tag: bytes, data: bytes) -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    if isinstance(value, Tensor):
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        token(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        token(b"{", str(len(value)).encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        token(b"[" if isinstance(value, list) else b"(", str(len(value)).encode())
        for item in value:
            _feed(h, item)
    else:
        token(b"V", f"{type(value).__name__}:{value!r}".encode())


def _list(names: List[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


__all__ = ["CheckpointError", "NonFiniteCheckpointError", "load_checkpoint", "non_finite_entries",
           "save_checkpoint", "state_checksum"]

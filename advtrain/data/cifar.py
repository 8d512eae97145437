"""CIFAR-10 and CIFAR-100 readers for the official "python version" release,
with an opt-in, verified download.

Layout read (as published at https://www.cs.toronto.edu/~kriz/cifar.html)::

    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    ROOT/cifar-100-python/{train, test, meta}

Each data file is a pickled dict whose ``data`` entry is a uint8 array of
shape (n, 3072): one row per image, the red plane (32x32, row-major) first,
then green, then blue, so a row reshapes directly to (3, 32, 32) CHW. Files
written by Python 2 (the official ones) and by Python 3 (``str`` or ``bytes``
keys) are both accepted. Unpickling is restricted to plain containers and
numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import os
import pickle
import shutil
import http.client
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..utils.pixels import to_pixels

PathLike = Union[str, os.PathLike]


class ArrayDataset(Dataset):
    """A labelled image split held in memory as tensors.

    ``images``: uint8 (N, C, H, W), pixel values 0..255. ``labels``: int64 (N,),
    class indices in ``[0, len(classes))`` when ``classes`` is given.
    ``classes``: class names (may be empty). Indexing returns ``(image,
    label)`` with the image as float32 (C, H, W) in [0, 1] and the label as a
    Python int, like a torchvision dataset with ``ToTensor()``. A dataset
    holds at least one example: an empty one is refused here, where it is
    built, rather than later by whatever trains or evaluates on it.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str] = ()) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                "images must be a uint8 tensor of shape (N, C, H, W), got "
                + (
                    f"{images.dtype} {tuple(images.shape)}"
                    if isinstance(images, Tensor)
                    else type(images).__name__
                )
            )
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise TypeError(
                "labels must be an int64 tensor of shape (N,), got "
                + (
                    f"{labels.dtype} {tuple(labels.shape)}"
                    if isinstance(labels, Tensor)
                    else type(labels).__name__
                )
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"images and labels differ in length: {images.shape[0]} images, "
                f"{labels.shape[0]} labels"
            )
        if images.shape[0] == 0:
            raise ValueError("images is empty (0 examples): an ArrayDataset needs at least one image and label")
        self.classes: List[str] = [str(c) for c in classes]
        if labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or (self.classes and hi >= len(self.classes)):
                raise ValueError(
                    f"labels lie in [{lo}, {hi}], outside [0, {len(self.classes) - 1}] "
                    f"for {len(self.classes)} classes"
                )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return to_pixels(self.images[i]), int(self.labels[i])

    def subset(self, indices: Union[int, Sequence[int], Tensor]) -> "ArrayDataset":
        """The examples at ``indices`` (an int ``n`` means the first ``n``), as a
        new dataset with the same class names."""
        if isinstance(indices, int):
            idx: Union[slice, Tensor] = slice(0, indices)
        else:
            idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        images = self.images[idx]
        if images.shape[0] == 0:
            raise ValueError(f"indices select no examples of the {len(self)} (got {indices!r:.80}): "
                             "a dataset needs at least one")
        return ArrayDataset(images, self.labels[idx], self.classes)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ArrayDataset({len(self)} images of shape {shape}, {len(self.classes)} classes)"


@dataclass(frozen=True)
class _Source:
    """Where a release is published and what it unpacks to."""

    url: str
    md5: str
    folder: str


_SOURCES: Dict[str, _Source] = {
    "cifar10": _Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
    ),
    "cifar100": _Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
    ),
}

_DOWNLOAD_TIMEOUT_S = 60.0
# What a failed fetch raises (a refused connection, no DNS, a timeout, an
# HTTP error status, a dropped connection), as opposed to a local write error.
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


class DatasetNotFoundError(FileNotFoundError):
    """The release folder of a dataset is not under the given root.

    ``root``: the directory searched; ``folder``: the release folder expected
    in it (e.g. ``cifar-10-batches-py``); ``url``: where the release is
    published. The message says how to fetch it from Python
    (``download=True``); a front end can reword it from these attributes."""

    def __init__(self, message: str, root: str, folder: str, url: str) -> None:
        super().__init__(message)
        self.root, self.folder, self.url = root, folder, url


class DownloadError(OSError):
    """Fetching a dataset archive failed (no network, an HTTP error, a
    timeout). The message names the URL and how to place the release by hand."""
_CHUNK_BYTES = 1 << 20


def cifar10(root: PathLike, train: bool = True, download: bool = False) -> ArrayDataset:
    """Read CIFAR-10 (50,000 training or 10,000 test images, 10 classes).

    ``root`` is a directory holding ``cifar-10-batches-py/``, or that folder
    itself. With ``download=True`` and the folder absent, the official archive
    (about 163 MB) is fetched into ``root``, its MD5 checked, and extracted.
    Returns uint8 (N, 3, 32, 32) images, int64 labels in [0, 9] and the class
    names from ``batches.meta``.
    """
    folder = _locate(root, _SOURCES["cifar10"], download, marker="batches.meta")
    files = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    parts = [_read_split(os.path.join(folder, name), "labels", 10) for name in files]
    meta = _load_pickle(os.path.join(folder, "batches.meta"))
    classes = _class_names(meta, "label_names", 10, os.path.join(folder, "batches.meta"))
    return _concat(parts, classes)


def cifar100(
    root: PathLike, train: bool = True, download: bool = False, coarse: bool = False
) -> ArrayDataset:
    """Read CIFAR-100 (50,000 training or 10,000 test images).

    ``root`` is a directory holding ``cifar-100-python/``, or that folder
    itself; ``download`` as in :func:`cifar10` (archive about 161 MB).
    Labels are the 100 fine classes, or the 20 superclasses with
    ``coarse=True``; ``classes`` holds the matching names from ``meta``.
    """
    folder = _locate(root, _SOURCES["cifar100"], download, marker="meta")
    key, meta_key, num_classes = (
        ("coarse_labels", "coarse_label_names", 20)
        if coarse
        else ("fine_labels", "fine_label_names", 100)
    )
    part = _read_split(os.path.join(folder, "train" if train else "test"), key, num_classes)
    meta = _load_pickle(os.path.join(folder, "meta"))
    classes = _class_names(meta, meta_key, num_classes, os.path.join(folder, "meta"))
    return _concat([part], classes)


def _locate(root: PathLike, source: _Source, download: bool, marker: str) -> str:
    """The release folder under ``root`` (or ``root`` itself), downloading it first if asked."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    nested = os.path.join(root, source.folder)
    if os.path.isdir(nested):
        return nested
    if os.path.isfile(os.path.join(root, marker)):
        return root
    if download:
        _download(source, root)
        return nested
    raise DatasetNotFoundError(
        f"no {source.folder} folder found at {nested} (nor a {marker} file in {root}); "
        f"pass download=True to fetch {source.url}, or point root at a directory holding "
        f"the official python-version release unpacked as {source.folder}/",
        root=root, folder=source.folder, url=source.url,
    )


def _download(source: _Source, root: str) -> None:
    """Fetch ``source.url`` into ``root``, verify its MD5 and extract it safely.

    The archive goes to a temporary file that is deleted afterwards (and on
    any failure); extraction happens in a temporary folder that is moved into
    place only when complete, so an interrupted run leaves no half-written
    release behind.
    """
    os.makedirs(root, exist_ok=True)
    fd, archive = tempfile.mkstemp(prefix=".download-", suffix=".tar.gz", dir=root)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(source.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    while True:
                        chunk = response.read(_CHUNK_BYTES)
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
            except _NETWORK_ERRORS as exc:
                reason = getattr(exc, "reason", None) if not isinstance(exc, urllib.error.HTTPError) else None
                raise DownloadError(
                    f"cannot download {source.url}: {reason or exc}; without network access, fetch that "
                    f"archive on another machine and unpack it by hand so that {root}/{source.folder}/ "
                    f"holds the release (tar xzf {os.path.basename(source.url)} -C {root})"
                ) from exc
        if digest.hexdigest() != source.md5:
            raise ValueError(
                f"MD5 mismatch for {source.url}: expected {source.md5}, got {digest.hexdigest()}; "
                "the download is corrupt or was tampered with and has been deleted"
            )
        staging = tempfile.mkdtemp(prefix=".extract-", dir=root)
        try:
            _safe_extract(archive, staging)
            unpacked = os.path.join(staging, source.folder)
            if not os.path.isdir(unpacked):
                raise ValueError(
                    f"archive from {source.url} does not contain the expected folder "
                    f"{source.folder}/"
                )
            os.replace(unpacked, os.path.join(root, source.folder))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if os.path.exists(archive):
            os.remove(archive)


def _safe_extract(archive: str, dest: str) -> None:
    """Extract a tar archive into ``dest``, refusing the whole archive if any
    member is a link, a device or FIFO, or would land outside ``dest``."""
    dest_real = os.path.realpath(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise ValueError(
                    f"refusing to extract {archive}: member {m.name!r} is a link or special file"
                )
            target = os.path.realpath(os.path.join(dest_real, m.name))
            if os.path.isabs(m.name) or os.path.commonpath([dest_real, target]) != dest_real:
                raise ValueError(
                    f"refusing to extract {archive}: member {m.name!r} would be written "
                    f"outside {dest}"
                )
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest_real, members=members, filter="data")
        else:
            tar.extractall(dest_real, members=members)


def _numpy_attr(modules: Sequence[str], name: str) -> Optional[Any]:
    """``name`` from the first importable module of ``modules`` (numpy moved
    ``numpy.core`` to ``numpy._core`` in 2.0)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """The globals a CIFAR pickle may name: numpy array and scalar
    reconstruction (under both numpy 1 and numpy 2 module names) and the
    ``codecs.encode`` that protocol-2 pickles use for raw bytes."""
    allowed: Dict[Tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    for name in ("_reconstruct", "scalar"):
        obj = _numpy_attr(multiarray, name)
        allowed.update({(module, name): obj for module in multiarray if obj is not None})
    frombuffer = _numpy_attr(numeric, "_frombuffer")
    allowed.update(
        {(module, "_frombuffer"): frombuffer for module in numeric if frombuffer is not None}
    )
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays only."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return obj


def _load_pickle(path: str) -> Dict[str, Any]:
    """Load one official-format file as a dict with ``str`` keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"missing {path}: the release folder is incomplete; delete it and pass download=True, "
            "or restore the official python-version files"
        )
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} should hold a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read_split(path: str, label_key: str, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 from one data file."""
    d = _load_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{path} has no {key!r} entry (found {sorted(d)})")
    data = d["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        what = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(f"{path}: 'data' should be a uint8 array of shape (n, 3072), got a {what}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {label_key!r} is not a list of integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: {label_key!r} holds values in [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes - 1}]"
        )
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.copy())


def _class_names(meta: Mapping[str, Any], key: str, num_classes: int, path: str) -> List[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise ValueError(
            f"{path}: {key!r} should list {num_classes} class names, got {names!r:.200}"
        )
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _concat(parts: Sequence[Tuple[Tensor, Tensor]], classes: Sequence[str]) -> ArrayDataset:
    images = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ArrayDataset(images, labels, classes)


__all__ = ["ArrayDataset", "DatasetNotFoundError", "DownloadError", "cifar10", "cifar100"]

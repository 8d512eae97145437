"""Tests for advtrain.data: CIFAR readers and download, batched augmentation
and its inverse, the device loader and its input paths.

References in these tests are computed per example with plain Python loops,
independently of the batched index arithmetic under test.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from advtrain.data import (
    ArrayDataset,
    Augmentation,
    Batch,
    DatasetNotFoundError,
    DeviceLoader,
    DownloadError,
    apply_augmentation,
    as_tensors,
    cifar10,
    cifar100,
    crop_padded,
    paste_padded,
    random_crop_flip,
)
from advtrain.data import cifar as cifar_module

CLASSES10 = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# ----------------------------------------------------------------- fake release
def _rows(hwc: np.ndarray) -> np.ndarray:
    """Official row layout of (n, 32, 32, 3) images: the red plane row by row,
    then green, then blue: 3072 values per image."""
    return np.concatenate([hwc[..., c].reshape(len(hwc), 1024) for c in range(3)], axis=1)


def _chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))


def _dump(obj: dict, path: Path, numpy1_names: bool) -> None:
    raw = pickle.dumps(obj, protocol=2)
    if numpy1_names:  # as in the official files, written under numpy 1.x
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)


def write_fake_cifar10(
    folder: Path,
    sizes: Sequence[int] = (3, 2, 4, 1, 2),
    n_test: int = 5,
    bytes_keys: bool = False,
    numpy1_names: bool = False,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Write a tiny CIFAR-10 release in the official format; return the
    expected (CHW uint8 images, int64 labels) of each split."""
    key: Callable[[str], object] = (lambda s: s.encode("latin1")) if bytes_keys else (lambda s: s)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, (sum(sizes), 32, 32, 3), dtype=np.uint8)
    train_labels = rng.integers(0, 10, sum(sizes))
    start = 0
    for b, size in enumerate(sizes, start=1):
        part = slice(start, start + size)
        _dump(
            {
                key("batch_label"): key(f"training batch {b} of 5"),
                key("data"): _rows(train[part]),
                key("labels"): train_labels[part].tolist(),
                key("filenames"): [key(f"img_{i}.png") for i in range(size)],
            },
            folder / f"data_batch_{b}",
            numpy1_names,
        )
        start += size
    test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test)
    _dump(
        {
            key("batch_label"): key("testing batch 1 of 1"),
            key("data"): _rows(test),
            key("labels"): test_labels.tolist(),
        },
        folder / "test_batch",
        numpy1_names,
    )
    _dump(
        {
            key("label_names"): [key(c) for c in CLASSES10],
            key("num_cases_per_batch"): sizes[0],
            key("num_vis"): 3072,
        },
        folder / "batches.meta",
        numpy1_names,
    )
    return {
        "train": (_chw(train), torch.from_numpy(train_labels)),
        "test": (_chw(test), torch.from_numpy(test_labels)),
    }


def _tar(path: Path, add: Callable[[tarfile.TarFile], None]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _serve(monkeypatch: pytest.MonkeyPatch, archive: Path, md5: str) -> None:
    """Point the CIFAR-10 download at a local file:// archive."""
    monkeypatch.setitem(
        cifar_module._SOURCES,
        "cifar10",
        cifar_module._Source(url=archive.as_uri(), md5=md5, folder="cifar-10-batches-py"),
    )


# --------------------------------------------------------------------- readers
@pytest.mark.parametrize("bytes_keys,numpy1_names", [(False, False), (True, True)])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_reads_official_layout(tmp_path, bytes_keys, numpy1_names, point_at_folder):
    folder = tmp_path / "cifar-10-batches-py"
    expected = write_fake_cifar10(folder, bytes_keys=bytes_keys, numpy1_names=numpy1_names)
    root = folder if point_at_folder else tmp_path
    for split, train in (("train", True), ("test", False)):
        ds = cifar10(root, train=train)
        images, labels = expected[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == images.shape
        assert torch.equal(ds.images, images)  # rows are R, G, B planes -> CHW
        assert ds.labels.dtype == torch.int64 and torch.equal(ds.labels, labels)
        assert ds.classes == CLASSES10
    assert len(cifar10(root)) == 12 and len(cifar10(root, train=False)) == 5


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, 6), rng.integers(0, 20, 6)
    for name in ("train", "test"):
        _dump(
            {"data": _rows(hwc), "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist()},
            folder / name,
            numpy1_names=False,
        )
    fine_names, coarse_names = [f"fine{i}" for i in range(100)], [f"coarse{i}" for i in range(20)]
    _dump(
        {"fine_label_names": fine_names, "coarse_label_names": coarse_names},
        folder / "meta",
        numpy1_names=False,
    )
    ds = cifar100(tmp_path, train=False)
    assert torch.equal(ds.images, _chw(hwc)) and torch.equal(ds.labels, torch.from_numpy(fine))
    assert ds.classes == fine_names
    ds = cifar100(folder, coarse=True)
    assert torch.equal(ds.labels, torch.from_numpy(coarse)) and ds.classes == coarse_names


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)
    assert "download=True" in str(err.value)


def test_missing_batch_file_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar10(tmp_path)
    assert len(cifar10(tmp_path, train=False)) == 5


class _RunsCode:
    """Unpickling this calls ``os.mkdir(path)``: what a tampered file could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize(
    "corruption",
    ["truncated", "wrong_row_length", "label_count", "label_range", "not_a_dict", "code_execution"],
)
def test_corrupt_file_raises_value_error(tmp_path, corruption):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar10(folder)
    target = folder / "test_batch"
    five = np.zeros((5, 3072), np.uint8)
    if corruption == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif corruption == "wrong_row_length":
        _dump({"data": np.zeros((5, 3000), np.uint8), "labels": [0] * 5}, target, False)
    elif corruption == "label_count":
        _dump({"data": five, "labels": [0] * 4}, target, False)
    elif corruption == "label_range":
        _dump({"data": five, "labels": [0, 1, 2, 3, 10]}, target, False)
    elif corruption == "not_a_dict":
        _dump([five], target, False)  # type: ignore[arg-type]
    else:
        target.write_bytes(
            pickle.dumps({"data": _RunsCode(tmp_path / "pwned"), "labels": []}, protocol=2)
        )
    with pytest.raises(ValueError, match="test_batch"):
        cifar10(tmp_path, train=False)
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------- download
def test_download_fetches_verifies_and_extracts(tmp_path, monkeypatch):
    expected = write_fake_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = _tar(
        archive,
        lambda tar: tar.add(
            tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py"
        ),
    )
    _serve(monkeypatch, archive, md5)
    root = tmp_path / "data"
    ds = cifar10(root, train=False, download=True)
    assert torch.equal(ds.images, expected["test"][0]) and torch.equal(
        ds.labels, expected["test"][1]
    )
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py"]  # no archive or staging left behind
    archive.unlink()  # already present: no second fetch
    assert len(cifar10(root, download=True)) == 12


def test_download_md5_mismatch_is_refused_and_deleted(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = _tar(
        archive,
        lambda tar: tar.add(
            tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py"
        ),
    )
    _serve(monkeypatch, archive, "0" * 32 if md5 != "0" * 32 else "1" * 32)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 mismatch"):
        cifar10(root, download=True)
    assert os.listdir(root) == []


@pytest.mark.parametrize(
    "attack", ["parent_traversal", "absolute_path", "symlink", "hardlink", "device"]
)
def test_download_refuses_unsafe_archive_members(tmp_path, monkeypatch, attack):
    write_fake_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    root = tmp_path / "data" / "root"
    outside = tmp_path / "data" / "evil"

    def add(tar: tarfile.TarFile) -> None:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if attack == "parent_traversal":
            _add_bytes(tar, "cifar-10-batches-py/../../evil", b"x")
        elif attack == "absolute_path":
            _add_bytes(tar, str(outside), b"x")
        else:
            info = tarfile.TarInfo("cifar-10-batches-py/link")
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "device": tarfile.CHRTYPE,
            }[attack]
            info.linkname = str(outside)
            tar.addfile(info)

    archive = tmp_path / "bad.tar.gz"
    _serve(monkeypatch, archive, _tar(archive, add))
    with pytest.raises(ValueError, match="refusing to extract"):
        cifar10(root, download=True)
    assert not outside.exists()
    assert os.listdir(root) == []  # nothing extracted, archive deleted


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every download fail as it does without network access."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(cifar_module.urllib.request, "urlopen", refuse)


def test_offline_download_names_the_url_and_how_to_place_the_folder(tmp_path, monkeypatch):
    _offline(monkeypatch)
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as err:
        cifar10(root, download=True)
    message = str(err.value)
    assert cifar_module._SOURCES["cifar10"].url in message and "Name or service not known" in message
    assert f"{root}/cifar-10-batches-py/" in message and "tar xzf cifar-10-python.tar.gz" in message
    assert isinstance(err.value, OSError) and isinstance(err.value.__cause__, urllib.error.URLError)
    assert os.listdir(root) == []  # the temporary archive is deleted


def test_an_http_error_status_is_a_download_error(tmp_path, monkeypatch):
    def not_found(url, *args, **kwargs):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(cifar_module.urllib.request, "urlopen", not_found)
    with pytest.raises(DownloadError, match="HTTP Error 404"):
        cifar10(tmp_path, download=True)


def test_a_missing_release_carries_what_a_front_end_needs_to_reword_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        cifar10(tmp_path)
    assert err.value.root == str(tmp_path) and err.value.folder == "cifar-10-batches-py"
    assert err.value.url == cifar_module._SOURCES["cifar10"].url


def _cli_error(capsys, *argv: str) -> str:
    from advtrain import cli

    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_the_cli_names_download_not_the_python_argument(tmp_path, capsys):
    err = _cli_error(capsys, "train", "--data", str(tmp_path), "--epochs", "1")
    assert "--download" in err and "download=True" not in err and "cifar-10-batches-py/" in err


def test_the_cli_reports_an_offline_download_in_one_line(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    err = _cli_error(capsys, "train", "--data", str(tmp_path / "data"), "--download", "--epochs", "1")
    assert cifar_module._SOURCES["cifar10"].url in err and "unpack it by hand" in err


# ---------------------------------------------------------------- ArrayDataset
def test_array_dataset_items_and_validation():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    labels = torch.tensor([0, 2, 1, 2])
    ds = ArrayDataset(images, labels, ["a", "b", "c"])
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, 5, 6) and y == 2 and isinstance(y, int)
    assert torch.equal(x * 255, images[1].float())
    sub = ds.subset(2)
    assert len(sub) == 2 and torch.equal(sub.labels, labels[:2]) and sub.classes == ds.classes
    assert torch.equal(ds.subset([3, 0]).images, images[[3, 0]])
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(images, torch.tensor([0, 1, 2, 3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="length"):
        ArrayDataset(images, labels[:3])
    with pytest.raises(TypeError, match="uint8"):
        ArrayDataset(images.float(), labels)


def test_an_empty_array_dataset_is_refused_as_empty():
    empty = (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"images is empty \(0 examples\)"):
        ArrayDataset(*empty, ["a", "b"])
    ds = ArrayDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    for indices in (0, [], torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match="indices select no examples of the 4"):
            ds.subset(indices)


# ---------------------------------------------------------------- augmentation
def _reference_crop(
    x: torch.Tensor, top: int, left: int, flip: bool, padding: int, fill: float = 0.0
) -> torch.Tensor:
    """One image (C, H, W): pad with ``fill``, cut the window, mirror."""
    c, h, w = x.shape
    padded = torch.full((c, h + 2 * padding, w + 2 * padding), fill, dtype=x.dtype)
    padded[:, padding : padding + h, padding : padding + w] = x
    out = padded[:, top : top + h, left : left + w]
    return out.flip(-1) if flip else out


def _reference_batch(x: torch.Tensor, aug: Augmentation, fill: float = 0.0) -> torch.Tensor:
    return torch.stack(
        [
            _reference_crop(
                x[i], int(aug.top[i]), int(aug.left[i]), bool(aug.flip[i]), aug.padding, fill
            )
            for i in range(x.shape[0])
        ]
    )


def _border(aug: Augmentation, h: int, w: int) -> torch.Tensor:
    """(N, 1, H, W) mask of the batch pixels that come from the padded border."""
    mask = torch.zeros(aug.top.shape[0], 1, h, w, dtype=torch.bool)
    p = aug.padding
    for i in range(aug.top.shape[0]):
        for r in range(h):
            for c in range(w):
                col = int(aug.left[i]) + (w - 1 - c if bool(aug.flip[i]) else c)
                row = int(aug.top[i]) + r
                mask[i, 0, r, c] = not (p <= row < p + h and p <= col < p + w)
    return mask


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_reference_and_is_reproducible(dtype):
    x = torch.randint(0, 256, (64, 3, 10, 7), dtype=torch.uint8).to(dtype)
    out, aug = random_crop_flip(x, padding=3, generator=torch.Generator().manual_seed(5))
    assert out.dtype == dtype and out.shape == x.shape
    assert aug.top.dtype == torch.int64 and aug.flip.dtype == torch.bool and aug.padding == 3
    assert torch.equal(out, _reference_batch(x, aug))
    assert torch.equal(apply_augmentation(x, aug), out)
    again, aug2 = random_crop_flip(x, padding=3, generator=torch.Generator().manual_seed(5))
    assert (
        torch.equal(again, out)
        and torch.equal(aug2.top, aug.top)
        and torch.equal(aug2.flip, aug.flip)
    )


@pytest.mark.parametrize("fill", [0.0, 0.5, 1.0])
def test_augmentation_pads_with_the_fill_value(fill):
    x = torch.rand(16, 2, 5, 6, generator=torch.Generator().manual_seed(1))
    out, aug = random_crop_flip(x, padding=3, generator=torch.Generator().manual_seed(2), fill=fill)
    border = _border(aug, 5, 6).expand_as(out)
    assert border.any() and (~border).any()
    assert torch.equal(out[border], torch.full_like(out[border], fill))  # exactly the fill
    assert torch.equal(out, _reference_batch(x, aug, fill))
    # uint8 images hold a fill that is a level k/255, and only such a fill
    levels = (x * 255).round().to(torch.uint8)
    white = apply_augmentation(levels, aug, fill=1.0)
    assert torch.equal(white[border], torch.full_like(white[border], 255))
    with pytest.raises(ValueError, match="level k/255"):
        apply_augmentation(levels, aug, fill=0.5)
    for bad, error in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                       ("0.5", TypeError), (True, TypeError)):
        with pytest.raises(error, match="fill"):
            apply_augmentation(x, aug, fill=bad)


def test_random_crop_flip_draws_every_offset_and_both_flips():
    _, aug = random_crop_flip(
        torch.zeros(4000, 1, 4, 4), padding=4, generator=torch.Generator().manual_seed(0)
    )
    for offsets in (aug.top, aug.left):
        counts = torch.bincount(offsets, minlength=9)
        assert counts.numel() == 9 and int(counts.min()) > 300  # ~444 each, uniform on [0, 8]
    assert 0.45 < aug.flip.float().mean().item() < 0.55


def _reference_paste(store: torch.Tensor, values: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    out = store.clone()
    h, w = values.shape[2:]
    for i in range(store.shape[0]):
        v = values[i].flip(-1) if bool(aug.flip[i]) else values[i]
        t, left = int(aug.top[i]), int(aug.left[i])
        out[i, :, t : t + h, left : left + w] = v
    return out


def _reference_read(store: torch.Tensor, aug: Augmentation, h: int, w: int) -> torch.Tensor:
    rows = []
    for i in range(store.shape[0]):
        t, left = int(aug.top[i]), int(aug.left[i])
        window = store[i, :, t : t + h, left : left + w]
        rows.append(window.flip(-1) if bool(aug.flip[i]) else window)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
def test_paste_then_crop_against_per_example_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    n, c, h, w, p = 32, 2, 6, 5, 2
    store = torch.randint(0, 200, (n, c, h + 2 * p, w + 2 * p), generator=gen).to(dtype)
    values = torch.randint(0, 200, (n, c, h, w), generator=gen).to(dtype)
    _, aug = random_crop_flip(torch.zeros(n, c, h, w), padding=p, generator=gen)
    _, aug2 = random_crop_flip(torch.zeros(n, c, h, w), padding=p, generator=gen)
    before = store.clone()

    pasted = paste_padded(store, values, aug)
    assert pasted.dtype == dtype and torch.equal(store, before)  # out of place
    assert torch.equal(pasted, _reference_paste(store, values, aug))
    # the border outside each crop window keeps its old value
    inside = torch.zeros(n, 1, h + 2 * p, w + 2 * p, dtype=torch.bool)
    for i in range(n):
        inside[
            i, :, int(aug.top[i]) : int(aug.top[i]) + h, int(aug.left[i]) : int(aug.left[i]) + w
        ] = True
    assert torch.equal(torch.where(inside, store, pasted), store)

    assert torch.equal(crop_padded(pasted, aug), values)  # exact inverse on the window
    read = crop_padded(pasted, aug2)
    assert read.dtype == dtype and torch.equal(read, _reference_read(pasted, aug2, h, w))


def test_paste_casts_values_to_the_store_dtype():
    store = torch.zeros(2, 1, 6, 6, dtype=torch.bfloat16)
    aug = Augmentation(
        torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([True, False]), padding=1
    )
    out = paste_padded(store, torch.full((2, 1, 4, 4), 0.1), aug)
    assert out.dtype == torch.bfloat16 and torch.equal(
        crop_padded(out, aug), torch.full((2, 1, 4, 4), 0.1).bfloat16()
    )


def test_crop_padded_gradient_marks_the_window():
    aug = Augmentation(
        torch.tensor([0, 4, 1]),
        torch.tensor([4, 0, 2]),
        torch.tensor([False, True, True]),
        padding=2,
    )
    padded = torch.randn(3, 2, 9, 8, requires_grad=True)
    weights = torch.randn(3, 2, 5, 4)
    (crop_padded(padded, aug) * weights).sum().backward()
    assert torch.equal(padded.grad, _reference_paste(torch.zeros(3, 2, 9, 8), weights, aug))


def test_augmentation_helpers_reject_mismatched_shapes():
    aug = Augmentation(
        torch.zeros(3, dtype=torch.long),
        torch.zeros(3, dtype=torch.long),
        torch.zeros(3, dtype=torch.bool),
        padding=1,
    )
    with pytest.raises(ValueError, match="aug.top"):
        crop_padded(torch.zeros(4, 1, 6, 6), aug)
    with pytest.raises(ValueError, match="values must have shape"):
        paste_padded(torch.zeros(3, 1, 6, 6), torch.zeros(3, 1, 5, 5), aug)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(2, 1, 4, 4), padding=-1)


# ---------------------------------------------------------------------- loader
def _split(
    n: int = 50, c: int = 3, h: int = 8, w: int = 8, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=gen),
    )


def _epoch(loader: DeviceLoader) -> List[Batch]:
    return list(loader)


def _same(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p.x, q.x)
        and torch.equal(p.y, q.y)
        and torch.equal(p.index, q.index)
        and (p.aug is None) == (q.aug is None)
        and (
            p.aug is None
            or (
                torch.equal(p.aug.top, q.aug.top)
                and torch.equal(p.aug.left, q.aug.left)
                and torch.equal(p.aug.flip, q.aug.flip)
            )
        )
        for p, q in zip(a, b)
    )


@pytest.mark.parametrize("drop_last,sizes", [(False, [16, 16, 16, 2]), (True, [16, 16, 16])])
def test_loader_yields_every_index_once_per_epoch(drop_last, sizes):
    loader = DeviceLoader(_split(50), 16, drop_last=drop_last, device="cpu")
    assert (
        len(loader) == len(sizes) and loader.num_examples == 50 and loader.image_shape == (3, 8, 8)
    )
    orders = []
    for _ in range(3):
        batches = _epoch(loader)
        assert [len(b) for b in batches] == sizes
        index = torch.cat([b.index for b in batches])
        assert index.dtype == torch.int64
        if drop_last:
            assert index.unique().numel() == 48
        else:
            assert torch.equal(index.sort().values, torch.arange(50))
        orders.append(index)
    assert not torch.equal(orders[0], orders[1]) and loader.epoch == 3


def test_loader_batches_are_the_stored_split_through_their_aug():
    images, labels = _split(40)
    loader = DeviceLoader((images, labels), 16, padding=3, device="cpu")
    assert loader.padding == 3
    for batch in _epoch(loader) + _epoch(loader):
        assert batch.x.dtype == torch.float32 and batch.aug is not None and batch.aug.padding == 3
        assert torch.equal(batch.y, labels[batch.index])
        expected = _reference_batch(images[batch.index], batch.aug).float() / 255
        assert torch.equal(batch.x, expected)
        assert float(batch.x.min()) >= 0 and float(batch.x.max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fill", [0.0, 0.5, 1.0])
def test_loader_crops_are_padded_with_pad_fill(fill, dtype):
    images, labels = _split(24)
    loader = DeviceLoader((images, labels), 8, padding=3, pad_fill=fill, dtype=dtype, device="cpu")
    assert loader.pad_fill == fill and f"pad_fill={fill}" in repr(loader)
    border_seen = 0
    for batch in _epoch(loader):
        border = _border(batch.aug, 8, 8).expand_as(batch.x)
        border_seen += int(border.sum())
        assert batch.x.dtype == dtype
        assert torch.equal(batch.x[border], torch.full_like(batch.x[border], fill))
        work = torch.float64 if dtype == torch.float64 else torch.float32
        expected = _reference_batch(images[batch.index].to(work) / 255, batch.aug, fill)
        assert torch.equal(batch.x, expected.to(dtype))
    assert border_seen > 0


def test_loader_resume_is_exact_with_a_grey_fill_and_refuses_another_fill(tmp_path):
    data = _split(30)
    reference = DeviceLoader(data, 8, device="cpu", seed=3, pad_fill=0.5)
    epochs = [_epoch(reference) for _ in range(2)]
    first = DeviceLoader(data, 8, device="cpu", seed=3, pad_fill=0.5)
    it = iter(first)
    head = [next(it)]
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert state["pad_fill"] == 0.5
    resumed = DeviceLoader(data, 8, device="cpu", pad_fill=0.5)
    resumed.load_state_dict(state)
    assert _same(head + _epoch(resumed), epochs[0]) and _same(_epoch(resumed), epochs[1])
    # the same order and crops with black borders are other batches: resuming so is refused
    assert not _same(_epoch(DeviceLoader(data, 8, device="cpu", seed=3)), epochs[0])
    with pytest.raises(ValueError, match="pad_fill=0.5"):
        DeviceLoader(data, 8, device="cpu").load_state_dict(state)
    # a state without a fill was written by a loader that padded with 0
    old = {k: v for k, v in DeviceLoader(data, 8, device="cpu").state_dict().items() if k != "pad_fill"}
    DeviceLoader(data, 8, device="cpu").load_state_dict(old)
    with pytest.raises(ValueError, match="pad_fill=0.0"):
        DeviceLoader(data, 8, device="cpu", pad_fill=0.5).load_state_dict(old)


def test_loader_without_augment_or_shuffle_yields_originals_in_order():
    images, labels = _split(20)
    loader = DeviceLoader(
        (images, labels), 8, shuffle=False, augment=False, device="cpu", dtype=torch.float64
    )
    batches = _epoch(loader)
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(20))
    for b in batches:
        assert b.aug is None and b.x.dtype == torch.float64
        assert torch.equal(b.x, images[b.index].double() / 255)


def test_loader_converts_to_low_precision_dtype():
    images, labels = _split(10)
    batch = next(
        iter(DeviceLoader((images, labels), 10, augment=False, device="cpu", dtype=torch.bfloat16))
    )
    assert batch.x.dtype == torch.bfloat16
    assert torch.equal(batch.x, (images[batch.index].float() / 255).bfloat16())


def test_loader_resume_reproduces_the_following_epochs(tmp_path):
    data = _split(45)
    reference = DeviceLoader(data, 8, device="cpu", seed=7)
    epochs = [_epoch(reference) for _ in range(4)]

    # resume at an epoch boundary, through a weights_only checkpoint
    first = DeviceLoader(data, 8, device="cpu", seed=7)
    assert _same(_epoch(first), epochs[0])
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    resumed = DeviceLoader(data, 8, device="cpu")  # seed comes from the state
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    assert _same(_epoch(resumed), epochs[1]) and _same(_epoch(resumed), epochs[2])

    # resume mid-epoch: the remaining batches of epoch 1, then epoch 2
    partial = DeviceLoader(data, 8, device="cpu", seed=7)
    partial.set_epoch(1)
    it = iter(partial)
    head = [next(it), next(it)]
    state = partial.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    later = DeviceLoader(data, 8, device="cpu")
    later.load_state_dict(state)
    assert _same(head + _epoch(later), epochs[1]) and _same(_epoch(later), epochs[2])

    # set_epoch jumps straight to any epoch
    jump = DeviceLoader(data, 8, device="cpu", seed=7)
    jump.set_epoch(3)
    assert _same(_epoch(jump), epochs[3])
    assert not _same(_epoch(DeviceLoader(data, 8, device="cpu", seed=8)), epochs[0])


def test_loader_rejects_state_of_another_split():
    state = DeviceLoader(_split(45), 8, device="cpu").state_dict()
    with pytest.raises(ValueError, match="num_examples"):
        DeviceLoader(_split(44), 8, device="cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(_split(45), 9, device="cpu").load_state_dict(state)


@pytest.mark.parametrize(
    "images,labels,error,match",
    [
        (torch.rand(4, 3, 8, 8) * 2, torch.zeros(4, dtype=torch.long), ValueError, r"\[0, 1\]"),
        (torch.rand(4, 3, 8, 8) - 0.5, torch.zeros(4, dtype=torch.long), ValueError, r"\[0, 1\]"),
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.int32),
            torch.zeros(4, dtype=torch.long),
            TypeError,
            "uint8",
        ),
        (
            torch.zeros(4, 8, 8, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            "N, C, H, W",
        ),
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
            torch.zeros(5, dtype=torch.long),
            ValueError,
            "length",
        ),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4), TypeError, "integer"),
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
            torch.tensor([0, 1, -1, 2]),
            ValueError,
            ">= 0",
        ),
        (
            torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.long),
            ValueError,
            "empty",
        ),
    ],
)
def test_loader_validates_tensor_pairs(images, labels, error, match):
    with pytest.raises(error, match=match):
        DeviceLoader((images, labels), 4, device="cpu")


def test_loader_validates_its_options():
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(_split(10), 0, device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        DeviceLoader(_split(10), 4, device="cpu", dtype=torch.int64)
    with pytest.raises(ValueError, match="no batch"):
        DeviceLoader(_split(10), 16, drop_last=True, device="cpu")
    with pytest.raises(TypeError, match="data must be"):
        DeviceLoader(42, 4, device="cpu")  # type: ignore[arg-type]
    for fill, error in ((-0.5, ValueError), (1.01, ValueError), (float("inf"), ValueError),
                        (None, TypeError), (False, TypeError)):
        with pytest.raises(error, match="pad_fill"):
            DeviceLoader(_split(10), 4, device="cpu", pad_fill=fill)  # type: ignore[arg-type]


def test_float_pairs_are_stored_exactly_or_with_a_warning():
    images, labels = _split(6)
    stored, _ = as_tensors((images.float() / 255, labels))
    assert torch.equal(stored, images)
    with pytest.warns(UserWarning, match="not 8-bit"):
        stored, _ = as_tensors(((images.clamp(max=254).float() + 0.3) / 255, labels.numpy()))
    assert torch.equal(stored, images.clamp(max=254))


class _ItemDataset(Dataset):
    """A map-style dataset returning (image, label) items built by ``make``."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, make: Callable[[torch.Tensor], object]
    ):
        self.images, self.labels, self.make = images, labels, make

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.make(self.images[i]), int(self.labels[i])


def _pil(chw: torch.Tensor):
    from PIL import Image

    hwc = chw.permute(1, 2, 0).numpy()
    return (
        Image.fromarray(hwc[..., 0], mode="L")
        if hwc.shape[2] == 1
        else Image.fromarray(hwc, mode="RGB")
    )


@pytest.mark.parametrize(
    "make,channels",
    [
        (_pil, 3),
        (_pil, 1),
        (lambda chw: np.ascontiguousarray(chw.permute(1, 2, 0).numpy()), 3),  # numpy HWC uint8
        (lambda chw: chw.float() / 255, 3),  # CHW float tensor, as ToTensor() gives
    ],
)
def test_generic_dataset_path(make, channels):
    pytest.importorskip("PIL")
    images, labels = _split(12, c=channels, h=6, w=5)
    ds = _ItemDataset(images, labels, make)
    got_images, got_labels = as_tensors(ds)
    assert got_images.dtype == torch.uint8 and torch.equal(got_images, images)
    assert got_labels.dtype == torch.int64 and torch.equal(got_labels, labels)
    loader = DeviceLoader(ds, 5, device="cpu", padding=2)
    assert loader.image_shape == (channels, 6, 5) and len(loader) == 3
    for batch in loader:
        assert torch.equal(batch.x, _reference_batch(images[batch.index], batch.aug).float() / 255)


def test_generic_dataset_errors_name_the_item():
    images, labels = _split(4)
    odd = _ItemDataset(
        images, labels, lambda chw: chw if chw[0, 0, 0] != images[2, 0, 0, 0] else chw[:, :4]
    )
    with pytest.raises(ValueError, match=r"dataset\[2\]"):
        as_tensors(odd)
    with pytest.raises(TypeError, match=r"dataset\[0\]"):
        as_tensors(_ItemDataset(images, labels, lambda chw: chw.tolist()))

    class FloatLabels(_ItemDataset):
        def __getitem__(self, i):
            return self.images[i], 0.5

    with pytest.raises(TypeError, match="label"):
        as_tensors(FloatLabels(images, labels, lambda chw: chw))


def test_as_tensors_sources_agree():
    images, labels = _split(8)
    ds = ArrayDataset(images, labels, [str(i) for i in range(10)])
    assert as_tensors(ds)[0] is images and as_tensors(ds)[1] is labels
    for source in (
        (images, labels),
        TensorDataset(images, labels),
        (images.numpy(), labels.numpy()),
    ):
        got = as_tensors(source)
        assert torch.equal(got[0], images) and torch.equal(got[1], labels)
    assert DeviceLoader(ds, 4, device="cpu").classes == ds.classes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_and_store_helpers_on_cuda():
    images, labels = _split(40)
    loader = DeviceLoader((images, labels), 16, device="cuda", dtype=torch.bfloat16)
    assert loader.images.is_cuda and loader.images.dtype == torch.uint8
    seen = []
    for batch in loader:
        assert batch.x.is_cuda and batch.index.is_cuda and batch.aug.top.is_cuda
        aug_cpu = Augmentation(batch.aug.top.cpu(), batch.aug.left.cpu(), batch.aug.flip.cpu(), 4)
        index = batch.index.cpu()
        expected = (_reference_batch(images[index], aug_cpu).float() / 255).bfloat16()
        assert torch.equal(batch.x.cpu(), expected) and torch.equal(batch.y.cpu(), labels[index])
        store = torch.randn(len(batch), 3, 16, 16, device="cuda")
        values = torch.randn(len(batch), 3, 8, 8, device="cuda")
        pasted = paste_padded(store, values, batch.aug)
        assert torch.equal(pasted.cpu(), _reference_paste(store.cpu(), values.cpu(), aug_cpu))
        assert torch.equal(crop_padded(pasted, batch.aug), values)
        seen.append(index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(40))
    for batch in DeviceLoader((images, labels), 16, device="cuda", pad_fill=0.5):
        aug_cpu = Augmentation(batch.aug.top.cpu(), batch.aug.left.cpu(), batch.aug.flip.cpu(), 4)
        expected = _reference_batch(images[batch.index.cpu()].float() / 255, aug_cpu, 0.5)
        assert torch.equal(batch.x.cpu(), expected)


# -------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_cifar10_subset(cifar10_dir):
    train, test = cifar10(cifar10_dir, train=True), cifar10(cifar10_dir, train=False)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32) and len(ds) > 0
        assert (
            ds.labels.dtype == torch.int64
            and int(ds.labels.min()) >= 0
            and int(ds.labels.max()) <= 9
        )
        assert ds.classes == CLASSES10
        assert 40 < ds.images.float().mean().item() < 215  # real photos, not blank or saturated
    loader = DeviceLoader(train, 256, device="cpu")
    batch = next(iter(loader))
    assert batch.x.shape == (256, 3, 32, 32) and torch.equal(batch.y, train.labels[batch.index])

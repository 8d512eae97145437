"""A tiny synthetic CIFAR-10 in the official python-version layout, for tests
of the command line, the docs and the examples that must not depend on the
real data set. The class of an image is readable from which colour channel is
brighter, so a few epochs of training beat chance."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(n: int, rng: np.random.Generator) -> dict:
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 120, size=(n, 3, 32, 32), dtype=np.uint8)
    images[np.arange(n), labels % 3] += 120
    return {"data": images.reshape(n, 3072), "labels": labels.tolist()}


def write_tiny_cifar10(root: Path, n_train: int = 200, n_test: int = 64, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` with ``n_train`` training images
    (split over the five batch files) and ``n_test`` test images; returns ``root``."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [n_train // 5 + (1 if k < n_train % 5 else 0) for k in range(5)]
    for k, size in enumerate(sizes, start=1):
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump(_batch(size, rng), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_batch(n_test, rng), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f, protocol=2)
    return Path(root)

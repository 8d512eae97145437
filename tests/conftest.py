"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One torch thread per test process: on a 2-core machine extra intra-op
# threads only contend with each other (tests that measure threading set
# their own count). Subprocesses the tests start inherit the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """A CIFAR-10 directory in the official layout, named by ``ADVTRAIN_CIFAR10_DIR``
    (CI builds a real subset of 5,000 training and 1,000 test images; see ``.ci/run``)."""
    path = os.environ.get("ADVTRAIN_CIFAR10_DIR")
    if not path:
        pytest.skip(
            "ADVTRAIN_CIFAR10_DIR is not set: "
            "real-data tests need a CIFAR-10 directory (see .ci/run)"
        )
    return Path(path)


@pytest.fixture
def seeded() -> torch.Generator:
    """Seed torch's global RNG with 0 and return a CPU generator seeded with 0."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)

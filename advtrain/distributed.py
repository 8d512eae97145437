"""Helpers for data-parallel training on ``torch.distributed`` (DDP), launched
by ``torchrun``: advtrain never starts processes itself.

Conventions of a distributed advtrain run:

* each process trains on its own shard of the training set (examples with
  ``index % world_size == rank``), ``batch_size`` examples per step, so the
  global batch is ``world_size × batch_size``;
* attacks and policies run on the unwrapped module, so their forward and
  backward passes trigger no gradient synchronisation; only the training
  forward goes through :class:`~torch.nn.parallel.DistributedDataParallel`;
* BatchNorm running statistics are kept per process during an epoch and
  averaged across processes at its end, so every process ends an epoch with
  identical weights *and* buffers;
* per-example stores (ATTA, APART) hold only the process's own shard;
* only rank 0 prints progress and writes metrics and the main checkpoint;
  every rank writes its own ``checkpoint.rankR.pt`` with its policy and RNG
  state, which ``resume`` reads back on the same number of processes.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a process group is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: Optional[str] = None) -> bool:
    """Initialize the default process group from ``torchrun``'s environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) when it is set and the group
    is not initialized yet. Backend: ``"nccl"`` with CUDA, else ``"gloo"``.
    Returns whether this is a multi-process run."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return is_distributed()


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Wait for all processes and destroy the default process group (call at
    the end of a multi-process run, so no process exits while others still
    communicate)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def no_forward_buffer_sync() -> Dict[str, Any]:
    """DDP keyword that turns off the per-forward broadcast of rank 0's buffers
    (advtrain averages BatchNorm statistics at epoch ends instead), for the
    installed torch: ``forward_sync_buffers=False`` where it exists (buffers
    are still synchronised once at construction), else ``broadcast_buffers=False``."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over processes in place (identity when not distributed)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def average_gradients(params: "list[Tensor]") -> None:
    """Average the ``.grad`` of tensors that are not DDP parameters (such as a
    policy's learnable step sizes) across processes."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across
    processes, so that all processes hold the same model state."""
    if not is_distributed():
        return
    n = world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(n)


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()

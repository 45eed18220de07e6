"""Multi-process data-parallel training (torch.distributed DDP), launched with ``torchrun``.

Every process runs the same script: it joins the process group with :func:`init_from_env`, then
calls :func:`rnf_fast.training.train` as a single process would. The trainer then initialises
ActNorm on rank 0 and broadcasts the model, wraps the loss module
(:class:`~rnf_fast.training.Objective`) in ``DistributedDataParallel`` so the loss, log det
included, is computed inside the wrapped forward, gives each rank its slice of every batch, and
writes the run folder, logs and checkpoints from rank 0 only. For example, on 2 CPU processes
(gloo)::

    torchrun --nproc-per-node 2 my_train_script.py
    torchrun --nproc-per-node 2 -m rnf_fast.cli train --epochs 20   # the command line

``rnf-fast train`` joins the group itself when :func:`launched` says a launcher started it
(gloo for a CPU run, nccl for a CUDA one).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "init_from_env",
    "launched",
    "local_device",
    "rank_and_world",
    "shard",
    "shutdown",
    "wrap",
]

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when the environment describes a process group (``torchrun`` sets RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT), so this process should join it."""
    return all(k in os.environ for k in _LAUNCH_VARIABLES)


def backend_for(device: str) -> str:
    """The process-group backend of a device: nccl for CUDA, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(*, backend: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Does nothing when the group is already initialised.

    Arguments:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo.

    Returns:
        (rank, world_size).
    """
    if not dist.is_initialized():
        missing = [k for k in _LAUNCH_VARIABLES if k not in os.environ]
        if missing:
            raise RuntimeError(f"environment variables {missing} are not set; launch with torchrun")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # One GPU per process: NCCL refuses two ranks on one device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return rank_and_world()


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: str) -> torch.device:
    """The device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a process group."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and rank_and_world()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@torch.no_grad()
def broadcast_module(module: nn.Module, *, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src``'s module to every rank (no-op alone)."""
    if rank_and_world()[1] == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def broadcast_object(value: object, *, src: int = 0) -> object:
    """Rank ``src``'s ``value`` (any picklable object) on every rank (``value`` itself alone)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: object) -> list[object]:
    """Every rank's ``value`` (any picklable object), in rank order (``[value]`` alone)."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    out: list[object] = [None] * world
    dist.all_gather_object(out, value)
    return out


def wrap(
    module: nn.Module, *, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """``DistributedDataParallel(module)`` in a process group, else module itself.

    Arguments:
        module: the module whose forward returns the loss.
        device: this process's device.
        find_unused_parameters: of DDP; needed when some steps leave parameters without a
            gradient (h during the likelihood warm-up, one of f and h in each two-step phase).
    """
    if rank_and_world()[1] == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def shard(x: Tensor) -> Tensor:
    """This rank's slice of a batch: x (B, ...) -> (about B / world_size, ...), contiguous."""
    rank, world = rank_and_world()
    return x if world == 1 else torch.tensor_split(x, world)[rank]


def all_reduce_sum(x: Tensor) -> Tensor:
    """x summed over the ranks, in place (x itself alone); returns x."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if rank_and_world()[1] > 1:
        dist.barrier()

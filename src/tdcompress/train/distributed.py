"""Thin helpers for torchrun / DistributedDataParallel (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "wrap_ddp",
    "all_reduce_sum",
    "cleanup",
    "default_device",
]


#: whether init_distributed created the process group (then cleanup() may destroy it)
_OWN_GROUP = False


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); no-op otherwise. End a
    successful run with :func:`cleanup`."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend)
    global _OWN_GROUP
    _OWN_GROUP = True
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel when a process group is up, the model itself otherwise."""
    if not is_distributed():
        return model
    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def main_says(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every rank (for decisions, such as whether a file exists, that
    the ranks must take alike); ``flag`` itself outside a process group."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag) if is_main() else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item())


def cleanup() -> None:
    """Wait for every rank, then destroy the process group, if one is up (a no-op after
    that). Call it once per process at the end of a successful run: a process that exits
    with the group alive can abort at exit (gloo: "terminate called without an active
    exception"). Not after an error: a rank still inside a collective would never reach
    the barrier, and the exiting rank should let torchrun stop the others instead. A group
    that :func:`init_distributed` did not create is left to its creator."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False

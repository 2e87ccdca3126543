"""torch.distributed helpers that are no-ops in a single process.

Under ``torchrun`` the usual environment (RANK, WORLD_SIZE, LOCAL_RANK) is set; ``init()`` then
starts a process group (NCCL on GPU, gloo on CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | None = None) -> torch.device:
    """Start the process group when launched by torchrun; return this process's device.

    ``device``: "cpu", "cuda" or None (cuda when available).
    """
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returns it). Identity in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank (trusted: our own processes)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_distributed():
        # A barrier last: gloo may abort at interpreter exit if an object collective was the final call.
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. to create files), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()

"""Rank and world helpers for multi-process training (torchrun, the deepspeed launcher, or one process).

    info = init_distributed("auto")     # reads RANK/WORLD_SIZE/LOCAL_RANK set by the launcher
    if info.is_main: print(...)          # rank-0-only logging
    mean = all_reduce_mean(loss_value)   # the same float on every rank

A plain ``vla pretrain`` (no launcher) is a world of one: the rendezvous variables are filled in
here, because without them DeepSpeed falls back to MPI discovery (and fails without mpi4py).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free right now on this host (for a one-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name not in ("gloo", "nccl"):
        raise ValueError(f"deepspeed.backend: unknown {name!r}; known: auto, gloo, nccl")
    return name


def init_distributed(backend: str = "auto", local_rank: int | None = None) -> DistInfo:
    """Join (or create) the process group; idempotent. ``local_rank`` is the deepspeed launcher's
    ``--local_rank`` argument when it passes one instead of the LOCAL_RANK variable."""
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Not started by a launcher: a world of one process.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if not torch.distributed.is_initialized():
        # deepspeed.init_distributed (not torch's) so that DeepSpeed's own comm layer is set up too.
        deepspeed.init_distributed(dist_backend=resolve_backend(backend), auto_mpi_discovery=False)
    info = DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_mean(value: float) -> float:
    """Mean of a Python float over all ranks (every rank gets the result)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled; small objects only)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]

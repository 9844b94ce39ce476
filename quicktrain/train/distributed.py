"""``torch.distributed`` helpers: set-up from ``torchrun``'s environment and the rank's share of a batch."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank of this process (``0, 1, 0`` without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA), if any."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        # torchrun --max-restarts re-runs the workers against the same key-value store; without a fresh key
        # prefix per restart, gloo would read the dead workers' addresses and fail to connect.
        store, _, _ = next(rendezvous("env://"))
        store = dist.PrefixStore(f"quicktrain-restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size)
        # A group still alive when the interpreter finalises can abort the process (SIGABRT) after training has
        # finished: gloo's worker threads free their last work's tensors, which needs the GIL that is being torn
        # down (pytorch/pytorch#179291). Destroying the group while Python is alive avoids that.
        atexit.register(_destroy_process_group)
    return info


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous share of a global batch of ``indices`` (the global batch must divide evenly).

    Each rank averages the loss over its equal share and DDP averages gradients over ranks, so the update
    equals the single-process update on the whole global batch.
    """
    check_divisible(len(indices), info)
    size = len(indices) // info.world_size
    return indices[info.rank * size : (info.rank + 1) * size]


def check_divisible(batch_size: int, info: DistInfo) -> None:
    """Reject a global batch that does not split evenly over the ranks (before any data is loaded)."""
    if batch_size % info.world_size:
        raise ValueError(
            f"--batch-size {batch_size} does not split evenly over {info.world_size} processes; "
            f"choose a multiple of {info.world_size}"
        )


def rank_range(count: int, info: DistInfo) -> range:
    """This rank's contiguous share of ``count`` items (shares differ by at most one item)."""
    return range(info.rank * count // info.world_size, (info.rank + 1) * count // info.world_size)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over ranks (float64; the values themselves without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (the value itself without a process group)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value

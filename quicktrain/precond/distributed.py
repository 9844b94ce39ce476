"""Averages of curvature statistics over ``torch.distributed`` ranks (no-ops in a single process)."""

from __future__ import annotations

import math

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "all_reduce_mean"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over ranks in place when ``torch.distributed`` is initialised; returns ``t``."""
    if _distributed():
        buf = t if t.is_contiguous() else t.contiguous()  # collectives need dense storage
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf /= dist.get_world_size()
        if buf is not t:
            t.copy_(buf)
    return t


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate the rows ``[K, ...]`` of every rank (same shape on every rank), scaled by
    ``1/√world`` so that ``Σ rows rowsᵀ`` is the rank average."""
    if not _distributed():
        return t
    world = dist.get_world_size()
    out = t.new_empty(world * t.shape[0], *t.shape[1:])
    dist.all_gather_into_tensor(out, t.contiguous())
    return out / math.sqrt(world)

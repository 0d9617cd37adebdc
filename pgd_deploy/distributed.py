"""Tiny helpers over torch.distributed that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over all processes (identity in a single process)."""
    if not is_dist():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DistributedDataParallel / DataParallel wrapper (or the model
    itself): any wrapper that holds it as `module`."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def all_gather_objects(obj: object) -> list[object]:
    """Every process's `obj`, in rank order (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

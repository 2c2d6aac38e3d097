"""Multi-process importance: shard calibration batches across ranks and sum the accumulators back.

Everything here is a no-op in a single process. Under ``accelerate launch`` (or any initialised
`torch.distributed` process group) each rank scores every ``world_size``-th calibration batch and the per-rank
sums are all-reduced, so every rank ends with the statistics of all the batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every ``world_size``-th one, starting at the rank (all of them alone).

    Raises ValueError when there are fewer items than processes (a rank would have nothing to score)."""
    rank, size = world()
    if size > 1 and len(items) < size:
        raise ValueError(
            f"{len(items)} calibration batches cannot be shared by {size} processes: give at least {size} batches "
            "(raise num_samples or lower per_device_train_batch_size)."
        )
    return list(items[rank::size])


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place. bfloat16/float16 tensors are summed in float32 and, under NCCL
    (which reduces only GPU tensors), CPU tensors on the GPU, one tensor at a time."""
    if world()[1] == 1:
        return
    nccl = dist.get_backend() == "nccl"
    for tensor in tensors:
        low = tensor.dtype in (torch.bfloat16, torch.float16)
        moved = nccl and tensor.device.type == "cpu"
        if not (low or moved):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            continue
        device = torch.device("cuda", torch.cuda.current_device()) if moved else tensor.device
        carrier = tensor.to(device, torch.float32 if low else tensor.dtype)
        dist.all_reduce(carrier, op=dist.ReduceOp.SUM)
        tensor.copy_(carrier)


def all_reduce_count(count: int, device: torch.device | str = "cpu") -> int:
    """An integer summed over all ranks."""
    if world()[1] == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def broadcast_from_main_(tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's copy (masks must be the same on every rank, not just equal up to
    rounding); bool tensors travel as uint8, which every backend supports."""
    if world()[1] == 1:
        return
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype == torch.bool:
            carrier = tensor.to(torch.uint8)
            dist.broadcast(carrier, src=0)
            tensor.copy_(carrier.bool())
        else:
            dist.broadcast(tensor, src=0)

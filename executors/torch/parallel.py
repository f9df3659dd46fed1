"""The tensor-parallel group: which rank this process is, and the collectives the model needs.

One worker process per rank (`executors/multiproc.py` starts them and sets
MASTER_ADDR / MASTER_PORT / WORLD_SIZE for torch.distributed's env:// rendezvous).
Each process belongs to exactly one group, so the default process group is the TP
group. With world_size == 1 nothing is initialised and every helper is a no-op, so
a single-device model runs exactly as it would without this module.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("aiosched.worker")


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (plain ints: no process group needed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """True when the model is sharded and the forward pass needs collectives."""
        return self.world_size > 1


SINGLE = TPGroup()


def shard_range(size: int, rank: int, world_size: int, field: str = "dimension") -> slice:
    """Rank `rank`'s contiguous slice of a dimension of `size` split evenly over `world_size`.

    `field` names the config.json field the size comes from, so a model that cannot be
    split says which setting is at fault."""
    if size % world_size:
        raise ValueError(f"{field} ({size}) is not divisible by tensor_parallel_size ({world_size})")
    n = size // world_size
    return slice(rank * n, (rank + 1) * n)


def init_group(rank: int, world_size: int, device: torch.device) -> TPGroup:
    """Join the process group (gloo on CPU, NCCL on CUDA); only when world_size > 1."""
    group = TPGroup(rank, world_size)
    if not group.active:
        return group
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"tensor_parallel_size = {world_size} needs the multiproc executor "
                           f"(torch.distributed rendezvous variables {missing} are not set)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    log.info("tensor-parallel rank %d/%d joined (%s)", rank, world_size, backend)
    return group


def destroy_group(group: TPGroup) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Sum `t` over the ranks, in place (row-parallel outputs, vocab-parallel embedding)."""
    if group.active:
        dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor, group: TPGroup, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `t` along `dim`, in rank order (vocab-parallel logits).

    Every rank gets the same tensor, so every rank samples the same token."""
    if not group.active:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(group.world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=dim)


def agree_min(value: int, group: TPGroup, device: torch.device) -> int:
    """The smallest `value` over the ranks (e.g. KV blocks: the rank with least free memory decides)."""
    if not group.active:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())

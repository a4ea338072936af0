"""Many targets on many GPUs: each `torchrun` process decodes its share of the target list.

    torchrun --nproc_per_node 8 scripts/resnet50_guided.py --prompt images/ --optim_folder study/ ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint host:29500 scripts/... (multi-node)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; every process sees the same target list and the
same output tree, drops the targets that are already finished there (so a rerun only does what
is left), and takes every WORLD_SIZE-th of the rest, starting at its RANK. Each target's result
lands in its own subfolder, so processes never write the same file. The process group (NCCL on
GPUs, gloo on CPUs) checks at the start that every process sees the same targets and takes rank
0's list of what is left, and holds a barrier at the end, after which rank 0 writes
`index.json`. If one process fails, torchrun stops the others. Without torchrun there is one
shard holding everything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, items: list) -> list:
        """This process's share: every world_size-th item from position rank."""
        return items[self.rank::self.world_size]

    def device(self, requested: str | None) -> str | None:
        """Under torchrun with GPUs and no --device: the GPU of this process's local rank."""
        if requested is None and self.distributed and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def current_shard() -> Shard:
    """The shard of this process, from torchrun's environment variables."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return Shard(rank, world, local)


def init_group(shard: Shard, device: torch.device) -> bool:
    """Join the process group (when distributed and not yet joined); → whether this call
    created it (and should destroy it)."""
    if not shard.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Processes wait for each other at the end, possibly for hours: a long timeout.
    dist.init_process_group(backend=backend, rank=shard.rank, world_size=shard.world_size,
                            timeout=timedelta(days=7))
    return True


def gather(shard: Shard, value) -> list:
    """Every process's `value` (picklable), in rank order; [value] when not distributed."""
    if not shard.distributed:
        return [value]
    out = [None] * shard.world_size
    dist.all_gather_object(out, value)
    return out


def from_rank0(shard: Shard, value):
    """Rank 0's `value` on every process."""
    if not shard.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(shard: Shard) -> None:
    if shard.distributed and dist.is_initialized():
        dist.barrier()


def leave_group(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()

"""torchrun support: each rank takes every world_size-th shard; rank 0 seals the stores."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank succeeded: one rank's failure must not leave others waiting forever."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return flag.item() == 0


def init_ranks(device: str) -> Ranks:
    """Join the process group torchrun set up (env RANK/WORLD_SIZE), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        # gloo carries the small control messages; nccl would need a CUDA tensor per call
        dist.init_process_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

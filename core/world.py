"""Process world (rank, world size) without importing any training machinery."""

from __future__ import annotations

import os
from dataclasses import dataclass


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's, else (0, 1)."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    return resolve_world()


@dataclass(frozen=True)
class LaunchWorld:
    """This process's place as the launcher (``accelerate launch``, torchrun) set it."""

    rank: int
    world_size: int
    local_rank: int


def launch_world() -> LaunchWorld:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment; (0, 1, 0) when run directly
    (no process group is needed: commands that only split work by rank read this)."""
    env = os.environ
    return LaunchWorld(
        int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    )

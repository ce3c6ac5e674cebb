"""Where the reference loop runs: the process group torchrun asks for, as a ``World``."""

from __future__ import annotations

import os

import torch

from geko_data.world import World

__all__ = ["setup_distributed"]


def setup_distributed() -> World:
    """Join the process group the launcher describes and return this process's ``World``.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) the default process group is initialised on
    first call (nccl with CUDA, else gloo); a group that is already initialised is used as it is. A plain
    ``python`` run is ``World()``: rank 0 of 1. The returned World has no DataLoader worker fields set:
    the loop's process is the main process.
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), world_size=dist.get_world_size())
    return World()

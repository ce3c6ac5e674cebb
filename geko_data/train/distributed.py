"""Where the reference loop runs: the process group torchrun asks for, as a ``World``."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from geko_data.world import World

__all__ = ["leave_process_group", "setup_distributed"]

#: Seconds the main thread gives up the GIL after the last barrier (gloo's threads need it a moment; see below).
SETTLE = 0.05


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


def leave_process_group(group: Any = None) -> None:
    """End this rank's part in ``group`` (the default group when None): a barrier, then the group destroyed.

    Between the two the main thread sleeps ``SETTLE`` s without the GIL. gloo's barrier keeps the collectives
    before it alive until gloo's own thread frees the barrier, and freeing a collective whose tensors Python
    has already dropped takes the GIL on that thread. A main thread that destroys the group (or frees the
    DDP model holding it, or exits) right after the barrier waits for that thread while holding the GIL:
    the rank hangs, or the interpreter, already finalizing, aborts the thread (SIGABRT). Measured: a gloo
    group destroyed right after ``barrier`` hung within 5-25 rounds; with the pause, none in 300.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier(group=group)
    time.sleep(SETTLE)  # gloo's threads free the barrier's collectives, with the GIL, now
    dist.destroy_process_group(group)

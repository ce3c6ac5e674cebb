"""World: the (rank, world_size, worker, num_workers) topology as a value object.

Pure planning code takes a World argument, so tests can build any topology by
hand; ``World.detect()`` reads it from torch.distributed and
``torch.utils.data.get_worker_info()``, and refuses RANK / WORLD_SIZE in the
environment without an initialised process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from geko_data.validate import check_int

__all__ = ["World", "in_dataloader_worker"]


def in_dataloader_worker() -> bool:
    """True inside a DataLoader worker process (where the epoch must not be moved or saved)."""
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


@dataclass(frozen=True)
class World:
    """Where this code runs among ranks and DataLoader workers.

    Args:
        rank: this process's rank. Defaults to ``0``.
        world_size: number of ranks. Defaults to ``1``.
        worker: this DataLoader worker's id (0 in the main process). Defaults to ``0``.
        num_workers: DataLoader workers per rank (1 when loading in the main process). Defaults to ``1``.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        check_int("world_size", self.world_size, 1)
        check_int("rank", self.rank, 0, self.world_size - 1)
        check_int("num_workers", self.num_workers, 1)
        check_int("worker", self.worker, 0, self.num_workers - 1)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes files)."""
        return self.rank == 0

    @property
    def global_worker(self) -> int:
        """Index of this worker among all ``world_size * num_workers`` workers."""
        return self.rank * self.num_workers + self.worker

    @property
    def total_workers(self) -> int:
        return self.world_size * self.num_workers

    def with_worker(self, worker: int, num_workers: int) -> "World":
        """The same ranks, seen from DataLoader worker ``worker`` of ``num_workers``."""
        return World(rank=self.rank, world_size=self.world_size, worker=worker, num_workers=num_workers)

    def in_this_worker(self) -> "World":
        """The same ranks, seen from the DataLoader worker running this code (worker 0 of 1 in the main
        process): how a stream learns which share of its rank to read."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return self.with_worker(0, 1) if info is None else self.with_worker(info.id, info.num_workers)

    @classmethod
    def detect(cls) -> "World":
        """The running topology: torch.distributed's ranks if initialised, plus the DataLoader worker.

        RANK / WORLD_SIZE in the environment (set by torchrun and most launchers) without an initialised
        process group is an error, not a topology: the sampler would yield this rank's share of the data
        while feedback could not be all-gathered, so each process would silently train on a fraction of
        the data with a state of its own. Initialise the process group first, or pass the ranks explicitly.
        """
        rank, world_size = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            if env_world not in (None, "", "1") or env_rank not in (None, "", "0"):
                raise RuntimeError(
                    f"RANK={env_rank} and WORLD_SIZE={env_world} are set in the environment but "
                    f"torch.distributed is not initialised: call torch.distributed.init_process_group() before "
                    f"building the sampler or stream, or pass the ranks explicitly (GEKOSampler(num_replicas=, "
                    f"rank=), GEKOStream(world=World(rank=, world_size=)))")
        return cls(rank=rank, world_size=world_size).in_this_worker()

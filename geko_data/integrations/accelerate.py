"""GEKO in your own 🤗 accelerate loop: ``prepare_loader`` instead of ``accelerator.prepare(loader)``.

``accelerator.prepare(loader)`` shards a DataLoader's batches over the processes: rank r keeps every
world-th batch, and only batches of the loader's batch size (plus the last). A GEKO sampler already yields
this rank's equal share, so a prepared GEKO loader trains half of it on 2 ranks, a third on 3, and with
``GEKOBatchSampler``'s smaller batches of an epoch that keeps its steps, hardly any of it. ``prepare_loader``
prepares the loader (device placement, RNG synchronisation, as accelerate does) and turns that sharding
off, as transformers does for its own rank-aware samplers::

    from geko_data.integrations.accelerate import prepare_loader

    model, optimizer = accelerator.prepare(model, optimizer)
    loader = prepare_loader(accelerator, DataLoader(sampler.wrap(ds), batch_size=32, sampler=sampler))

``GEKOTrainer`` and ``GEKOSFTTrainer`` use it for their train loader.
"""

from __future__ import annotations

import functools
from typing import Any

from torch.utils.data import DataLoader

from geko_data.sampler import GEKOSampler

__all__ = ["prepare_loader", "unshard"]


def _geko_sampler(loader: DataLoader) -> GEKOSampler | None:
    """The GEKOSampler a (plain) DataLoader draws from: its batch sampler's (torch's BatchSampler or a
    GEKOBatchSampler) ``sampler``."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    return sampler if isinstance(sampler, GEKOSampler) else None


def unshard(prepared: Any, sampler: GEKOSampler, *, world_size: int) -> Any:
    """Make accelerate's batch sharding of ``prepared`` (what ``accelerator.prepare`` returned for a loader
    over ``sampler``) a passthrough: every batch of this rank's share, of any size. Raises when accelerate
    wrapped the loader in a way this cannot check (``dispatch_batches``, say) on more than one process."""
    shard = getattr(prepared, "batch_sampler", None)
    inner = getattr(shard, "batch_sampler", None)
    if inner is not None and getattr(inner, "sampler", None) is sampler:  # GEKOBatchSampler's too
        # Every batch to this rank, not every world-th, and of any size: the wrapper otherwise lets through
        # only batches of exactly its batch_size, and the last one. Its fields stay as accelerate set them,
        # so ``total_batch_size`` (batch size x processes) still reads right; split_batches off, as each
        # rank's batches are whole.
        shard.__class__ = _passthrough(type(shard))
        shard.split_batches = False
    elif world_size > 1:
        raise RuntimeError(f"accelerate wrapped the GEKO DataLoader as {type(prepared).__name__} with batch "
                           f"sampler {type(shard).__name__}; GEKO cannot check that each rank trains its "
                           f"share (is `dispatch_batches` set?)")
    return prepared


@functools.cache
def _passthrough(shard_type: type) -> type:
    """A subclass of accelerate's ``BatchSamplerShard`` (``shard_type``) that yields every batch of the batch
    sampler it wraps."""

    class Passthrough(shard_type):
        def __iter__(self):
            return iter(self.batch_sampler)

        def __len__(self) -> int:
            return len(self.batch_sampler)

    return Passthrough


def prepare_loader(accelerator: Any, loader: DataLoader) -> Any:
    """``accelerator.prepare(loader)`` for a DataLoader over a ``GEKOSampler`` (``sampler=`` or a
    ``GEKOBatchSampler`` as ``batch_sampler=``), each rank keeping its whole share."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"`loader` must be a torch DataLoader, got {type(loader).__name__}")
    sampler = _geko_sampler(loader)
    if sampler is None:
        raise ValueError(f"`loader` must draw from a GEKOSampler (sampler=, or batch_sampler=GEKOBatchSampler), "
                         f"got sampler {type(loader.sampler).__name__} and batch_sampler "
                         f"{type(loader.batch_sampler).__name__}; prepare other loaders with accelerator.prepare")
    world = sampler.world
    if (world.world_size, world.rank) != (accelerator.num_processes, accelerator.process_index):
        # Passed through unsharded, a sampler of another world would have every rank train what it gives.
        raise ValueError(f"the GEKOSampler is for rank {world.rank} of {world.world_size}, the accelerator's process "
                         f"is {accelerator.process_index} of {accelerator.num_processes}: make the Accelerator "
                         f"first and the sampler without num_replicas/rank (it reads them from the process group)")
    prepared = unshard(accelerator.prepare(loader), sampler, world_size=accelerator.num_processes)
    _follow_the_sampler(prepared, sampler)
    return prepared


def _follow_the_sampler(prepared: Any, sampler: GEKOSampler) -> None:
    """accelerate's loader calls ``set_epoch(its iteration count)`` at every ``iter()``, which reaches the GEKO
    sampler: its count of finished passes (0 in a resumed process, and not moved by a pass left with
    ``break``) would take GEKO back to an earlier epoch's plan. The epoch the loop set wins (a later one than
    the count); a loop that never calls ``set_epoch`` still gets accelerate's count."""
    set_epoch = getattr(prepared, "set_epoch", None)
    if set_epoch is None:
        return

    def follow(epoch: int) -> None:
        set_epoch(max(int(epoch), sampler.epoch))

    prepared.set_epoch = follow

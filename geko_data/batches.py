"""GEKOBatchSampler: an epoch that skips samples keeps its optimizer steps; its batches shrink instead.

A DataLoader with a fixed ``batch_size`` turns an epoch of 70% of the samples into 70% of the optimizer
steps. In short fine-tuning runs quality follows the number of steps more than the number of samples:
measured on MNIST (3 epochs, 8 seeds, dev split), a random 70% of the data each epoch at batch 64 ended
1.4 points under a full epoch's run, and within noise of it when the same 70% was cut into as many
batches as a full epoch. So this batch sampler gives each epoch the batch size that cuts its draws into as many batches as a
full epoch at ``batch_size`` takes (the compute saved is the samples not read: a backward pass costs per
sample), down to ``min_batch``; with fewer draws than that the epoch takes fewer steps, so a handful of
hard samples is not trained as a whole step each.

Typical loop::

    sampler = GEKOSampler(dataset, total_epochs=E)
    batches = GEKOBatchSampler(sampler, batch_size=32)
    loader = DataLoader(sampler.wrap(dataset), batch_sampler=batches, num_workers=2)

An epoch's batch size is a function of its draws alone (its last batch holds what is left, as a
DataLoader's), so a resume mid-epoch continues at the same batch boundaries; every rank of a distributed
run has the same draws (the sampler pads), so every rank takes the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Sampler

from geko_data.sampler import GEKOSampler
from geko_data.validate import check_int

__all__ = ["BATCHES", "GEKOBatchSampler", "epoch_batch_size", "full_epoch_steps", "smallest_batch"]

#: How a loop cuts an epoch into batches: ``steps`` (this module: a full epoch's steps, smaller batches) or
#: ``fixed`` (a DataLoader's ``batch_size``: fewer draws, fewer steps).
BATCHES = ("steps", "fixed")


def full_epoch_steps(full_draws: int, *, world_size: int, batch_size: int) -> int:
    """Batches a rank cuts a full epoch of ``full_draws`` (over all ranks) into at ``batch_size``."""
    return math.ceil(math.ceil(full_draws / world_size) / batch_size)


def smallest_batch(batch_size: int) -> int:
    """The default ``min_batch``: half of ``batch_size``, rounded up. Smaller batches would give a few hard
    samples whole optimizer steps (a step moves the weights about as far whatever its batch holds)."""
    return -(-batch_size // 2)


def epoch_batch_size(draws: int, *, steps: int, batch_size: int, min_batch: int) -> int:
    """The batch size of an epoch of ``draws``: ``batch_size`` when that already takes ``steps`` batches or
    more (a full epoch's batches are a plain DataLoader's), else the smallest that cuts it into at most
    ``steps`` batches (a whole batch size may give a few fewer, under ``draws / size``), never under
    ``min_batch``. The epoch's last batch holds what is left, as a DataLoader's."""
    if -(-draws // batch_size) >= steps:
        return batch_size
    return min(batch_size, max(min_batch, -(-draws // steps)))


class GEKOBatchSampler(Sampler[list[int]]):
    """Batches of a ``GEKOSampler``'s epoch, as many as a full epoch at ``batch_size`` takes.

    Args:
        sampler: the GEKOSampler whose epoch is cut into batches (call its ``set_epoch`` as usual).
        batch_size: the largest batch, and the one a full epoch is cut into (a plain DataLoader's batches).
        min_batch: the smallest batch while an epoch has fewer draws than ``steps * min_batch``; such an
            epoch takes fewer steps instead. Defaults to half of ``batch_size`` (rounded up).
        steps: batches of a full epoch. Defaults to ``ceil(draws of a full epoch on this rank /
            batch_size)``, a full epoch being ``sampler.epoch_length`` draws, or every sample once.
    """

    def __init__(self, sampler: GEKOSampler, *, batch_size: int, min_batch: int | None = None,
                 steps: int | None = None) -> None:
        if not isinstance(sampler, GEKOSampler):
            raise TypeError(f"`sampler` must be a GEKOSampler, got {type(sampler).__name__}")
        check_int("batch_size", batch_size, 1)
        check_int("min_batch", min_batch, 1, batch_size, optional=True)
        check_int("steps", steps, 1, optional=True)
        self.sampler = sampler
        # The short-run rule's kept share of FREEZE is chosen for epochs that keep their steps
        # (GEKOConfig.short_run_keep_steps): from the next plan on.
        sampler.keeps_steps = True
        self.batch_size = int(batch_size)
        self.min_batch = smallest_batch(self.batch_size) if min_batch is None else int(min_batch)
        if steps is None:
            steps = full_epoch_steps(sampler.epoch_length or sampler.num_samples,
                                     world_size=sampler.world.world_size, batch_size=self.batch_size)
        self.steps = int(steps)

    def _epoch(self) -> tuple[int, int, int]:
        """(this rank's draws of the epoch, the epoch's batch size, the draws already done: a resume's)."""
        left = len(self.sampler)  # plans the epoch if needed
        start = self.sampler.position
        size = epoch_batch_size(start + left, steps=self.steps, batch_size=self.batch_size,
                                min_batch=self.min_batch)
        if start % size and left:  # (the end of the epoch is a boundary, whatever its last batch held)
            raise ValueError(f"the sampler resumes at draw {start} of {start + left}, inside a batch (this "
                             f"epoch's batches hold {size}): save the position between batches (consumed= the "
                             f"samples of the batches done), and resume with the same batch_size and min_batch")
        return start + left, size, start

    def __len__(self) -> int:
        """Batches left in the current epoch (all of them unless resumed mid-epoch)."""
        draws, size, start = self._epoch()
        return -(-(draws - start) // size)

    def __iter__(self) -> Iterator[list[int]]:
        draws, size, start = self._epoch()
        it = iter(self.sampler)
        for a in range(start, draws, size):
            yield [next(it) for _ in range(min(size, draws - a))]

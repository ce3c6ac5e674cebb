"""SharedPlan: the current epoch's plan in shared memory, for DataLoader workers.

The main process owns the SampleState and computes each epoch's plan at
``set_epoch``; workers (fork or spawn, persistent or not) must filter with
*that* plan, not with the copy of the dataset object they were started with.
The plan's arrays live in torch shared-memory tensors: a forked worker
inherits the mapping, a spawned one receives the handle when the dataset is
pickled, and either sees the main process's later writes in place.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from geko_data.plan import EpochPlan

__all__ = ["SharedPlan"]


class SharedPlan:
    """Counts and loss weights of the current epoch, readable from any DataLoader worker.

    Counts are kept as uint16 (``max_repeats`` <= 1000), the type of the state file's ``plan_count``: 6 bytes a
    sample with the float32 weights, and a save writes the counts without converting them.

    Args:
        num_samples: number of samples (> 0).
    """

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        # int16 storage read as uint16 (torch's uint16 is a partial dtype); counts never exceed 1000
        self._counts = torch.zeros(self.num_samples, dtype=torch.int16).share_memory_()
        self._weight = torch.ones(self.num_samples, dtype=torch.float32).share_memory_()
        # meta: [epoch, progress, version]; epoch -1 = nothing published yet; version counts publishes.
        self._meta = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64).share_memory_()

    def publish(self, plan: EpochPlan) -> EpochPlan:
        """Make ``plan`` the current one (main process only, between epochs).

        Returns the same plan with read-only views of the shared arrays as its ``counts`` and ``loss_weight``:
        a caller that keeps it instead of ``plan`` holds the epoch's arrays once (800 MB at 100M samples),
        and that plan changes at the next ``publish``, as the epoch does.
        """
        if plan.counts.shape[0] != self.num_samples:
            raise ValueError(f"plan has {plan.counts.shape[0]} samples, expected {self.num_samples}")
        counts, weight = self._arrays()
        if not np.may_share_memory(counts, plan.counts):  # a plan published before, or written in place
            counts[:] = plan.counts
            weight[:] = plan.loss_weight
        meta = self._meta.numpy()
        meta[:] = (plan.epoch, plan.progress, meta[2] + 1)
        return dataclasses.replace(plan, counts=_read_only(counts), loss_weight=_read_only(weight))

    def writable(self) -> tuple[np.ndarray, np.ndarray]:
        """Writable views of the shared counts and loss weights, for the next plan to be written straight into
        them (``plan.epoch_plan(..., out=)``: no fresh memory, no copy), then given to ``publish``.

        Withdraws the published plan: ``view`` and ``read`` raise until the next ``publish``, so a plan left
        half-written by a failure is never taken for the previous one.
        """
        self._meta.numpy()[0] = -1
        return self._arrays()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._counts.numpy().view(np.uint16), self._weight.numpy()

    @property
    def epoch(self) -> int:
        return int(self._meta[0].item())

    @property
    def version(self) -> int:
        """How many plans were published: a worker's cache keyed by it follows every new plan, also one
        published again for the same epoch."""
        return int(self._meta[2].item())

    def read(self) -> EpochPlan:
        """The published plan; its arrays are copies, so a later ``publish`` cannot change them mid-epoch."""
        if self.epoch < 0:
            raise RuntimeError("no epoch plan published yet: call set_epoch() first")
        epoch, progress, _ = self._meta.numpy().tolist()
        counts, weight = self._arrays()
        return EpochPlan(epoch=int(epoch), progress=float(progress), counts=counts.copy(), loss_weight=weight.copy())

    def view(self) -> EpochPlan:
        """The published plan with read-only views of the shared arrays (no copy, in any process): they change
        at the next ``publish``, so a reader takes what it needs of them when an epoch starts."""
        if self.epoch < 0:
            raise RuntimeError("no epoch plan published yet: call set_epoch() first")
        epoch, progress, _ = self._meta.numpy().tolist()
        counts, weight = self._arrays()
        return EpochPlan(epoch=int(epoch), progress=float(progress), counts=_read_only(counts),
                         loss_weight=_read_only(weight))

    def weights(self) -> np.ndarray:
        """A read-only view of the current loss weights (no copy)."""
        return _read_only(self._weight.numpy())


def _read_only(view: np.ndarray) -> np.ndarray:
    view.flags.writeable = False
    return view

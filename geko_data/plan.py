"""The epoch plan: pure numpy, no files, no torch.distributed.

An epoch's plan is a function of (state snapshot, config, seed, epoch) only, so
every rank and DataLoader worker computes the same plan and nothing needs to be
broadcast. Mid-epoch resume takes the plan the state file kept (see ``EpochPlan``)
and skips the first k entries.

Randomness: every generator comes from ``rng(seed, epoch, purpose, ...)``, a
numpy SeedSequence over those integers, never from time or pid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geko_data import policy
from geko_data.config import GEKOConfig

__all__ = [
    "EpochPlan",
    "PURPOSE_ORDER",
    "PURPOSE_ROUND",
    "PURPOSE_SHARDS",
    "PURPOSE_WORKER",
    "epoch_plan",
    "global_order",
    "pad_to_multiple",
    "rank_slice",
    "rng",
    "stochastic_round",
]

# Distinct streams of randomness for distinct decisions, so that changing one
# (e.g. the order) never changes another (which samples are drawn).
PURPOSE_ROUND, PURPOSE_ORDER, PURPOSE_SHARDS, PURPOSE_WORKER = 1, 2, 3, 4


def rng(seed: int, epoch: int, purpose: int, *more: int) -> np.random.Generator:
    """The generator for one decision, derived from (seed, epoch, purpose, *more) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(purpose), *map(int, more)]))


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains on.

    Args:
        epoch: the epoch number.
        progress: curriculum progress of the epoch (its midpoint).
        counts: (N,) int32, how many times each sample is drawn this epoch.
        loss_weight: (N,) float32, the loss weight each sample carries this epoch.
        seed: the seed it was drawn with. Defaults to ``0``.
        epoch_length: the requested draws per epoch (``None``: the active count). Defaults to ``None``.

    A ``SampleState`` keeps the plan of its current epoch and saves it with its columns: reports made
    during an epoch change the plan's inputs (a frozen sample that turns wrong, ``times_seen`` against
    ``max_times_seen``, the losses InfoBatch compares), so a mid-epoch resume reuses the saved plan instead
    of recomputing it.
    """

    epoch: int
    progress: float
    counts: np.ndarray
    loss_weight: np.ndarray
    seed: int = 0
    epoch_length: int | None = None

    def matches(self, *, epoch: int, progress: float, seed: int, epoch_length: int | None,
                num_samples: int) -> bool:
        """True when this is the plan those arguments would draw (so it can be reused on resume)."""
        return (self.epoch == epoch and abs(self.progress - progress) < 1e-12 and self.seed == seed
                and self.epoch_length == epoch_length and self.counts.shape[0] == num_samples)

    @property
    def total(self) -> int:
        """Sample draws this epoch, over all ranks, before padding."""
        return int(self.counts.sum(dtype=np.int64))

    @property
    def num_unique(self) -> int:
        """Distinct samples drawn (each read once from a shard)."""
        return int(np.count_nonzero(self.counts))


def stochastic_round(expected: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """floor(x) plus 1 with probability frac(x): an integer count whose expectation is exactly x."""
    expected = np.asarray(expected, dtype=np.float64)
    base = np.floor(expected)
    frac = expected - base
    bump = generator.random(expected.shape[0]) < frac
    return (base + bump).astype(np.int32)


def epoch_plan(state: Any, *, seed: int, epoch: int, total_epochs: int, config: GEKOConfig | None = None,
               epoch_length: int | None = None) -> EpochPlan:
    """The plan of ``epoch`` from a state snapshot (any object with ``bucket``, ``pruned``, ``times_seen``,
    ``loss`` arrays and a ``config``, e.g. ``SampleState``)."""
    config = config if config is not None else state.config
    progress = policy.epoch_progress(epoch, total_epochs)
    expected, weight = policy.epoch_expected(
        bucket=state.bucket, pruned=state.pruned, times_seen=state.times_seen, loss=state.loss,
        epoch=epoch, total_epochs=total_epochs, config=config, epoch_length=epoch_length)
    counts = stochastic_round(expected, rng(seed, epoch, PURPOSE_ROUND))
    return EpochPlan(epoch=int(epoch), progress=progress, counts=counts, loss_weight=weight, seed=int(seed),
                     epoch_length=epoch_length)


def global_order(counts: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Every draw of the epoch as sample ids, shape (total,) int64; repeats are spread by the shuffle."""
    order = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    if shuffle:
        rng(seed, epoch, PURPOSE_ORDER).shuffle(order)
    return order


def pad_to_multiple(order: np.ndarray, multiple: int) -> np.ndarray:
    """Pad by repeating from the start (as DistributedSampler) to a length divisible by ``multiple``."""
    n = order.shape[0]
    if n == 0 or n % multiple == 0:
        return order
    pad = multiple - n % multiple
    return np.concatenate([order, np.resize(order, pad)])


def rank_slice(order: np.ndarray, *, rank: int, world_size: int, contiguous: bool = False) -> np.ndarray:
    """This rank's equal-length share of the (padded) order.

    Strided (``order[rank::world_size]``, DistributedSampler's split) by default; ``contiguous=True`` gives
    each rank one block, which keeps a streaming rank's reads within few shards.
    """
    padded = pad_to_multiple(order, world_size)  # (world_size * per_rank,)
    if contiguous:
        per_rank = padded.shape[0] // world_size
        return padded[rank * per_rank:(rank + 1) * per_rank]
    return padded[rank::world_size]

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
from geko_data.world import World

__all__ = [
    "EpochPlan",
    "PURPOSE_ORDER",
    "PURPOSE_ROUND",
    "PURPOSE_SHARDS",
    "PURPOSE_WORKER",
    "ShardLayout",
    "epoch_plan",
    "global_order",
    "pad_to_multiple",
    "partition",
    "rank_order",
    "rank_slice",
    "rng",
    "shard_positions",
    "stochastic_round",
    "worker_share",
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
        counts: (N,) int32 (uint16 in a plan published to DataLoader workers, ``SharedPlan``, or loaded with its
            state: a view of the file), how many times each sample is drawn this epoch.
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


#: Elements per step of the planning loops: their temporaries stay a few MB at any number of samples (whole-array
#: float64 temporaries cost 800 MB each at 100M samples), and the generator draws the same numbers in steps.
_CHUNK = 1 << 20


def stochastic_round(expected: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """floor(x) plus 1 with probability frac(x): an integer count whose expectation is exactly x; int32."""
    expected = np.asarray(expected)
    out = np.empty(expected.shape[0], dtype=np.int32)
    for a in range(0, expected.shape[0], _CHUNK):
        base = np.floor(np.asarray(expected[a:a + _CHUNK], dtype=np.float64))
        bump = generator.random(base.shape[0]) < (expected[a:a + _CHUNK] - base)
        out[a:a + _CHUNK] = np.add(base, bump, out=base)
    return out


def epoch_plan(state: Any, *, seed: int, epoch: int, total_epochs: int, config: GEKOConfig | None = None,
               epoch_length: int | None = None, out: tuple[np.ndarray, np.ndarray] | None = None) -> EpochPlan:
    """The plan of ``epoch`` from a state snapshot (any object with ``bucket``, ``pruned``, ``times_seen``,
    ``loss`` arrays and a ``config``, e.g. ``SampleState``). ``out``: (N,) arrays for the counts and loss
    weights to be written into (the shared memory DataLoader workers read: no fresh 8 bytes a sample)."""
    config = config if config is not None else state.config
    progress = policy.epoch_progress(epoch, total_epochs)
    generator = rng(seed, epoch, PURPOSE_ROUND)
    planned = None
    anneal = policy.annealing(epoch, total_epochs, config)
    if config.mode == "geko" and (not anneal or policy.anneal_share(total_epochs, config) is not None):
        planned = _geko_plan(state, progress=progress, config=config, epoch_length=epoch_length,
                             total_epochs=total_epochs, generator=generator, out=out, anneal=anneal)
    if planned is None:
        expected, weight = policy.epoch_expected(
            bucket=state.bucket, pruned=state.pruned, times_seen=state.times_seen, loss=state.loss,
            epoch=epoch, total_epochs=total_epochs, config=config, epoch_length=epoch_length)
        counts = stochastic_round(expected, generator)
    else:
        counts, weight = planned
    if out is not None and counts is not out[0]:  # the whole-array path made its own arrays
        out[0][:], out[1][:] = counts, weight
        counts, weight = out
    answer = getattr(state, "answer", None)
    if policy.balances_answers(total_epochs, config) and answer is not None:
        policy.balance_answers(counts, weight, answer, pruned=state.pruned, cap=config.answer_weight_cap,
                               seen=np.isfinite(state.loss))  # an unreported sample's answer is not known
    return EpochPlan(epoch=int(epoch), progress=progress, counts=counts, loss_weight=weight, seed=int(seed),
                     epoch_length=epoch_length)


def _geko_plan(state: Any, *, progress: float, config: GEKOConfig, epoch_length: int | None,
               total_epochs: int, generator: np.random.Generator,
               out: tuple[np.ndarray, np.ndarray] | None = None,
               anneal: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """``(counts, loss_weight)`` of a ``geko`` epoch that does not anneal (or anneals keeping a share of
    FREEZE, ``anneal``: ``policy.anneal_share``), bit for bit what
    ``policy.epoch_expected`` and ``stochastic_round`` give, in two passes of ``_CHUNK`` samples; ``None``
    where that cannot be promised (then the caller takes the whole-array path).

    In this mode a sample's expected count is one of five numbers: its bucket's weight times the epoch's
    scale, ``recheck_frozen`` (FREEZE), or 0 (pruned, or past ``max_times_seen``); in a short run that keeps
    a share of FREEZE (``policy.rescales``) at least that share, with one loss weight per kind. So the first pass counts the
    samples of each kind, the second looks each sample's count and weight up from its kind and rounds it
    with the same random numbers, and no (N,) float64 array exists: the whole-array path makes several
    (800 MB each at 100M samples) and a dozen passes over them. The scale is ``length / sum of weights``;
    that sum is exact here only when every weight is an integer (numpy sums the array pairwise, this sums
    counts), so other weights, and an epoch whose counts hit ``max_repeats`` (water-filling), take the
    whole-array path.
    """
    # [FREEZE, LIGHT, FOCUS, HARD]; an annealing epoch draws every trainable sample once (policy._expected_counts)
    table = (np.array([0.0, 1.0, 1.0, 1.0]) if anneal
             else policy.bucket_weight_table(progress, config, total_epochs=total_epochs))
    if not all(float(v).is_integer() for v in table):
        return None
    bucket, pruned, times_seen = state.bucket, state.pruned, state.times_seen
    n = bucket.shape[0]
    limit = config.max_times_seen

    def kinds(a: int) -> np.ndarray:
        # 0-3: an unpruned sample's bucket (FREEZE whatever its passes); 4: a trainable sample past
        # max_times_seen (expected count 0, weight 1); 5: pruned (0 and 0). As byte arithmetic, the largest
        # code winning (a bucket is at most 3): 30x faster than masked writes.
        b = bucket[a:a + _CHUNK]
        out = np.multiply(pruned[a:a + _CHUNK], np.uint8(5), dtype=np.uint8)
        if limit > 0:
            past = (times_seen[a:a + _CHUNK] >= limit) & (b != policy.FREEZE)
            np.maximum(out, np.multiply(past, np.uint8(4), dtype=np.uint8), out=out)
        return np.maximum(out, b, out=out)

    per_kind = np.zeros(6, dtype=np.int64)
    for a in range(0, n, _CHUNK):
        k = kinds(a)  # six compares in cache: a third of bincount's time (it widens the codes to int64)
        per_kind += [np.count_nonzero(k == code) for code in range(6)]
    n_active = int(per_kind[1:4].sum())
    weights = table.copy()
    if sum(int(table[k]) * int(per_kind[k]) for k in range(1, 4)) == 0:
        weights[1:] = 1.0  # every trainable sample in a zero-weight bucket: uniform over them (as the policy)
    total = sum(int(weights[k]) * int(per_kind[k]) for k in range(1, 4))
    if total >= 2**53:
        return None
    length = float(n_active if epoch_length is None or anneal else int(epoch_length))
    expected = np.zeros(6, dtype=np.float64)  # by kind: what the whole-array path computes per sample
    if total > 0 and length > 0:
        scale = length / float(total)
        if max(float(weights[k]) for k in range(1, 4) if per_kind[k]) * scale > config.max_repeats:
            return None  # water-filling
        expected[1:4] = weights[1:4] * scale
    keep = policy.anneal_share(total_epochs, config) if anneal else policy.kept_share(total_epochs, config)
    if keep is not None:
        # a short run keeps a share of every unpruned sample (FREEZE and past max_times_seen included) and
        # weighs each by c / expected (policy._expected_counts)
        expected[:5] = np.maximum(expected[:5], keep)
        n_alive = int(per_kind[:5].sum())
        c = policy.rescale_constant(float(sum(float(expected[k]) * int(per_kind[k]) for k in range(5))),
                                    n_alive) if n_alive else 1.0
        trained = np.zeros(6, dtype=np.float32)
        trained[:5] = (c / expected[:5]).astype(np.float32)
    else:
        expected[policy.FREEZE] = config.recheck_frozen
        trained = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32)  # FREEZE: forward only
    base = np.floor(expected)
    frac = expected - base
    counts, weight = out if out is not None else (np.empty(n, dtype=np.int32), np.empty(n, dtype=np.float32))
    base_count = base.astype(counts.dtype)
    for a in range(0, n, _CHUNK):
        # The kinds as an index once: a uint8 index is widened to int64 by every look-up (3 here).
        k = kinds(a).astype(np.intp)
        # stochastic_round's draws, in its steps: floor(x) + (u < x - floor(x)); the look-ups written in place
        # (mode="clip": the kinds are in range, and take(out=) buffers its output in the default mode)
        here = counts[a:a + _CHUNK]
        np.take(base_count, k, out=here, mode="clip")
        here += generator.random(k.shape[0]) < frac.take(k)
        np.take(trained, k, out=weight[a:a + _CHUNK], mode="clip")
    return counts, weight


def global_order(counts: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Every draw of the epoch as sample ids, shape (total,); repeats are spread by the shuffle.

    int32 when every id fits (half the memory of int64), int64 past 2**31 samples. The shuffle is uniform
    (every arrangement of the draws equally likely) and a function of (seed, epoch) only; see
    ``_block_shuffle`` for how it stays within the CPU cache.
    """
    dtype, total = _order_type(counts)
    return _block_shuffle(counts, total, dtype, rng(seed, epoch, PURPOSE_ORDER) if shuffle else None)


def _order_type(counts: np.ndarray, total: int | None = None) -> tuple[Any, int]:
    """``(dtype, total)`` of the epoch's order: int32 ids when every id fits, and the number of draws (summed
    unless the caller has it)."""
    dtype = np.int32 if counts.shape[0] <= np.iinfo(np.int32).max else np.int64
    return dtype, int(np.sum(counts, dtype=np.int64)) if total is None else int(total)


def _draws_in_id_order(counts: np.ndarray) -> Any:
    """``(position, first id, offsets)`` pieces of ``np.repeat(arange(n), counts)``, at most ``_CHUNK`` draws
    each: a piece's draws are ``first id + offsets`` (offsets uint32, below ``_CHUNK``: the piece's ids come
    from one chunk of ``_CHUNK`` ids), so the deal packs each draw with its block label into one sortable key.

    np.repeat converts its counts to int64: one chunk of ids at a time keeps that small, and a chunk of ids
    whose draws exceed ``_CHUNK`` (repeats) is handed out in pieces. A chunk without repeats (counts 0 and 1,
    the usual epoch) is a compress, 4x faster than np.repeat.
    """
    n, pos = counts.shape[0], 0
    offsets = np.arange(min(_CHUNK, n), dtype=np.uint32)
    for a in range(0, n, _CHUNK):
        c = counts[a:a + _CHUNK]
        part = (np.compress(c != 0, offsets[:c.shape[0]]) if c.max() <= 1
                else np.repeat(offsets[:c.shape[0]], c))
        for b in range(0, part.shape[0], _CHUNK):
            yield pos + b, a, part[b:b + _CHUNK]
        pos += part.shape[0]


#: Draws per block of the epoch's shuffle (int32: 1 MB, within a core's cache).
_BLOCK = 1 << 18


def _block_shuffle(counts: np.ndarray, total: int, dtype: Any,
                   generator: np.random.Generator | None) -> np.ndarray:
    """The draws of ``counts`` in a uniformly random order (Rao-Sandelius' two-level shuffle); in id order
    without a ``generator``.

    Each draw goes to one of ``ceil(total / _BLOCK)`` blocks picked uniformly at random, the blocks are laid
    out one after the other and each is shuffled in place. Every arrangement is exactly as likely as under
    one Fisher-Yates shuffle of the whole order, but a shuffle of 100M draws (400 MB) makes a cache miss
    at nearly every swap, while a block's swaps stay in cache and the deal into blocks writes a few hundred
    sequential streams: about 3x less CPU at 100M samples. ``DealtOrder`` shuffles the blocks on demand.
    """
    dealt = _deal(counts, np.empty(total, dtype=dtype), generator)
    dealt.ready(total)
    return dealt.order


class DealtOrder:
    """An epoch's draws dealt into blocks (``_block_shuffle``), each block shuffled when first needed.

    Block b is shuffled by the epoch's generator right after blocks 0..b-1, as ``_block_shuffle`` does: made
    ready in position order, the order is that one bit for bit, whenever each block's shuffle runs. So
    ``set_epoch`` deals and the iterator shuffles (about 40% of the order's CPU at 100M samples), and a
    resume mid-epoch, which makes the positions before its start ready first, sees the same order.

    Args:
        order: (total,) the draws, block after block; positions before ``ready``'s stop are final.
        edges: (blocks + 1,) where each block starts, then the end (a single ``[total]`` when nothing is left
            to shuffle).
        generator: the epoch's order generator, drawn up to the first block's shuffle (``None``: unshuffled).
    """

    def __init__(self, order: np.ndarray, edges: list[int], generator: np.random.Generator | None) -> None:
        self.order = order
        self._edges = edges
        self._generator = generator
        self._next = 0  # blocks shuffled so far

    def ready(self, stop: int) -> np.ndarray:
        """``order`` with every position below ``stop`` final (the blocks that hold them shuffled, in order)."""
        edges = self._edges
        while self._next < len(edges) - 1 and edges[self._next] < stop:
            assert self._generator is not None
            self._generator.shuffle(self.order[edges[self._next]:edges[self._next + 1]])
            self._next += 1
        return self.order


def _deal(counts: np.ndarray, order: np.ndarray, generator: np.random.Generator | None) -> DealtOrder:
    """Deal the draws of ``counts`` into ``order`` ((total,), written whole) by the blocks of ``_block_shuffle``;
    the blocks are left to ``DealtOrder.ready`` to shuffle."""
    total, dtype = order.shape[0], order.dtype
    num_blocks = -(-total // _BLOCK)
    if generator is None or num_blocks <= 1:  # unshuffled, or one block: one plain shuffle
        for pos, first, offsets in _draws_in_id_order(counts):
            np.add(offsets, first, out=order[pos:pos + offsets.shape[0]], dtype=dtype, casting="unsafe")
        return DealtOrder(order, [total] if generator is None else [0, total], generator)
    label_type = np.uint16 if num_blocks <= 1 << 16 else np.uint32  # 2 bytes a draw up to 17G draws
    labels = generator.integers(0, num_blocks, size=total, dtype=label_type)
    size = np.zeros(num_blocks, dtype=np.int64)
    for a in range(0, total, _CHUNK):  # bincount converts its input to int64: a chunk at a time
        size += np.bincount(labels[a:a + _CHUNK], minlength=num_blocks)
    fill = np.cumsum(size) - size  # (num_blocks,) where each block's next draw goes
    edges = [*fill.tolist(), total]
    # A piece's draws grouped by block, in id order inside a block, is the sort of (label, offset) keys: the
    # offsets ascend with position (equal ones are one id's repeats), so it is the stable sort of the labels.
    # One sort of 4-byte keys (numpy's SIMD sort) and no gather: 1.5-1.9x faster than the stable argsort of
    # the labels, the gather of the draws through it and a bincount of the labels; each block's group is
    # then one memcpy to the block's next free place.
    shift = max(1, (_CHUNK - 1).bit_length())  # offset bits
    key_type = np.uint32 if num_blocks << shift <= 1 << 32 else np.uint64
    starts = np.arange(num_blocks, dtype=key_type) << key_type(shift)  # the smallest key of each block
    for pos, first, offsets in _draws_in_id_order(counts):
        key = labels[pos:pos + offsets.shape[0]].astype(key_type)
        key <<= key_type(shift)
        key |= offsets
        key.sort()
        at = [*np.searchsorted(key, starts).tolist(), key.shape[0]]  # each block's group in the sorted piece
        key &= key_type((1 << shift) - 1)
        dealt = np.add(key, first, dtype=dtype, casting="unsafe")
        for b, start in enumerate(fill.tolist()):
            order[start:start + at[b + 1] - at[b]] = dealt[at[b]:at[b + 1]]
        fill += np.diff(at)
    return DealtOrder(order, edges, generator)


class RankOrder:
    """``world.rank``'s order of a map-style epoch (``rank_order`` without shards), dealt now and shuffled a
    block at a time as the positions are reached (``ready``).

    The global order is written into ``buffer`` when it holds ``dtype`` and has room (the previous epoch's:
    memory this process has touched costs far less kernel time than fresh pages), else into a new array
    with 1/32 to spare, so that a next epoch a little longer still fits. The padding (DistributedSampler's:
    the first draws repeated up to a multiple of the world size) is written after the draws, in place.

    Args:
        counts: (N,) the epoch's draws per sample.
        world: the ranks (``world.rank``'s share is strided, as DistributedSampler).
        seed: the run's seed.
        epoch: the epoch.
        shuffle: shuffle the order. Defaults to ``True``.
        buffer: an array to write the global order into, if it fits. Defaults to ``None``.
        total: ``counts``' sum, when the caller has it (a pass over the plan less). Defaults to ``None``.
    """

    def __init__(self, counts: np.ndarray, *, world: World, seed: int, epoch: int, shuffle: bool = True,
                 buffer: np.ndarray | None = None, total: int | None = None) -> None:
        dtype, total = _order_type(counts, total)
        ws = world.world_size
        pad = -total % ws
        if buffer is None or buffer.dtype != dtype or buffer.shape[0] < total + pad:
            buffer = np.empty(total + pad + (total + pad) // 32, dtype=dtype)
        #: The array the global order was written into (keep it for the next epoch's ``buffer``).
        self.buffer = buffer
        self._dealt = _deal(counts, buffer[:total], rng(seed, epoch, PURPOSE_ORDER) if shuffle else None)
        if pad:  # pad < ws: from the first block(s), made final now
            buffer[total:total + pad] = np.resize(self._dealt.ready(pad)[:pad], pad)
        self._ws = ws
        #: (per_rank,) this rank's ids in yield order; a position is final once ``ready`` has passed it.
        self.order = buffer[world.rank:total + pad:ws]

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def ready(self, stop: int) -> np.ndarray:
        """``order`` with every position below ``stop`` final."""
        self._dealt.ready(stop * self._ws)  # rank position p is global position p * ws + rank < stop * ws
        return self.order


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


# ------------------------------------------------------------------ partition: who reads which sample where
@dataclass(frozen=True)
class ShardLayout:
    """Where the samples of a sharded source live, for a stream's reading order.

    Args:
        sample_shard: (N,) the shard of every sample id; ids are grouped by shard, in shard order.
        num_shards: number of shards (> every value of ``sample_shard``).
        shuffle_buffer: block size of the sample shuffle after the rank split. Defaults to ``512``.
    """

    sample_shard: np.ndarray
    num_shards: int
    shuffle_buffer: int = 512

    def __post_init__(self) -> None:
        for name, lo in (("num_shards", 1), ("shuffle_buffer", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}")
        shard = np.asarray(self.sample_shard)
        # A stream reads each shard front to back: ids must be grouped by shard, in shard order.
        if shard.ndim != 1 or (shard.size and (shard[0] < 0 or shard[-1] >= self.num_shards
                                               or (np.diff(shard) < 0).any())):
            raise ValueError(f"`sample_shard` must be a 1-d array of shard numbers in [0, {self.num_shards}) "
                             f"grouped by shard in shard order, got {shard!r}")


def shard_positions(num_shards: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """(num_shards,) the place at which each shard is visited in ``epoch`` (identity without ``shuffle``)."""
    position = np.arange(num_shards)
    if shuffle:
        position[rng(seed, epoch, PURPOSE_SHARDS).permutation(num_shards)] = np.arange(num_shards)
    return position


def rank_order(counts: np.ndarray, *, world: World, seed: int, epoch: int, shuffle: bool = True,
               shards: ShardLayout | None = None, shard_position: np.ndarray | None = None) -> np.ndarray:
    """``world.rank``'s sample ids for the epoch in yield order, (per_rank,) int64 (pure; workers ignored).

    Without ``shards`` (a map-style sampler): every draw in one seeded shuffle, ranks strided as
    DistributedSampler. With ``shards`` (a stream): shards in a seeded order (``shard_position``, when the
    caller already has the epoch's ``shard_positions``), samples in file order with repeats adjacent, ranks
    in contiguous slices (reads stay within few shards), then a block shuffle of ``shards.shuffle_buffer``
    that spreads repeats while keeping reads local. Every rank gets the same length (padded by repetition).
    """
    if shards is None:
        ranked = RankOrder(counts, world=world, seed=seed, epoch=epoch, shuffle=shuffle)
        return ranked.ready(len(ranked))  # (per_rank,)
    if shards.sample_shard.shape[0] != counts.shape[0]:
        raise ValueError(f"`sample_shard` has {shards.sample_shard.shape[0]} samples, the plan "
                         f"{counts.shape[0]}")
    if shard_position is None:
        shard_position = shard_positions(shards.num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
    ids = np.flatnonzero(counts)  # (active,) ascending id = shard order, then file order
    ids = ids[np.argsort(shard_position[shards.sample_shard[ids]], kind="stable")]
    seq = np.repeat(ids, counts[ids])  # (total,)
    mine = rank_slice(seq, rank=world.rank, world_size=world.world_size, contiguous=True)  # (per_rank,)
    if shuffle and mine.shape[0] > 1:
        noise = rng(seed, epoch, PURPOSE_ORDER, world.rank).random(mine.shape[0])
        block = np.arange(mine.shape[0]) // shards.shuffle_buffer
        mine = mine[np.lexsort((noise, block))]
    return mine


def worker_share(order: np.ndarray, *, world: World, batch_size: int = 1, start: int = 0) -> np.ndarray:
    """``world.worker``'s part of a rank's ``order`` from position ``start``, (<= ceil(rest / num_workers),).

    Batch j of what is left goes to worker ``j % num_workers``: exactly how the DataLoader's round-robin
    collects batches, so the loop sees the rank order itself whatever the number of workers, and a resume
    after ``start`` samples deals what is left the same way.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    rest = order[start:]  # (rest,)
    if world.num_workers == 1:
        return rest
    return rest[(np.arange(rest.shape[0]) // batch_size) % world.num_workers == world.worker]


def partition(counts: np.ndarray, *, world: World, seed: int, epoch: int, shuffle: bool = True,
              shards: ShardLayout | None = None, batch_size: int = 1, start: int = 0) -> np.ndarray:
    """The sample ids ``world`` (its rank and DataLoader worker) yields in ``epoch``, in order (pure).

    ``counts`` (N,) is the epoch's plan. ``rank_order`` splits it by rank, ``worker_share`` by worker;
    see them for the sampler's and the stream's orders.
    """
    order = rank_order(counts, world=world, seed=seed, epoch=epoch, shuffle=shuffle, shards=shards)
    return worker_share(order, world=world, batch_size=batch_size, start=start)

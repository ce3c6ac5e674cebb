"""Which byte ranges an epoch fetches from remote shards, and which DataLoader worker fetches each (pure).

``plan_requests`` coalesces sample byte ranges into requests. ``RangePlan`` lays out one rank's epoch for
one worker: the rank's order is cut into blocks of about ``chunk`` samples per worker, the drawn samples
of every worker in a block and shard are coalesced together (the workers' batches interleave sample by
sample in file order, so ranges planned per worker would carry about one sample per worker each), and
each range gets one fetching worker among the workers that read it: the only reader when there is one
(no hand-over), else the reader with the fewest bytes so far. Every worker computes the same plan from
the same inputs, so nothing but the fetched bytes is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geko_data.shards import ShardIndex

__all__ = ["RangePlan", "Request", "plan_requests"]

#: Chunks of look-ahead: while a worker reads chunk c it has every range it fetches for chunks up to
#: c + AHEAD on the wire. A DataLoader keeps its workers within a few batches of each other, so a worker
#: about to read chunk c + 1 finds what another worker fetches for it already requested, even while that
#: worker waits in chunk c for the loader to take its batches.
AHEAD = 2


@dataclass(frozen=True)
class Request:
    """One byte-range request: bytes ``start..end`` (end exclusive) holding samples ``lo..hi`` (exclusive)
    of the planner's input."""

    start: int
    end: int
    lo: int
    hi: int


def plan_requests(offsets: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray, *, gap: int,
                  max_request: int) -> list[Request]:
    """Coalesce sample byte ranges (sorted by offset, not overlapping) into requests.

    A sample joins the current request when it starts right at the request's end or less than ``gap``
    bytes after it, and the request stays within ``max_request`` bytes; otherwise it starts a new one.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if offsets.shape != lengths.shape or offsets.ndim != 1:
        raise ValueError(f"`offsets` and `lengths` must be 1-d of one length, got {offsets.shape} and "
                         f"{lengths.shape}")
    if offsets.size and ((lengths <= 0).any() or (offsets < 0).any()):
        raise ValueError("sample ranges need offsets >= 0 and lengths > 0")
    ends = offsets + lengths
    if offsets.size > 1 and (offsets[1:] < ends[:-1]).any():
        raise ValueError("sample ranges must be sorted by offset and must not overlap")
    out: list[Request] = []
    lo = 0
    for i in range(1, offsets.size + 1):
        if i < offsets.size and offsets[i] - ends[i - 1] < max(gap, 1) and ends[i] - offsets[lo] <= max_request:
            continue
        if offsets.size:
            out.append(Request(int(offsets[lo]), int(ends[i - 1]), lo, i))
        lo = i
    return out


def _chunk_of_positions(reader: np.ndarray, num_workers: int, chunk: int) -> np.ndarray:
    """(P,) the chunk of its reader's sequence each position falls in (chunk c of worker w holds w's
    positions ``c * chunk .. (c + 1) * chunk``)."""
    out = np.empty(reader.shape[0], dtype=np.int64)
    for w in range(num_workers):
        mask = reader == w
        out[mask] = np.arange(int(mask.sum())) // chunk
    return out


class RangePlan:
    """One rank's remote ranges for one DataLoader worker (pure).

    Args:
        index: the shard index.
        remote: per shard, whether it is read by byte ranges.
        order: what is left of the rank's epoch, in yield order (P,).
        batch: the DataLoader's batch size: batch ``j`` of ``order`` goes to worker ``j % num_workers``.
        num_workers, worker: the DataLoader's workers and this one.
        chunk: samples a worker reads at a time (the stream's ``shuffle_buffer``).
        gap, max_request: as ``plan_requests``.

    Attributes: ``ranges`` (R, 3) shard, start, end; ``readers[r]`` the workers reading range r;
    ``fetcher`` (R,) the worker fetching it; ``chunk_ranges[c]`` {sample id: range} of this worker's chunk
    c; ``release_at[c]`` the ranges this worker reads for the last time in chunk c; ``owned`` the ranges it
    fetches, in the order they are needed; ``due(c)`` how many of them must be requested by the time it
    reads chunk c.
    """

    def __init__(self, *, index: ShardIndex, remote: Sequence[bool], order: np.ndarray, batch: int,
                 num_workers: int, worker: int, chunk: int, gap: int, max_request: int) -> None:
        self.worker, self.chunk = worker, chunk
        pos = np.arange(order.shape[0])
        reader = (pos // batch) % num_workers  # (P,)
        pos_chunk = _chunk_of_positions(reader, num_workers, chunk)  # (P,)
        kept = pos[np.asarray(remote, dtype=bool)[index.shard[order]]]  # (K,) positions of remote samples
        pos_range = self._plan_ranges(index, order, kept, kept // (chunk * num_workers), gap, max_request)
        n = len(self.ranges)
        self.readers: list[set[int]] = [set() for _ in range(n)]
        for r, w in set(zip(pos_range.tolist(), reader[kept].tolist())):
            self.readers[r].add(w)
        need = np.full(n, np.iinfo(np.int64).max)  # (R,) first chunk (of any reader) that reads the range
        np.minimum.at(need, pos_range, pos_chunk[kept])
        self.fetcher = self._assign([int(e - s) for _, s, e in self.ranges])
        mine = reader[kept] == worker
        self.chunk_ranges: dict[int, dict[int, int]] = {}
        last: dict[int, int] = {}  # range -> this worker's last chunk reading it
        for c, i, r in zip(pos_chunk[kept][mine].tolist(), order[kept][mine].tolist(), pos_range[mine].tolist()):
            self.chunk_ranges.setdefault(c, {}).setdefault(i, r)
            last[r] = max(last.get(r, -1), c)
        self.release_at: dict[int, list[int]] = {}
        for r, c in last.items():
            self.release_at.setdefault(c, []).append(r)
        owned = np.flatnonzero(self.fetcher == worker)
        self.owned = owned[np.argsort(need[owned], kind="stable")]  # (O,) in the order they are needed
        self._owned_need = need[self.owned]
        self.last = int(pos_chunk[reader == worker].max()) if (reader == worker).any() else -1

    def _plan_ranges(self, index: ShardIndex, order: np.ndarray, kept: np.ndarray, block: np.ndarray, gap: int,
                     max_request: int) -> np.ndarray:
        """Ranges per (block, shard) over every worker's samples; returns the range of each kept position."""
        n = index.num_samples + 1
        keys = block.astype(np.int64) * n + order[kept]
        pairs = np.unique(keys)  # sorted by block, then id (= shard, then file order)
        pair_block, pair_id = np.divmod(pairs, n)
        self.ranges: list[tuple[int, int, int]] = []
        pair_range = np.empty(pairs.shape[0], dtype=np.int64)
        cut = np.flatnonzero(np.diff(pair_block) | np.diff(index.shard[pair_id])) + 1
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, pairs.shape[0]]):
            ids = pair_id[lo:hi]
            for req in plan_requests(index.offset[ids], index.length[ids], gap=gap, max_request=max_request):
                pair_range[lo + req.lo:lo + req.hi] = len(self.ranges)
                self.ranges.append((int(index.shard[ids[0]]), req.start, req.end))
        return pair_range[np.searchsorted(pairs, keys)]

    def _assign(self, sizes: list[int]) -> np.ndarray:
        """The fetching worker of each range: its only reader, else the reader with the fewest bytes."""
        load: dict[int, int] = {}
        out = np.empty(len(sizes), dtype=np.int64)
        for r, readers in enumerate(self.readers):
            w = min(readers, key=lambda x: (load.get(x, 0), x))
            load[w] = load.get(w, 0) + sizes[r]
            out[r] = w
        return out

    def due(self, chunk: int) -> int:
        """How many of ``owned`` must be requested before this worker reads ``chunk``."""
        return int(np.searchsorted(self._owned_need, chunk + AHEAD, side="right"))

"""Shards in object stores: read only the byte ranges of the samples an epoch draws.

A shard URL (``s3://``, ``gs://``, ``az://``, ``http(s)://`` or any protocol of an installed fsspec
filesystem) is read with byte-range requests: the index gives every sample's offset and length, the plan
(``ranges.py``, pure) coalesces the drawn samples into requests and gives each request one fetching
DataLoader worker, the fetcher (``fetch.py``) keeps a bounded number of requests in flight with retries,
and a worker hands what it fetched for others over through shared memory (``handover.py``). Frozen
samples are never fetched and every range is fetched once, so the bytes fetched shrink with the frozen
share and do not grow with the number of workers. Fetched bytes go through ``shards.parse_sample``, the
parser of local seek reads. Indexes of remote shards are in ``remote_index.py``, URLs and their errors
in ``urls.py``; this module holds the reader the stream uses and re-exports the rest.

Credentials stay in ``storage_options`` (or the filesystem library's usual sources: environment,
config files, instance roles); they are never written to an index or a state file, and every message
raised has them and any ``user:password@`` of a URL replaced by ``***``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from typing import Any

import numpy as np

from geko_data.fetch import Fetched, RangeFetcher, RemoteConfig
from geko_data.handover import Handover, range_dir
from geko_data.ranges import RangePlan, Request, plan_requests
from geko_data.remote_index import (ShardsAt, expand_urls, index_remote, read_index_url, resolve_shard_name,
                                    write_index_url)
from geko_data.shards import ShardError, ShardIndex, parse_sample
from geko_data.urls import PROTOCOL_PACKAGES, RemoteError, describe, is_transient, is_url, open_url, redact

__all__ = ["PROTOCOL_PACKAGES", "Fetched", "RangeFetcher", "RangeReader", "RemoteConfig", "RemoteError", "Request",
           "SharedRanges", "ShardsAt", "describe", "expand_urls", "index_remote", "is_transient", "is_url", "open_url",
           "plan_requests", "range_dir", "read_index_url", "redact", "resolve_shard_name", "write_index_url"]

#: Seconds a worker waits for a range another worker fetches before fetching it itself. The plan requests
#: every range chunks ahead of its first use, so this only ends a wait the plan did not foresee.
HANDOVER_WAIT = 10.0


class SharedRanges:
    """One rank's remote ranges for one DataLoader worker: the plan (``RangePlan``) and the hand-over
    (``Handover``) of the ranges this worker fetches for others or reads from them.

    Every worker builds the same plan from ``order`` (what is left of the rank's epoch), ``batch``,
    ``num_workers`` and ``tag`` (unique per epoch plan); ``folder`` is the stream's ``range_dir()``.
    """

    def __init__(self, *, index: ShardIndex, remote: Sequence[bool], order: np.ndarray, batch: int,
                 num_workers: int, worker: int, chunk: int, folder: str, tag: str, config: RemoteConfig) -> None:
        self.plan = RangePlan(index=index, remote=remote, order=order, batch=batch, num_workers=num_workers,
                              worker=worker, chunk=chunk, gap=config.gap, max_request=config.max_request)
        self.handover = Handover(folder=folder, tag=tag, worker=worker, wait=HANDOVER_WAIT)


class RangeReader:
    """Reads samples of remote shards for one worker: fetches the ranges the plan gives it (chunks ahead),
    takes the others' from the hand-over, parses.

    ``tally`` counts ``bytes_read`` (all bytes this process fetched, gaps included), ``requests`` (every
    try, size checks included) and ``retries`` since its owner last reset it. Each shard's size is checked
    against the index once per fetching process, in flight with its first ranges.
    """

    def __init__(self, index: ShardIndex, urls: Sequence[str], fetcher: RangeFetcher,
                 share: SharedRanges | None = None) -> None:
        self.index = index
        self.urls = list(urls)
        self.fetcher = fetcher
        self.share = share
        self._chunk = 0
        self._submitted = 0  # how many of the plan's owned ranges are requested
        self._owned: dict[int, Future[Fetched]] = {}  # range -> its request, until this worker's last use
        self._taken: dict[int, bytes | ShardError] = {}  # ranges from the hand-over, until the last use
        self.tally = {"bytes_read": 0, "requests": 0, "retries": 0}
        self._remote = [is_url(u) for u in self.urls]
        self._closed = False

    def handles(self, shard: int) -> bool:
        """Whether shard number ``shard`` is remote (read here) rather than a local file or a pipe."""
        return self._remote[shard]

    def _take_tally(self) -> None:
        for k, v in self.fetcher.take_tally().items():
            self.tally[k] += v

    def _parse(self, i: int, buf: bytes, check: Callable[[int, bytes], None] | None) -> dict[str, Any] | ShardError:
        off = int(self.index.offset[i])
        try:
            if check is not None:
                check(i, buf)
            return parse_sample(buf, shard=self.urls[int(self.index.shard[i])], key=str(self.index.keys[i]),
                                offset=off)
        except ShardError as e:
            return e

    def _slice(self, i: int, data: bytes | ShardError, start: int, check: Callable[[int, bytes], None] | None
               ) -> dict[str, Any] | ShardError:
        if isinstance(data, ShardError):
            return data
        off, length = int(self.index.offset[i]), int(self.index.length[i])
        return self._parse(i, data[off - start:off - start + length], check)

    def read(self, ids: Iterable[int], *, check: Callable[[int, bytes], None] | None = None
             ) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
        """``(id, sample or ShardError)`` for every id; samples of one shard come in file order.

        ``check(id, raw bytes)`` runs before parsing and may raise ShardError (the content hash check).
        With a ``share``, call it once per chunk of the worker's order, in order, with the remote ids of
        that chunk (an empty list too: the reader counts chunks).
        """
        if self.share is None:
            yield from self._read_direct([int(i) for i in ids], check)
        else:
            yield from self._read_planned([int(i) for i in ids], check)
        self._take_tally()

    def _read_direct(self, ids: list[int], check: Callable[[int, bytes], None] | None
                     ) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
        """Without a plan: the ids' ranges planned and fetched now, all in flight together."""
        by_shard: dict[int, list[int]] = {}
        for i in ids:
            by_shard.setdefault(int(self.index.shard[i]), []).append(i)
        jobs: list[tuple[Future[Fetched], int, np.ndarray]] = []
        cfg = self.fetcher.config
        for shard, group in by_shard.items():
            run = np.asarray(group, dtype=np.int64)
            run = run[np.argsort(self.index.offset[run], kind="stable")]
            for req in plan_requests(self.index.offset[run], self.index.length[run], gap=cfg.gap,
                                     max_request=cfg.max_request):
                future = self.fetcher.submit(self.urls[shard], req.start, req.end, size=self.index.sizes[shard])
                jobs.append((future, req.start, run[req.lo:req.hi]))
        for future, start, run in jobs:
            got = future.result()
            data = got.error if got.error is not None else got.value
            for i in run.tolist():
                yield i, self._slice(i, data, start, check)

    def _submit(self, r: int) -> None:
        share = self.share
        assert share is not None
        shard, start, end = share.plan.ranges[r]
        readers = share.plan.readers[r]

        def hand_over(got: Fetched) -> None:
            if self._closed:  # failed because this reader stopped early: no error for the others to find
                return
            share.handover.deliver(r, got.value, None if got.error is None else str(got.error), readers)

        self._owned[r] = self.fetcher.submit(self.urls[shard], start, end, size=self.index.sizes[shard],
                                             then=hand_over if len(readers) > 1 else None)

    def _range(self, r: int) -> bytes | ShardError:
        """Range ``r``'s bytes: from this worker's own request, else from the hand-over (or, if that stalls,
        fetched here)."""
        if r in self._owned:
            got = self._owned[r].result()
            return got.error if got.error is not None else got.value
        if r not in self._taken:
            share = self.share
            assert share is not None
            data = share.handover.take(r)
            if data is None:  # the fetching worker did not deliver in time: fetch it here (counted here)
                shard, start, end = share.plan.ranges[r]
                got = self.fetcher.submit(self.urls[shard], start, end, size=self.index.sizes[shard]).result()
                data = got.error if got.error is not None else got.value
            self._taken[r] = data
        return self._taken[r]

    def _read_planned(self, ids: list[int], check: Callable[[int, bytes], None] | None
                      ) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
        share = self.share
        assert share is not None
        plan = share.plan
        chunk, self._chunk = self._chunk, self._chunk + 1
        due = plan.due(chunk)
        while self._submitted < due:  # this chunk's ranges and the next chunks' are on the wire
            self._submit(int(plan.owned[self._submitted]))
            self._submitted += 1
        need = plan.chunk_ranges.get(chunk, {})
        planned = [i for i in ids if i in need]
        if len(planned) < len(ids):  # ids the plan did not foresee: read them on their own
            yield from self._read_direct([i for i in ids if i not in need], check)
        for i in planned:
            r = need[i]
            yield i, self._slice(i, self._range(r), plan.ranges[r][1], check)
        for r in plan.release_at.get(chunk, ()):
            self._owned.pop(r, None)
            self._taken.pop(r, None)
            share.handover.release(r)
        if chunk >= plan.last:  # every range this worker fetches for others is delivered before it stops
            self.finish()

    def finish(self) -> None:
        """Wait for every request of this worker (the ranges it fetches for others)."""
        wait(list(self._owned.values()))

    def close(self) -> None:
        """Stop: requests still in flight are dropped (not handed over), the fetcher's sessions closed."""
        self._closed = True
        self.fetcher.close()

"""Reading the planned samples of one worker out of tar shards: seek reads of local files, a cursor over
byte streams (pipes, URLs read through), and the bookkeeping of what bad data cost.

``ShardReader.read(ids)`` yields ``(id, raw sample)`` for the ids it could read, in the order given, and
routes each id to the reader of its shard: ``SeekReader`` for local files, ``StreamCursor`` for streams,
``remote.RangeReader`` (byte ranges of object stores and HTTP) when the stream has one. Every failure is a
ShardError that ``BadData`` raises or, with a handler, counts and skips; the caller only asks
``ShardReader.reject`` to do the same for a sample it could not decode.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np

from geko_data.shards import (CHANGED_HINT, HASH_BYTES, MISSING_HINT, ShardError, ShardIndex, iter_tar_samples,
                              parse_samples, sample_hash)

__all__ = ["COUNTERS", "BadData", "SeekReader", "ShardReader", "StreamCursor"]

#: Per-epoch counters, summed over the main process and DataLoader workers (``GEKOStream.stats``).
#: ``skipped_draws`` counts the draws of the plan lost to bad data (a repeated sample loses all of its draws).
COUNTERS = ("samples_read", "bytes_read", "samples_yielded", "skipped_draws", "requests", "retries")

# Magic bytes of the compressions tarfile's "r|*" undoes: verify=True hashes the bytes as they arrive, which
# are the index's tar bytes only when the stream is not compressed.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")

# A worker's samples of one shard are read into one buffer of up to this many bytes (runs of adjacent ones with
# one system call) and parsed together: memory bounded whatever the shuffle buffer and the sample size.
_RUN_BYTES = 8 << 20


class BadData:
    """What bad data cost one worker this epoch, and the handler's say about it.

    ``lost`` is a (N,) uint8 view of shared memory where every worker flags the samples it lost (only ever
    set to 1, so workers never race; the main process counts the flags); ``lost_here`` keeps this worker's,
    ``stopped`` the shards the handler said to stop on.
    """

    def __init__(self, *, handler: Callable[[Exception], bool] | None, lost: np.ndarray,
                 sample_shard: np.ndarray) -> None:
        self.handler = handler
        self.lost = lost
        self.lost_here: set[int] = set()
        self.stopped: set[int] = set()
        self._shard = sample_shard

    def mark_lost(self, i: int) -> None:
        self.lost[i] = 1
        self.lost_here.add(i)

    def fail(self, exn: Exception, i: int) -> None:
        """Raise ``exn``, or count sample ``i`` lost when the handler says to go on; False from the handler
        stops ``i``'s shard too (webdataset's ``*_and_stop``): its other samples are skipped and counted."""
        if self.handler is None:
            raise exn
        self.mark_lost(i)
        if not self.handler(exn):
            self.stopped.add(int(self._shard[i]))


class _Tee:
    """A read-only file over a stream that keeps what was read until ``take`` (``verify`` on streams)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.kept = bytearray()
        self.base = 0  # stream position of kept[0]
        self.head = b""  # the stream's first bytes (compressed?)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if not self.head:
            self.head = data[:8]
        self.kept += data
        return data

    def take(self, start: int, end: int) -> bytes:
        """Bytes ``start..end`` of the stream; what comes before ``end`` is forgotten."""
        data = bytes(self.kept[start - self.base:end - self.base])
        del self.kept[:end - self.base]
        self.base = end
        return data


def _hash_error(index: ShardIndex, url: str, i: int, got: bytes) -> ShardError:
    return ShardError(f"shard {url!r}: sample {str(index.keys[i])!r} at byte {int(index.offset[i])}: content hash "
                      f"(BLAKE2b-128) {got.hex()} differs from the index's {_expected(index, i).hex()} (changed "
                      f"since indexing: restore the shard, or re-run `geko-data index` and start a new state, "
                      f"since the data changed)")


def _expected(index: ShardIndex, i: int) -> bytes:
    """The digest the index keeps for sample ``i`` (a row of the (N, 16) uint8 ``hashes``)."""
    return index.hashes[i].tobytes()  # type: ignore[index]


def _read_on(fd: int, view: memoryview, offset: int, got: int) -> int:
    """After a ``preadv`` of ``view`` at ``offset`` returned ``got`` bytes, fewer than asked: read on until
    ``view`` is full or the file ends (a regular file reads short only at its end). Returns the total."""
    while 0 < got < len(view):
        more = os.preadv(fd, [view[got:]], offset + got)
        if not more:
            break
        got += more
    return got


def _check_inside(f: Any, path: str, root: str, key: str) -> None:
    """ShardError (``f`` closed) unless the file open as ``f`` is the one ``path`` resolves to now, inside
    ``root``: resolved after the open, and the same file by device and inode, so no swap of a link between
    the check and the open goes unseen."""
    real = os.path.realpath(path)
    opened = os.fstat(f.fileno())
    try:
        now = os.stat(real)
        same = (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)
    except OSError:
        same = False
    if os.path.commonpath([real, root]) != root or not same:
        f.close()
        raise ShardError(f"shard {path!r} now resolves to {real!r}, outside the index's folder {root!r} (a "
                         f"symbolic link changed since the index was read; reading sample {key!r}): refused")


class _IdleShards:
    """Shard files open but not being read, of every ``SeekReader`` of this process, the least recently used
    first: at most ``limit`` (file descriptors are the process's budget, whatever the number of readers), the
    oldest closed first. A file being read is never here, so it is never closed under its reader."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._files: OrderedDict[tuple[int, int], tuple[Any, tuple[int, int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _forked(self) -> None:  # a forked child's copies of the parent's files: its readers are its own
        if self._pid != os.getpid():
            for f, _ in self._files.values():
                f.close()
            self._files.clear()
            self._pid = os.getpid()

    def take(self, key: tuple[int, int]) -> tuple[Any, tuple[int, int, int]] | None:
        with self._lock:
            self._forked()
            return self._files.pop(key, None)

    def put(self, key: tuple[int, int], entry: tuple[Any, tuple[int, int, int]]) -> None:
        with self._lock:
            self._forked()
            self._files[key] = entry
            while len(self._files) > self.limit:
                self._files.popitem(last=False)[1][0].close()

    def drop(self, reader: int) -> None:
        """Close the idle files of ``reader``."""
        with self._lock:
            for key in [k for k in self._files if k[0] == reader]:
                self._files.pop(key)[0].close()


#: Every reader's idle shard files: a map-style batch (ShardDataset) draws from every shard, and opening one
#: (with the checks of ``SeekReader._open``) cost as much as reading a few of its samples.
_IDLE = _IdleShards(64)
_READERS = itertools.count()  # a reader's key in _IDLE (an id() could be reused by a later reader)


class SeekReader:
    """Reads samples of local shards by seeking: skipped samples are seeked over, never read, and a run of
    adjacent samples is one read. Holds each sample to its indexed bytes (and hash, with ``verify``)."""

    def __init__(self, index: ShardIndex, urls: list[str], *, verify: bool) -> None:
        self.index = index
        self.urls = urls
        self.verify = verify
        self.bytes_read = 0
        self._key = next(_READERS)
        weakref.finalize(self, _IDLE.drop, self._key)  # a reader dropped without close(): its idle files too
        self._buffer = bytearray()
        # read_index checked that each shard name resolves inside the index's folder; a link swapped in
        # since would lead a later epoch's open() elsewhere, so every open is checked again (for the
        # index's own paths: a `shard_url` mapping is the user's choice).
        self._root = None if index._file is None else os.path.realpath(os.path.dirname(index._file.path))

    def close(self) -> None:
        _IDLE.drop(self._key)

    def _open(self, shard: int, key: str) -> tuple[Any, tuple[int, int, int]]:
        """The shard's file, open and checked, with its identity (device, inode, size), for one group: an idle
        one of this reader if the path still names that file at the indexed size, else opened again."""
        path = self.urls[shard].removeprefix("file://")
        held = _IDLE.take((self._key, shard))
        if held is not None:
            f, opened = held
            try:  # replaced at its path, or cut or grown in place, since it was opened: open and check again
                now = os.stat(path)
                same = (now.st_dev, now.st_ino, os.fstat(f.fileno()).st_size) == opened
            except OSError:
                same = False
            if same:
                return held
            f.close()
        if not os.path.exists(path):
            raise ShardError(f"shard {path!r} is missing (reading sample {key!r}; {MISSING_HINT})")
        # Unbuffered: every read is one pread into the run buffer (no seek, no copy through a buffer).
        # O_NONBLOCK: opening a FIFO put in a shard's place would otherwise wait for a writer forever;
        # a regular file ignores the flag.
        f = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb", buffering=0)  # noqa: SIM115
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            raise ShardError(f"shard {path!r} is not a regular file (reading sample {key!r})")
        if self._root is not None and self.urls[shard] == self.index.shards[shard]:
            _check_inside(f, path, self._root, key)
        st = os.fstat(f.fileno())
        if st.st_size != self.index.sizes[shard]:
            f.close()
            raise ShardError(f"shard {path!r} changed since indexing: {st.st_size} bytes, index says "
                             f"{self.index.sizes[shard]} (reading sample {key!r}; {CHANGED_HINT})")
        return f, (st.st_dev, st.st_ino, st.st_size)

    def read_group(self, shard: int, ids: list[int], keys: list[str], offsets: np.ndarray,
                   lengths: np.ndarray) -> tuple[list[tuple[int, dict[str, Any] | ShardError]], bool]:
        """(id, sample or its ShardError) for ``ids``, samples of ``shard`` in file order (``offsets`` and
        ``lengths`` int64 arrays of theirs): each run of adjacent ones is one read, all into one reused
        buffer (a fresh one each time costs page faults, more than the copy), back to back, and every
        sample is parsed by one ``parse_samples`` call, whose numpy pass then covers them all even when a
        worker's samples alternate with another worker's. Failures come first, then the samples; and
        whether there is no failure (every id a sample)."""
        url = self.urls[shard]
        n = len(ids)
        ends = offsets + lengths
        place = np.cumsum(lengths) - lengths  # (n,) where each sample lands in the buffer
        total = int(ends[-1] - offsets[-1] + place[-1])
        if len(self._buffer) < total:
            self._buffer = bytearray(total)
        view = memoryview(self._buffer)
        # Runs of adjacent samples: where each starts (in the group, the shard and the buffer) and its bytes,
        # as Python ints for the loop over runs (a run is one or two samples when a worker's batches
        # alternate with other workers').
        first = np.flatnonzero(np.r_[True, offsets[1:] != ends[:-1]])  # (runs,)
        after = np.r_[first[1:], n]
        runs = zip(first.tolist(), after.tolist(), place[first].tolist(), offsets[first].tolist(),
                   (ends[after - 1] - offsets[first]).tolist())
        out: list[tuple[int, dict[str, Any] | ShardError]] = []
        good = np.ones(n, bool)
        held: tuple[Any, tuple[int, int, int]] | None = None  # the shard's file and identity; None: (re)open it
        try:
            for lo, hi, at, start, size in runs:
                try:
                    if held is None:
                        held = self._open(shard, keys[lo])
                    fd = held[0].fileno()
                    # One pread a run (a seek and a read were two system calls) into its place in the buffer.
                    got = os.preadv(fd, [view[at:at + size]], start)
                    if got < size:
                        got = _read_on(fd, view[at:at + size], start, got)
                    why = None
                except ShardError as e:
                    out += [(ids[j], e) for j in range(lo, n)]
                    good[lo:] = False
                    break
                except OSError as e:
                    got, why = 0, str(e)
                self.bytes_read += got
                if got < size:
                    if held is not None:
                        held[0].close()
                        held = None
                    for j in range(lo, hi):
                        begin = int(place[j])  # the sample's place in the buffer
                        if begin + int(lengths[j]) > at + got:
                            detail = (f": {why}" if why else
                                      f" is truncated ({max(0, at + got - begin)} of {lengths[j]} bytes)")
                            out.append((ids[j], ShardError(f"shard {url!r}: sample {keys[j]!r} at byte "
                                                           f"{offsets[j]}{detail}")))
                            good[j] = False
        finally:  # idle again: kept open for this reader's next group of the shard (or closed as the oldest)
            if held is not None:
                _IDLE.put((self._key, shard), held)
        if self.verify:
            check = np.flatnonzero(good)
            digests = b"".join([sample_hash(view[a:a + b])
                                for a, b in zip(place[check].tolist(), lengths[check].tolist())])
            got = np.frombuffer(digests, np.uint8).reshape(-1, HASH_BYTES)
            # Compared with the index's rows in one numpy pass (no Python step per 16-byte row).
            differ = (got != self.index.hashes[np.asarray(ids)[check]]).any(axis=1)  # type: ignore[index]
            for k in np.flatnonzero(differ).tolist():
                j = int(check[k])
                out.append((ids[j], _hash_error(self.index, url, ids[j], got[k].tobytes())))
                good[j] = False
        if good.all():
            kept, kept_keys = ids, keys
            spans = np.stack([place, lengths], axis=1)
            starts = offsets
        else:
            which = np.flatnonzero(good)
            kept = [ids[j] for j in which.tolist()]
            kept_keys = [keys[j] for j in which.tolist()]
            spans = np.stack([place[which], lengths[which]], axis=1)
            starts = offsets[which]
        # Bytes past `total` are an older group's; every span lies before it.
        parsed = parse_samples(self._buffer, spans, shard=url, keys=kept_keys, offsets=starts.tolist())
        clean = not out and set(map(type, parsed)) <= {dict}  # (no Python step per sample)
        out += zip(kept, parsed)
        return out, clean


class StreamCursor:
    """Reads samples of shards that cannot seek (``pipe:`` commands, URLs read through) by reading each
    shard front to back, holding every sample it passes to the index: an extra key, a missing one or a
    corrupt header raises rather than shifting or dropping samples. A shard that went wrong is not read
    again this epoch: its later samples fail at once."""

    def __init__(self, index: ShardIndex, urls: list[str], shard_start: np.ndarray, *, verify: bool) -> None:
        self.index = index
        self.urls = urls
        self.shard_start = shard_start  # (n_shards + 1,) first id of each shard; ids are grouped by shard
        self.verify = verify
        self._pipe: Any = None
        self._samples: Iterator[tuple[dict[str, Any], int, int]] | None = None
        self._shard = -1
        self._last = -1  # id of the last sample taken from the open stream
        self._tee: _Tee | None = None  # with verify: the open stream's bytes, to hash each sample
        self._broken: dict[int, tuple[int, str]] = {}  # shard -> (first id it failed at, why)

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()  # type: ignore[attr-defined]
            self._samples = None
        if self._pipe is not None:
            # A reader that stops early gets its command killed by SIGPIPE (a non-zero exit); what it read
            # was already checked, so the exit status says nothing about it.
            with contextlib.suppress(Exception):
                self._pipe.close()
            self._pipe = None
        self._tee = None
        self._shard = -1

    def _open(self, shard: int, i: int) -> None:
        from webdataset.gopen import gopen

        self.close()
        url = self.urls[shard]
        self._shard, self._last = shard, int(self.shard_start[shard]) - 1
        try:
            self._pipe = gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - gopen raises what its scheme's opener raises
            self._break(shard, self._last + 1, i, f"shard {url!r}: cannot open ({type(e).__name__}: {e})")
        if self.verify:
            self._tee = _Tee(self._pipe)
        self._samples = iter_tar_samples(self._tee or self._pipe, shard=url)

    def read(self, i: int, shard: int) -> dict[str, Any]:
        """Read through ``shard`` to sample ``i`` (reopening it when ``i`` was passed)."""
        broken = self._broken.get(shard)
        if broken is not None and i >= broken[0]:
            raise ShardError(f"{broken[1]}; sample {str(self.index.keys[i])!r} comes after that point")
        if self._shard != shard or i <= self._last:
            self._open(shard, i)
        while True:
            expect = self._last + 1
            sample = self._next(shard, expect, i)
            self._last = expect
            if expect == i:
                return sample

    def _next(self, shard: int, expect: int, i: int) -> dict[str, Any]:
        """The stream's next sample, held to the index's sample ``expect``."""
        assert self._samples is not None
        url, keys = self.urls[shard], self.index.keys
        try:
            got = next(self._samples, None)
        except ShardError as e:
            self._break(shard, expect, i, f"{e} (at sample {str(keys[expect])!r})")
        if got is None:
            n = int(self.shard_start[shard + 1] - self.shard_start[shard])
            self._break(shard, expect, i, f"shard {url!r} ended before sample {str(keys[expect])!r}, "
                                       f"#{expect - int(self.shard_start[shard])} of {n} indexed "
                                       f"(truncated, or changed since indexing)")
        sample, start, end = got
        want, off, length = str(keys[expect]), int(self.index.offset[expect]), int(self.index.length[expect])
        if sample["__key__"] != want:
            where = "is not in the index" if not (keys == sample["__key__"]).any() else "is out of place"
            self._break(shard, expect, i, f"shard {url!r}: key {sample['__key__']!r} {where} (the index has "
                                       f"{want!r} here; shard changed since indexing?)")
        if start != off or end - start != length:
            self._break(shard, expect, i, f"shard {url!r}: sample {want!r} spans bytes {start}..{end}, the "
                                       f"index says {off}..{off + length} (corrupt tar header, or changed "
                                       f"since indexing)")
        if self._tee is not None:
            raw = self._tee.take(start, end)
            if self._tee.head.startswith(_COMPRESSED):
                self._break(shard, expect, i, f"shard {url!r}: verify=True needs an uncompressed tar stream "
                                           f"(the index hashes the tar's own bytes)")
            if expect == i:  # samples read through to reach `i` are not the caller's: not hashed
                got_hash = sample_hash(raw)
                if got_hash != _expected(self.index, i):
                    raise _hash_error(self.index, url, i, got_hash)
        return sample

    def _break(self, shard: int, at: int, i: int, why: str) -> NoReturn:
        # A stream that went wrong at sample `at` cannot be trusted past it: later ids of the shard fail
        # at once instead of re-reading the shard from its start for each of them.
        self._broken[shard] = (at, why)
        self.close()
        if at != i:
            why = f"{why}; so sample {str(self.index.keys[i])!r} was not read"
        raise ShardError(why)


class ShardReader:
    """Reads the planned samples of one worker: routes each id to the reader of its shard, counts what it
    read in ``tally`` (flushed by the owner) and hands every failure to ``bad``."""

    def __init__(self, index: ShardIndex, urls: list[str], local: list[bool], shard_start: np.ndarray,
                 bad: BadData, verify: bool, ranges: Any = None) -> None:
        self.index = index
        self.urls = urls
        self.local = local
        self.bad = bad
        self.verify = verify
        self.ranges = ranges  # remote.RangeReader: byte-range reads of remote shards
        self.tally = dict.fromkeys(COUNTERS, 0)
        self._seek = SeekReader(index, urls, verify=verify)
        self._cursor = StreamCursor(index, urls, shard_start, verify=verify)
        self._all_local = all(local)

    def close(self) -> None:
        if self.ranges is not None:
            self.ranges.close()  # its thread pool; made again on the next read
        self._seek.close()
        self._cursor.close()

    def reject(self, i: int, exn: ShardError, read: dict[int, Any]) -> None:
        """Sample ``i`` of ``read`` (id -> sample, what this reader returned) cannot be used: raise, or count
        it lost as the handler says and set it (and, when the handler stops its shard, the shard's other
        samples in ``read``) to None, so their later draws are lost without decoding them again."""
        read[i] = None
        self.bad.fail(exn, i)
        shard = int(self.index.shard[i])
        if shard in self.bad.stopped:
            for j, other in read.items():
                if other is not None and int(self.index.shard[j]) == shard:
                    read[j] = None
                    self.bad.mark_lost(j)

    def read(self, ids: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(id, raw sample) for ``ids`` (in read order); failures go to the handler."""
        shards = self.index.shard[ids].tolist()  # one lookup per chunk, not per sample
        fetched = self._fetch_remote(ids, shards)
        pending: list[int] = []  # local samples of one shard, read together
        for i, shard in zip(ids.tolist(), shards):
            if pending and (shard != pending[-1] or not self.local[shard] or i < pending[-2]):
                yield from self._read_local(np.asarray(pending[0::2]), pending[1], {}).items()
                pending = []
            if shard in self.bad.stopped:
                self.bad.mark_lost(i)
            elif self.local[shard] and i not in fetched:
                pending += (i, shard)
            else:
                sample = self._accept(i, fetched.pop(i) if i in fetched else self._read_stream(i, shard))
                if sample is not None:
                    yield i, sample
        if pending:
            yield from self._read_local(np.asarray(pending[0::2]), pending[1], {}).items()

    def read_all(self, ids: np.ndarray) -> dict[int, dict[str, Any]]:
        """``dict(read(ids))``: the samples of ``ids`` that could be read, by id, in read order. When every
        shard is a local file, the ids are cut into groups (one shard, ascending) in one numpy pass and
        each group's samples join the dict together: no generator step and no test per sample, which in
        a DataLoader worker is CPU time of every sample."""
        if self.ranges is not None or not self._all_local:
            return dict(self.read(ids))
        out: dict[int, dict[str, Any]] = {}
        shards = self.index.shard[ids]
        # Where `read` would start a new group: another shard, or an id below the last one.
        cuts = (np.flatnonzero((shards[1:] != shards[:-1]) | (ids[1:] < ids[:-1])) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, ids.shape[0]]):
            if lo == hi:
                continue
            shard = int(shards[lo])
            if shard in self.bad.stopped:  # stopped by the handler on an earlier group
                for i in ids[lo:hi].tolist():
                    self.bad.mark_lost(i)
            else:
                self._read_local(ids[lo:hi], shard, out)
        return out

    def _accept(self, i: int, got: dict[str, Any] | ShardError) -> dict[str, Any] | None:
        """``got`` when it is a sample (counted read); a failure goes to the handler (None when it skips)."""
        if isinstance(got, ShardError):
            self._seek.close()
            self._cursor.close()
            self.bad.fail(got, i)
            return None
        self.tally["samples_read"] += 1
        return got

    def _read_stream(self, i: int, shard: int) -> dict[str, Any] | ShardError:
        try:
            return self._cursor.read(i, shard)
        except ShardError as e:
            return e

    def _read_local(self, ids: np.ndarray, shard: int, out: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Read ``ids`` (ascending, all in ``shard``) in groups of up to _RUN_BYTES (at least one sample) into
        ``out`` (id -> sample; returned)."""
        keys = self.index.keys.take(ids)  # Arrow's take: a list of str, no object array between
        offsets, lengths = self.index.offset[ids].astype(np.int64), self.index.length[ids].astype(np.int64)
        id_list = ids.tolist()
        cum = np.cumsum(lengths)  # bytes up to and including each sample
        stopped = self.bad.stopped
        lo, n = 0, len(id_list)
        while lo < n:
            # Greedy: the most samples from `lo` whose bytes fit _RUN_BYTES, at least one.
            before_lo = int(cum[lo] - lengths[lo])
            hi = max(lo + 1, int(np.searchsorted(cum, before_lo + _RUN_BYTES, side="right")))
            before, read = self._seek.bytes_read, 0
            try:
                got, clean = self._seek.read_group(shard, id_list[lo:hi], keys[lo:hi], offsets[lo:hi], lengths[lo:hi])
                if clean and shard not in stopped:
                    out.update(got)  # the usual group: every sample read and parsed
                    read = len(got)
                else:  # in order: a failure the handler stops the shard on loses the samples after it
                    for i, sample in got:
                        if shard in stopped:
                            self.bad.mark_lost(i)
                        elif type(sample) is dict:
                            read += 1
                            out[i] = sample
                        else:
                            self._accept(i, sample)
            finally:  # counted also when a failure raises
                self.tally["samples_read"] += read
                self.tally["bytes_read"] += self._seek.bytes_read - before
            lo = hi
        return out

    def _fetch_remote(self, ids: np.ndarray, shards: list[int]) -> dict[int, Any]:
        """Samples (or their ShardError) of the remote shards among ``ids``, fetched together so their byte
        ranges coalesce and several requests are in flight."""
        if self.ranges is None:
            return {}
        remote = [i for i, s in zip(ids.tolist(), shards) if self.ranges.handles(s) and s not in self.bad.stopped]
        check = self._check_hash if self.verify else None
        # Called once per chunk even when empty: a reader that shares ranges with other workers counts chunks.
        out = dict(self.ranges.read(remote, check=check))
        for k, v in self.ranges.tally.items():
            self.tally[k] += v
            self.ranges.tally[k] = 0
        return out

    def _check_hash(self, i: int, buf: bytes) -> None:
        got = sample_hash(buf)
        if got != _expected(self.index, i):
            raise _hash_error(self.index, self.urls[int(self.index.shard[i])], i, got)

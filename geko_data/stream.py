"""GEKOStream: an IterableDataset over WebDataset shards that filters at read time.

Each epoch's plan (``plan.py``) says how often every sample is drawn. The
stream reads only the samples drawn: in local files it seeks straight to
them with the shard index and over everything else (frozen and pruned
samples are never read, let alone decoded); from object stores and HTTP it
fetches the byte ranges of the drawn samples (``remote.py``); from pipes it
reads through and discards. A sample drawn m times is read once and yielded m
times, spread by a seeded, bounded block shuffle.

Order and resume: a rank's order for an epoch is a pure function of (plan,
seed, epoch, rank). Batch j of it goes to DataLoader worker ``j % num_workers``,
which is exactly how the DataLoader's round-robin collects batches, so with
``batch_size`` set to the DataLoader's the loop sees the rank order itself,
whatever the number of workers, and a resume after ``consumed`` samples
re-splits what is left the same way.

Bad data is never silent: every sample read is held to its indexed bytes
(and, on a stream, to its indexed key and place), failures raise ShardError
naming the shard and key, or, with ``handler=``, are skipped and counted in
counters that live in shared memory so the main process sees what the
workers skipped.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from geko_data.config import GEKOConfig
from geko_data.decode import DEFAULT_MAX_DECODED_BYTES, UNSAFE_EXTENSIONS, decoding_error, make_decoder
from geko_data.epochs import EpochDriver, check_int
from geko_data.feedback import Feedback
from geko_data.plan import PURPOSE_ORDER, PURPOSE_SHARDS, EpochPlan, rank_slice, rng
from geko_data.remote import RangeFetcher, RangeReader, RemoteConfig, SharedRanges, is_url, read_index_url
from geko_data.shards import ShardError, ShardIndex, iter_tar_samples, parse_sample, read_index, sample_hash
from geko_data.shared import SharedPlan
from geko_data.state import SampleState, check_fingerprint
from geko_data.world import World

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "GEKOStream", "UNSAFE_EXTENSIONS", "stream_order"]

#: Per-epoch counters, summed over the main process and DataLoader workers (``stats``). ``skipped_draws``
#: counts the draws of the plan lost to bad data (a repeated sample loses all of its draws); ``stats`` adds
#: ``skipped``, the distinct samples lost, from a per-sample flag array.
COUNTERS = ("samples_read", "bytes_read", "samples_yielded", "skipped_draws", "requests", "retries")
# Row 0 counts the main process, row 1 + w DataLoader worker w: one writer per row, so no locks.
# Workers beyond this share rows modulo (increments may then race; 256 workers per rank is not a use).
_COUNTER_ROWS = 1 + 256


def stream_order(index: ShardIndex, plan: EpochPlan, *, seed: int, rank: int, world_size: int,
                 shuffle: bool = True, shuffle_buffer: int = 512) -> np.ndarray:
    """This rank's sample ids for the epoch, in yield order (pure).

    Shards are visited in a seeded order, samples in file order within a shard with repeats adjacent;
    ranks take equal contiguous slices (padded by repetition); a block shuffle of ``shuffle_buffer``
    then spreads repeats while keeping reads local.
    """
    counts = plan.counts
    ids = np.flatnonzero(counts)  # ascending id = shard order, then file order
    n_shards = len(index.shards)
    shard_rank = np.arange(n_shards)
    if shuffle:
        shard_rank[rng(seed, plan.epoch, PURPOSE_SHARDS).permutation(n_shards)] = np.arange(n_shards)
    ids = ids[np.argsort(shard_rank[index.shard[ids]], kind="stable")]
    seq = np.repeat(ids, counts[ids])  # (total,)
    mine = rank_slice(seq, rank=rank, world_size=world_size, contiguous=True)  # (per_rank,)
    if shuffle and mine.shape[0] > 1:
        noise = rng(seed, plan.epoch, PURPOSE_ORDER, rank).random(mine.shape[0])
        block = np.arange(mine.shape[0]) // shuffle_buffer
        mine = mine[np.lexsort((noise, block))]
    return mine


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")


# Magic bytes of the compressions tarfile's "r|*" undoes: verify=True hashes the bytes as they arrive, which
# are the index's tar bytes only when the stream is not compressed.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


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


class _Reader:
    """Reads planned samples of one worker; seeks in local files, reads through pipes and URLs.

    Raises (or hands the handler) only ShardError. ``tally`` counts what it did since the owner last
    flushed it; a lost sample is flagged in ``lost`` (shared, so the main process sees what every worker
    lost, each sample once) and kept in ``lost_here``; shards the handler said to stop on are in ``stopped``.
    """

    def __init__(self, index: ShardIndex, urls: list[str], local: list[bool], shard_start: np.ndarray,
                 handler: Callable[[Exception], bool] | None, lost: np.ndarray, verify: bool,
                 ranges: RangeReader | None = None) -> None:
        self.index = index
        self.ranges = ranges  # byte-range reads of remote shards (URLs other than pipe: and file://)
        self.verify = verify
        self.urls = urls
        self.local = local
        self.shard_start = shard_start  # (n_shards + 1,) first id of each shard; ids are grouped by shard
        self.handler = handler
        self.tally = dict.fromkeys(COUNTERS, 0)
        self.lost = lost  # (N,) uint8 view of shared memory; only ever set to 1, so workers never race
        self.lost_here: set[int] = set()
        self.stopped: set[int] = set()
        self._file: Any = None
        self._file_shard = -1
        self._pipe: Any = None
        self._stream: Iterator[tuple[dict[str, Any], int, int]] | None = None
        self._stream_shard = -1
        self._stream_last = -1  # id of the last sample taken from the open stream
        self._tee: _Tee | None = None  # with verify: the open stream's bytes, to hash each sample
        self._broken: dict[int, tuple[int, str]] = {}  # stream shard -> (first id it failed at, why)

    def close(self) -> None:
        if self.ranges is not None:
            self.ranges.close()  # its thread pool; made again on the next read
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._stream is not None:
            self._stream.close()  # type: ignore[attr-defined]
            self._stream = None
        if self._pipe is not None:
            # A reader that stops early gets its command killed by SIGPIPE (a non-zero exit); what it read
            # was already checked, so the exit status says nothing about it.
            with contextlib.suppress(Exception):
                self._pipe.close()
            self._pipe = None
        self._tee = None
        self._file_shard = self._stream_shard = -1

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
            self.stopped.add(int(self.index.shard[i]))

    def read(self, ids: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(id, raw sample) for ``ids`` (in read order); failures go to the handler."""
        fetched = self._fetch_remote(ids)
        for i in ids.tolist():
            shard = int(self.index.shard[i])
            if shard in self.stopped:
                self.mark_lost(i)
                continue
            try:
                if i in fetched:
                    got = fetched.pop(i)
                    if isinstance(got, ShardError):
                        raise got
                    sample = got
                else:
                    sample = self._read_local(i, shard) if self.local[shard] else self._read_stream(i, shard)
            except ShardError as exn:
                self.close()
                self.fail(exn, i)
                continue
            self.tally["samples_read"] += 1
            yield i, sample

    def _fetch_remote(self, ids: np.ndarray) -> dict[int, Any]:
        """Samples (or their ShardError) of the remote shards among ``ids``, fetched together so their byte
        ranges coalesce and several requests are in flight."""
        if self.ranges is None:
            return {}
        remote = [i for i in ids.tolist() if self.ranges.handles(int(self.index.shard[i]))
                  and int(self.index.shard[i]) not in self.stopped]
        # Called once per chunk even when empty: a reader that shares ranges with other workers counts chunks.
        out = dict(self.ranges.read(remote, check=self._check_hash if self.verify else None))
        for k, v in self.ranges.tally.items():
            self.tally[k] += v
            self.ranges.tally[k] = 0
        return out

    def _open_local(self, shard: int, key: str) -> Any:
        if self._file_shard != shard:
            self.close()
            path = self.urls[shard].removeprefix("file://")
            if not os.path.exists(path):
                raise ShardError(f"shard {path!r} is missing (reading sample {key!r})")
            f = open(path, "rb")  # noqa: SIM115 - kept open across samples of the shard
            size = os.fstat(f.fileno()).st_size
            if size != self.index.sizes[shard]:
                f.close()
                raise ShardError(f"shard {path!r} changed since indexing: {size} bytes, index says "
                                 f"{self.index.sizes[shard]} (reading sample {key!r})")
            self._file, self._file_shard = f, shard
        return self._file

    def _read_local(self, i: int, shard: int) -> dict[str, Any]:
        key = str(self.index.keys[i])
        offset, length = int(self.index.offset[i]), int(self.index.length[i])
        try:
            f = self._open_local(shard, key)
            f.seek(offset)  # skipped samples are seeked over, never read
            buf = f.read(length)
        except OSError as e:
            raise ShardError(f"shard {self.urls[shard]!r}: sample {key!r} at byte {offset}: {e}") from None
        self.tally["bytes_read"] += len(buf)
        if len(buf) != length:
            raise ShardError(f"shard {self.urls[shard]!r}: sample {key!r} at byte {offset} is truncated "
                             f"({len(buf)} of {length} bytes)")
        if self.verify:
            self._check_hash(i, buf)
        return parse_sample(buf, shard=self.urls[shard], key=key, offset=offset)

    def _check_hash(self, i: int, buf: bytes) -> None:
        assert self.index.hashes is not None
        got, want = sample_hash(buf), int(self.index.hashes[i])
        if got != want:
            raise ShardError(f"shard {self.urls[int(self.index.shard[i])]!r}: sample {str(self.index.keys[i])!r} "
                             f"at byte {int(self.index.offset[i])}: content hash {got:016x} differs from the "
                             f"index's {want:016x} (changed since indexing: restore the shard, or re-run "
                             f"`geko-data index` and start a new state, since the data changed)")

    def _read_stream(self, i: int, shard: int) -> dict[str, Any]:
        """Read through the shard to sample ``i``, holding every sample passed to the index.

        A stream cannot seek, so what comes before ``i`` is read and discarded, and each of those samples
        must be the indexed one in the indexed place: an extra key, a missing one or a corrupt header
        (a short sample) raises here rather than shifting or dropping samples.
        """
        url = self.urls[shard]
        keys = self.index.keys
        broken = self._broken.get(shard)
        if broken is not None and i >= broken[0]:
            raise ShardError(f"{broken[1]}; sample {str(keys[i])!r} comes after that point")
        if self._stream_shard != shard or i <= self._stream_last:
            from webdataset.gopen import gopen

            self.close()
            self._stream_shard, self._stream_last = shard, int(self.shard_start[shard]) - 1
            try:
                self._pipe = gopen(url, "rb")
            except Exception as e:  # noqa: BLE001 - gopen raises what its scheme's opener raises
                why = f"shard {url!r}: cannot open ({type(e).__name__}: {e})"
                self._break(shard, self._stream_last + 1, i, why)
            if self.verify:
                self._tee = _Tee(self._pipe)
            self._stream = iter_tar_samples(self._tee or self._pipe, shard=url)
        assert self._stream is not None
        while True:
            expect = self._stream_last + 1
            try:
                got = next(self._stream, None)
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
            self._stream_last = expect
            if self._tee is not None:
                raw = self._tee.take(start, end)
                if self._tee.head.startswith(_COMPRESSED):
                    self._break(shard, expect, i, f"shard {url!r}: verify=True needs an uncompressed tar stream "
                                               f"(the index hashes the tar's own bytes)")
                if expect == i:
                    self._check_hash(i, raw)
            if expect == i:
                return sample

    def _break(self, shard: int, at: int, i: int, why: str) -> NoReturn:
        # A stream that went wrong at sample `at` cannot be trusted past it: later ids of the shard fail
        # at once instead of re-reading the shard from its start for each of them.
        self._broken[shard] = (at, why)
        self.close()
        if at != i:
            why = f"{why}; so sample {str(self.index.keys[i])!r} was not read"
        raise ShardError(why)


class GEKOStream(EpochDriver, IterableDataset):
    """Streams the current epoch's GEKO plan from WebDataset shards, filtering at read time.

    Args:
        source: a folder holding ``index.arrow`` (``write_shards`` / ``geko-data index``) or the index path.
        total_epochs: planned epochs (sets the curriculum's progress).
        config: the policy. Defaults to ``GEKOConfig()`` (or ``state.config`` when ``state`` is given).
        seed: seed of every random choice (with epoch, rank and worker). Defaults to ``0``.
        decode: ``None`` (raw bytes), a callable ``sample -> sample``, or webdataset decoder specs
            (e.g. ``"pil"`` or a list of specs and handlers). With specs, members whose extension is in
            ``UNSAFE_EXTENSIONS`` (pickle, torch.load) raise ShardError instead of being unpickled; decode
            those yourself with a callable if you trust the data. Defaults to ``None``.
        max_decoded_bytes: with decoder specs, a ``.gz`` member that inflates past this many bytes raises
            ShardError naming it (a decompression bomb; it is inflated in steps, never whole). Defaults to
            ``DEFAULT_MAX_DECODED_BYTES`` (256 MiB).
        verify: check every sample read against the xxh3 content hash the index recorded; a changed byte
            raises ShardError naming the shard, key and offset (costs one hash of the bytes read; see the
            README's benchmark). Defaults to ``False`` (sizes, keys and byte ranges are still checked).
        shuffle: shuffle shard order and, within ``shuffle_buffer`` blocks, samples. Defaults to ``True``.
        state: an existing ``SampleState`` for these shards. Defaults to a fresh one.
        world: ranks (``World(rank=, world_size=)``). Defaults to ``World.detect()``.
        handler: webdataset-style exception handler to skip and count unreadable samples: returning True
            (``warn_and_continue``) skips the sample, False (``warn_and_stop``) also ends its shard for
            this worker and epoch. Skips are counted in ``stats`` / ``efficiency_report()`` (workers
            included). They make ranks yield unequal counts, so under DDP a skip can leave one rank
            waiting in a collective: prefer the default (raise) there. Defaults to ``None`` (raise).
        batch_size: the DataLoader's batch size; with it the order is independent of the number of
            workers and mid-epoch resume is exact with workers (required for a mid-epoch resume with
            more than one worker). Defaults to ``None`` (1).
        shuffle_buffer: block size of the sample shuffle (samples held per worker). Defaults to ``512``.
        shard_url: maps a local shard path to the URL to read: a format string (``"pipe:cat {}"``; for
            ``pipe:`` the path is shell-quoted) or a callable. Defaults to ``None``.
        epoch_length: draws per epoch over all ranks. Defaults to the number of active samples.
        storage_options: options of the filesystem library for remote shards and a remote ``source``
            (``s3://``, ``gs://``, ``az://``, ``http(s)://``, ...): credentials, ``{"anon": True}``,
            ``{"client_kwargs": {"endpoint_url": ...}}`` for S3-compatible stores. Kept in memory only:
            never in ``state_dict()``, the state file or a message. Defaults to ``None`` (the library's
            usual credentials: environment, config files, instance roles).
        remote: how remote shards are fetched (requests in flight, gap read through, retries); see
            ``RemoteConfig``. Defaults to ``RemoteConfig()``.
    """

    def __init__(self, source: str | os.PathLike, *, total_epochs: int, config: GEKOConfig | None = None,
                 seed: int = 0, decode: Any = None, shuffle: bool = True, state: SampleState | None = None,
                 world: World | None = None, handler: Callable[[Exception], bool] | None = None,
                 batch_size: int | None = None, shuffle_buffer: int = 512,
                 shard_url: str | Callable[[str], str] | None = None, epoch_length: int | None = None,
                 verify: bool = False, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 storage_options: dict[str, Any] | None = None, remote: RemoteConfig | None = None) -> None:
        check_int("total_epochs", total_epochs, 1)
        check_int("max_decoded_bytes", max_decoded_bytes, 1)
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be a bool, got {verify!r}")
        check_int("seed", seed, 0)
        check_int("batch_size", batch_size, 1, optional=True)
        check_int("shuffle_buffer", shuffle_buffer, 1)
        check_int("epoch_length", epoch_length, 1, optional=True)
        if config is not None and not isinstance(config, GEKOConfig):
            raise TypeError(f"`config` must be a GEKOConfig, got {type(config).__name__}")
        if world is not None and not isinstance(world, World):
            raise TypeError(f"`world` must be a World, got {type(world).__name__}")
        if handler is not None and not callable(handler):
            raise TypeError(f"`handler` must be callable, got {handler!r}")
        self._decoder = make_decoder(decode, max_decoded_bytes=max_decoded_bytes)
        self.verify = verify
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"`storage_options` must be a dict or None, got {type(storage_options).__name__}")
        if remote is not None and not isinstance(remote, RemoteConfig):
            raise TypeError(f"`remote` must be a RemoteConfig, got {type(remote).__name__}")
        remote = remote or RemoteConfig()
        if is_url(os.fspath(source)):
            self.index = read_index_url(os.fspath(source), storage_options=storage_options, config=remote)
        else:
            self.index = read_index(source)
        n = self.index.num_samples
        if state is not None:
            if not isinstance(state, SampleState):
                raise TypeError(f"`state` must be a SampleState, got {type(state).__name__}")
            if len(state) != n:
                raise ValueError(f"`state` holds {len(state)} samples but the shards hold {n}")
            check_fingerprint(state.fingerprint, self.index.fingerprint, where="`state`")
            state.fingerprint = self.index.fingerprint
            if config is not None:
                state.config = config
        self.state = state if state is not None else SampleState(n, config=config,
                                                                 fingerprint=self.index.fingerprint)
        self.feedback = Feedback(self.state)
        self.total_epochs = total_epochs
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.epoch_length = epoch_length
        self.handler = handler
        detected = world or World.detect()
        self.world = World(rank=detected.rank, world_size=detected.world_size)
        if shard_url is None:
            self.urls = list(self.index.shards)
        elif isinstance(shard_url, str):
            # A path is data, not shell syntax: spaces or `$(...)` in a folder name must not run anything.
            quote = shlex.quote if shard_url.startswith("pipe:") else str
            self.urls = [shard_url.format(quote(p)) for p in self.index.shards]
        elif callable(shard_url):
            self.urls = [shard_url(p) for p in self.index.shards]
        else:
            raise TypeError(f"`shard_url` must be None, a format string or a callable, got {shard_url!r}")
        self._local = [_is_local(u) for u in self.urls]
        # Remote shards are read by byte ranges: only the samples drawn, each by the worker that yields it.
        self._ranged = [is_url(u) for u in self.urls]
        self._fetcher = RangeFetcher(storage_options=storage_options, config=remote) if any(self._ranged) else None
        # DataLoader workers of this stream hand each other fetched ranges through files here (SharedRanges).
        self._range_dir = tempfile.mkdtemp(prefix="geko-ranges-") if self._fetcher is not None else None
        if self._range_dir is not None:
            weakref.finalize(self, shutil.rmtree, self._range_dir, True)
        self._split: tuple[np.ndarray, int, int, int] | None = None
        if (np.diff(self.index.shard) < 0).any():
            raise ShardError("the shard index must list samples grouped by shard, in shard order")
        self._shard_start = np.searchsorted(self.index.shard, np.arange(len(self.index.shards) + 1))
        self._shared = SharedPlan(n)
        self._start = torch.zeros(1, dtype=torch.int64).share_memory_()  # resume position of the next epoch
        # Allocated here, before any worker starts, so fork and spawn workers write where the main reads.
        self._counters = torch.zeros((_COUNTER_ROWS, len(COUNTERS)), dtype=torch.int64).share_memory_()
        self._lost = torch.zeros(n, dtype=torch.uint8).share_memory_()  # samples lost to bad data this epoch
        self.epoch = -1
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._yielded = 0

    @property
    def stats(self) -> dict[str, int]:
        """This epoch's counters (see ``COUNTERS``) over the main process and every DataLoader worker, and
        ``skipped``: the distinct samples lost to bad data (unreadable, undecodable, or in a stopped shard)."""
        stats = dict(zip(COUNTERS, self._counters.numpy().sum(axis=0).tolist()))
        stats["skipped"] = int(self._lost.numpy().sum(dtype=np.int64))
        return stats

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: repartition (every ``repartition_every`` epochs), fix and publish its plan."""
        if get_worker_info() is not None:
            raise RuntimeError("set_epoch() must be called in the main process, not in a DataLoader worker")
        resuming = int(self._start.item()) > 0 and epoch == self.epoch
        self._shared.publish(self._advance(epoch))
        self._order_cache = None
        self._counters.zero_()
        self._lost.zero_()
        if not resuming:
            self._start.zero_()
        self._yielded = int(self._start.item())
        if self._range_dir is not None:  # ranges the last epoch's workers left (an epoch cut short)
            for name in os.listdir(self._range_dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self._range_dir, name))

    def _order(self, plan: EpochPlan) -> np.ndarray:
        # Keyed by the shared plan's version, not just its epoch: a persistent worker keeps this cache across
        # epochs, and the main process may publish another plan for the same epoch (set_epoch again after
        # feedback, a resumed plan).
        version = (plan.epoch, self._shared.version)
        if self._order_cache is None or self._order_cache[0] != version:
            order = stream_order(self.index, plan, seed=self.seed, rank=self.world.rank,
                                 world_size=self.world.world_size, shuffle=self.shuffle,
                                 shuffle_buffer=self.shuffle_buffer)
            self._order_cache = (version, order)
        return self._order_cache[1]

    def __len__(self) -> int:
        """This rank's planned samples in the current epoch (after a resume: what is left of it); samples lost
        to bad data under a ``handler`` are not subtracted (see ``stats``)."""
        if self._shared.epoch < 0:
            self.set_epoch(max(self.epoch, 0))
        return int(self._order(self._shared.read()).shape[0] - self._start.item())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if self._shared.epoch < 0:
            if info is not None:
                raise RuntimeError("call set_epoch() in the main process before iterating with workers")
            self.set_epoch(max(self.epoch, 0))
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self._shared.read()
        start = int(self._start.item())
        if num_workers > 1 and start > 0 and self.batch_size is None:
            # Without the DataLoader's batch size the workers' split is not the order the loop consumed,
            # so `consumed` would point at the wrong samples: some lost, some repeated, silently.
            raise RuntimeError(f"resuming mid-epoch (position {start}) with {num_workers} DataLoader workers "
                               f"needs GEKOStream(..., batch_size=B) with B the DataLoader's batch_size; "
                               f"got batch_size=None")
        remaining = self._order(plan)[start:]
        batch = self.batch_size or 1
        # Batch j of what is left goes to worker j % num_workers: the DataLoader's round-robin order.
        mine = remaining[(np.arange(remaining.shape[0]) // batch) % num_workers == worker]
        if info is None:
            self._yielded = start
        self._split = (remaining, batch, num_workers, start)
        yield from self._read_and_yield(mine, plan, None if info is None else worker)

    def _flush(self, row: int, tally: dict[str, int], total: dict[str, int]) -> None:
        """Add ``tally`` to this process's row of the shared counters (per chunk: cheap, and visible soon)."""
        values = [tally[k] for k in COUNTERS]
        if any(values):
            self._counters.numpy()[row] += np.asarray(values, dtype=np.int64)
            for k in COUNTERS:
                total[k] += tally[k]
                tally[k] = 0

    def _range_share(self, plan: EpochPlan, worker: int | None) -> SharedRanges | None:
        """With several DataLoader workers, the rank's ranges are fetched once and shared (SharedRanges)."""
        if worker is None or self._split is None or self._split[2] < 2 or self._range_dir is None:
            return None
        assert self._fetcher is not None
        remaining, batch, num_workers, start = self._split
        return SharedRanges(index=self.index, remote=self._ranged, order=remaining, batch=batch,
                            num_workers=num_workers, worker=worker, chunk=self.shuffle_buffer,
                            folder=self._range_dir, config=self._fetcher.config,
                            tag=f"e{plan.epoch}v{self._shared.version}s{start}r{self.world.rank}")

    def _read_and_yield(self, mine: np.ndarray, plan: EpochPlan, worker: int | None) -> Iterator[dict[str, Any]]:
        ranges = None if self._fetcher is None else RangeReader(self.index, self.urls, self._fetcher,
                                                                self._range_share(plan, worker))
        reader = _Reader(self.index, self.urls, self._local, self._shard_start, self.handler, self._lost.numpy(),
                         self.verify, ranges)
        tally, total = reader.tally, dict.fromkeys(COUNTERS, 0)
        row = 0 if worker is None else 1 + worker % (_COUNTER_ROWS - 1)
        shard_of = self.index.shard
        n_shards = len(self.index.shards)
        shard_rank = np.arange(n_shards)
        if self.shuffle:
            shard_rank[rng(self.seed, plan.epoch, PURPOSE_SHARDS).permutation(n_shards)] = np.arange(n_shards)
        finished = False
        try:
            for lo in range(0, mine.shape[0], self.shuffle_buffer):
                chunk = mine[lo:lo + self.shuffle_buffer]
                uniq = np.unique(chunk)
                uniq = uniq[np.argsort(shard_rank[shard_of[uniq]], kind="stable")]  # read in file order
                cache: dict[int, dict[str, Any] | None] = dict(reader.read(uniq))
                for i in chunk.tolist():
                    raw = cache.get(i)
                    if raw is None:  # unreadable (counted once as a sample): every draw of it is lost
                        tally["skipped_draws"] += 1
                        continue
                    sample = dict(raw)
                    sample["__url__"] = self.urls[int(shard_of[i])]
                    if self._decoder is not None:
                        try:
                            sample = self._decoder(sample)
                        except Exception as exn:  # decoders raise anything; the handler decides
                            cache[i] = None  # its later draws are lost too, without decoding it again
                            tally["skipped_draws"] += 1
                            shard = int(shard_of[i])
                            reader.fail(decoding_error(exn, url=self.urls[shard], key=str(self.index.keys[i])), i)
                            if shard in reader.stopped:  # the handler said stop: drop the shard's cached rest
                                for j, other in cache.items():
                                    if other is not None and int(shard_of[j]) == shard:
                                        cache[j] = None
                                        reader.mark_lost(j)
                            continue
                    sample["__index__"] = i
                    sample["__weight__"] = np.float32(plan.loss_weight[i])  # collates to float32
                    tally["samples_yielded"] += 1
                    if worker is None:
                        self._yielded += 1
                    yield sample
                self._flush(row, tally, total)
            finished = True
        finally:
            reader.close()
            self._flush(row, tally, total)
        if finished and reader.lost_here:
            where = "" if worker is None else f" in DataLoader worker {worker}"
            warnings.warn(f"GEKOStream skipped {len(reader.lost_here)} unreadable or undecodable sample(s) "
                          f"({total['skipped_draws']} draw(s)) in epoch {plan.epoch}{where} (handler="
                          f"{getattr(self.handler, '__name__', self.handler)}); see stats / efficiency_report()",
                          stacklevel=2)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Small JSON-serializable position; save the per-sample state apart with ``state.save``.

        ``consumed``: samples of this rank's current epoch the loop has used (pass it when loading with
        workers; without it, what the main-process iterator yielded).
        """
        if get_worker_info() is not None:
            raise RuntimeError("state_dict() must be called in the main process, not in a DataLoader worker")
        check_int("consumed", consumed, 0, optional=True)
        sd = self._base_state_dict("GEKOStream", self._yielded if consumed is None else consumed)
        sd.update({"fingerprint": self.index.fingerprint, "batch_size": self.batch_size, "shuffle": self.shuffle,
                   "shuffle_buffer": self.shuffle_buffer})
        return sd

    @property
    def plan(self) -> EpochPlan:
        if self._shared.epoch < 0:
            self.set_epoch(max(self.epoch, 0))
        return self._shared.read()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position from ``state_dict()``; load the matching state file into ``state`` first (it
        keeps the epoch's plan, so a mid-epoch resume continues the very plan that was running)."""
        epoch, position = self._check_state_dict(state_dict, {
            "num_samples": self.index.num_samples, "fingerprint": self.index.fingerprint,
            "batch_size": self.batch_size, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer},
            "stream")
        self.epoch = epoch
        self._start.fill_(position)
        if epoch >= 0:
            self.set_epoch(epoch)
            total = int(self._order(self._shared.read()).shape[0])
            if position > total:
                raise ValueError(f"state_dict position {position} is past this rank's epoch length {total}")

    def efficiency_report(self, *, epochs_done: int | None = None) -> dict[str, Any]:
        """The shared report plus this epoch's bad-data counts, gathered from every DataLoader worker:
        ``skipped_unreadable`` samples and the ``skipped_draws`` of the plan they cost; and what was read:
        ``bytes_read`` (for remote shards: bytes fetched), ``requests`` and ``retries`` (remote shards)."""
        report = super().efficiency_report(epochs_done=epochs_done)
        stats = self.stats
        report["skipped_unreadable"] = stats["skipped"]
        report["skipped_draws"] = stats["skipped_draws"]
        for k in ("bytes_read", "requests", "retries"):
            report[k] = stats[k]
        return report

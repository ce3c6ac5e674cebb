"""GEKOStream: an IterableDataset over WebDataset shards that filters at read time.

Each epoch's plan (``plan.py``) says how often every sample is drawn. The
stream reads only the samples drawn: in local files it seeks straight to
them with the shard index and over everything else (frozen and pruned
samples are never read, let alone decoded); from object stores and HTTP it
fetches the byte ranges of the drawn samples (``remote.py``); from pipes it
reads through and discards. A sample drawn m times is read once and yielded m
times, spread by a seeded, bounded block shuffle.

Order and resume: a rank's order for an epoch is a pure function of (plan,
seed, epoch, rank) (``plan.rank_order``). Batch j of it goes to DataLoader
worker ``j % num_workers`` (``plan.worker_share``), which is exactly how the
DataLoader's round-robin collects batches, so with ``batch_size`` set to the
DataLoader's the loop sees the rank order itself, whatever the number of
workers, and a resume after ``consumed`` samples re-splits what is left the
same way.

Each worker runs three stages per block of its order: read the block's
distinct samples in file order (``readers.ShardReader``), decode, and tag
each draw with ``__url__``, ``__index__`` and ``__weight__``.

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
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torch.utils.data._utils.collate import default_collate_fn_map

from geko_data.batches import BATCHES, epoch_batch_size, full_epoch_steps, smallest_batch
from geko_data.config import GEKOConfig
from geko_data.decode import (DEFAULT_MAX_DECODED_BYTES, UNSAFE_EXTENSIONS, check_decoded, decoding_error,
                              make_decoder)
from geko_data.epochs import EpochDriver
from geko_data.plan import EpochPlan, ShardLayout, rank_order, shard_positions, worker_share
from geko_data.readers import COUNTERS, BadData, ShardReader
from geko_data.remote import (RangeFetcher, RangeReader, RemoteConfig, SharedRanges, is_url, range_dir,
                              read_index_url)
from geko_data.urls import check_options_for
from geko_data.sampler import _collate_tagged
from geko_data.shards import ShardError, ShardIndex, read_index
from geko_data.shared import SharedPlan
from geko_data.state import SampleState, to_numpy
from geko_data.validate import check_instance, check_int
from geko_data.world import World, in_dataloader_worker

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "GEKOStream", "LossWeight", "UNSAFE_EXTENSIONS"]


class LossWeight(float):
    """A sample's ``__weight__``: a Python float that ``default_collate`` stacks into a float32 tensor (as
    the loss it multiplies), where a plain float would give float64. A float because every sample travels
    pickled from its DataLoader worker: a ``numpy.float32`` costs ~2 us more a sample there."""

    __slots__ = ()


def _weight_objects(weights: np.ndarray) -> list[LossWeight]:
    """``weights`` as LossWeights, one object per distinct value: a batch pickled in a DataLoader worker then
    carries each value once and refers back to it (pickle's memo), where a LossWeight per sample costs
    ~0.8 us more to pickle than a float (a float subclass goes through ``__reduce_ex__``)."""
    values, which = np.unique(weights, return_inverse=True)
    objects = [LossWeight(v) for v in values.tolist()]
    return [objects[k] for k in which.tolist()]


def _collate_weights(batch: list[LossWeight], *, collate_fn_map: Any = None) -> torch.Tensor:
    return torch.tensor(batch, dtype=torch.float32)


class _IsStreamSample(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return type(obj) is dict and type(obj.get("__weight__")) is LossWeight


class _StreamSample(metaclass=_IsStreamSample):
    """The type ``default_collate`` matches a stream's samples by: a plain dict whose ``__weight__`` is a
    ``LossWeight``. Such a batch is collated as ``wrap``'s items are (``sampler._collate_tagged``): in a
    DataLoader worker ``__index__`` and ``__weight__`` travel inside the batch's pickle instead of as two
    shared-memory tensors (each costs a segment, a file descriptor and a socket round trip a batch), and
    the loop reads the same int64 and float32 tensors. The samples stay plain dicts: a dict subclass costs
    ~8 us more a sample to pickle from a worker and unpickle (measured through a DataLoader)."""


# default_collate looks element types up here first, exact types then isinstance (torch documents
# extending it in place).
default_collate_fn_map[LossWeight] = _collate_weights
default_collate_fn_map[_StreamSample] = _collate_tagged

# Row 0 counts the main process, row 1 + w DataLoader worker w: one writer per row, so no locks.
# Workers beyond this share rows modulo (increments may then race; 256 workers per rank is not a use).
_COUNTER_ROWS = 1 + 256


class _Reported:
    """What the loop reported in this rank's epoch, as a count and an order-free sum of mixed ids: enough to
    tell at a checkpoint whether the first ``consumed`` samples of the order are the ones it reported.

    With DataLoader workers each worker yields its share in chunks of the stream's ``batch_size``, and a
    DataLoader of that batch size hands the loop the rank's order back; one of another batch size hands it
    batches mixed from several chunks. Training still covers the epoch, but ``state_dict(consumed=N)``
    names the first N samples of the order, which are not the ones the loop used, and a resume from it
    trains some samples twice and some never."""

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.count = 0
        self.mixed = 0

    def add(self, key: tuple[int, int, int], ids: np.ndarray) -> None:
        """Count a report of ``ids`` in the epoch ``key`` = (epoch, plan version, start position)."""
        if key != self.key:
            self.key, self.count, self.mixed = key, 0, 0
        self.count += ids.shape[0]
        self.mixed = (self.mixed + _mix(ids)) % (1 << 64)  # a Python int: numpy warns when a scalar wraps

    def differs(self, key: tuple[int, int, int], used: np.ndarray) -> bool:
        """Whether the reports of epoch ``key``, as many as ``used``, are other samples than ``used``; False
        when they cannot be compared (another count: reports that lag the batches, a subset, extra ones)."""
        return key == self.key and self.count == used.shape[0] and self.mixed != _mix(used)


def _mix(ids: np.ndarray) -> int:
    """The wrapping sum of splitmix64's finaliser over ``ids``: equal multisets give equal sums."""
    x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    return int(x.sum(dtype=np.uint64))


class _Counters:
    """The epoch's ``COUNTERS`` and lost-sample flags in shared memory, written by every process that reads
    (the main one and each DataLoader worker) and summed by the main process. Allocated before any worker
    starts, so fork and spawn workers write where the main process reads."""

    def __init__(self, num_samples: int) -> None:
        self.counts = torch.zeros((_COUNTER_ROWS, len(COUNTERS)), dtype=torch.int64).share_memory_()
        self.lost = torch.zeros(num_samples, dtype=torch.uint8).share_memory_()  # (N,) lost this epoch
        # Set to 1 by a DataLoader worker when it starts reading the epoch (before its first sample: the
        # counts above are flushed a block at a time): the main process then cannot know the position itself.
        self.in_workers = torch.zeros(1, dtype=torch.uint8).share_memory_()

    def zero(self) -> None:
        self.counts.zero_()
        self.lost.zero_()
        self.in_workers.zero_()

    def stats(self) -> dict[str, int]:
        stats = dict(zip(COUNTERS, self.counts.numpy().sum(axis=0).tolist()))
        stats["skipped"] = int(self.lost.numpy().sum(dtype=np.int64))
        return stats

    @staticmethod
    def row(worker: int | None) -> int:
        return 0 if worker is None else 1 + worker % (_COUNTER_ROWS - 1)

    def flush(self, row: int, tally: dict[str, int], total: dict[str, int]) -> None:
        """Add ``tally`` to ``row`` and to ``total``, and zero it (per block: cheap, and visible soon)."""
        values = [tally[k] for k in COUNTERS]
        if any(values):
            self.counts.numpy()[row] += np.asarray(values, dtype=np.int64)
            for k in COUNTERS:
                total[k] += tally[k]
                tally[k] = 0


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")


def _shard_urls(index: ShardIndex, shard_url: str | Callable[[str], str] | None,
                storage_options: dict[str, Any] | None) -> list[str]:
    """The URL each shard is read from: its path, or ``shard_url`` applied to it (``storage_options`` checked
    against the filesystem those URLs need)."""
    if shard_url is None:
        return list(index.shards)
    if isinstance(shard_url, str):
        # A path is data, not shell syntax: spaces or `$(...)` in a folder name must not run anything.
        quote = shlex.quote if shard_url.startswith("pipe:") else str
        urls = [shard_url.format(quote(p)) for p in index.shards]
    elif callable(shard_url):
        urls = [shard_url(p) for p in index.shards]
    else:
        raise TypeError(f"`shard_url` must be None, a format string or a callable, got {shard_url!r}")
    check_options_for(urls, storage_options)
    return urls


def check_source_args(source: str | os.PathLike, *, storage_options: dict[str, Any] | None,
                      shard_url: str | Callable[[str], str] | None, remote: RemoteConfig | None) -> None:
    """The arguments that say where shards are read from, checked before anything is read."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`source` must be a folder holding index.arrow, the index's path or their URL (a str or "
                        f"path), got {type(source).__name__}: index a list of tars first (geko-data index TARS "
                        f"-o FOLDER/index.arrow, or write_shards)")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"`storage_options` must be a dict or None, got {type(storage_options).__name__}")
    if storage_options and shard_url is None and not is_url(os.fspath(source)):
        # 's3:/bucket/x' (one slash) or a forgotten scheme would be read from local disk, options unused
        raise ValueError(f"`storage_options` were given, but `source` {os.fspath(source)!r} is a local path (a "
                         f"URL has '://', e.g. 's3://bucket/shards/') and no `shard_url` reads remote shards: "
                         f"nothing would use them")
    check_instance("remote", remote, RemoteConfig)


def _open_index(source: str | os.PathLike, storage_options: dict[str, Any] | None,
                remote: RemoteConfig) -> ShardIndex:
    if is_url(os.fspath(source)):
        index = read_index_url(os.fspath(source), storage_options=storage_options, config=remote)
    else:
        index = read_index(source)
    if (np.diff(index.shard) < 0).any():
        raise ShardError("the shard index must list samples grouped by shard, in shard order")
    return index


class _Sources:
    """Where the shards are read from (local paths, ``pipe:`` commands, remote URLs) and the readers of one
    worker's samples; remote shards go through ``remote.py``'s fetcher and, with DataLoader workers, its
    hand-over of ranges between workers (through files under ``range_dir``)."""

    def __init__(self, owner: object, index: ShardIndex, urls: list[str], *, verify: bool,
                 storage_options: dict[str, Any] | None, remote: RemoteConfig) -> None:
        self.index = index
        self.urls = urls
        self.verify = verify
        self.local = [_is_local(u) for u in urls]
        # Remote shards are read by byte ranges: only the samples drawn, each by the worker that yields it.
        self.ranged = [is_url(u) for u in urls]
        self.fetcher = RangeFetcher(storage_options=storage_options, config=remote) if any(self.ranged) else None
        # DataLoader workers of this stream hand each other fetched ranges through shared memory here.
        self.range_dir = range_dir(owner) if self.fetcher is not None else None
        self.shard_start = np.searchsorted(index.shard, np.arange(len(index.shards) + 1))  # (n_shards + 1,)

    def clear_ranges(self) -> None:
        """Forget the ranges the last epoch's workers left (an epoch cut short)."""
        if self.range_dir is not None:
            for name in os.listdir(self.range_dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.range_dir, name))

    def reader(self, *, handler: Callable[[Exception], bool] | None, lost: np.ndarray, worker: int | None,
               split: tuple[np.ndarray, int, int, int] | None, chunk: int, tag: str) -> ShardReader:
        """The reader of one worker (None: the main process); ``split`` is (what is left of the rank's order,
        batch, num_workers, start), ``tag`` names the epoch plan for the hand-over of remote ranges."""
        ranges = None
        if self.fetcher is not None:
            share = None
            if split is not None and self.range_dir is not None:
                remaining, batch, num_workers, _ = split
                share = SharedRanges(index=self.index, remote=self.ranged, order=remaining, batch=batch,
                                     num_workers=num_workers, worker=worker or 0, chunk=chunk,
                                     folder=self.range_dir, config=self.fetcher.config, tag=tag)
            ranges = RangeReader(self.index, self.urls, self.fetcher, share)
        bad = BadData(handler=handler, lost=lost, sample_shard=self.index.shard)
        return ShardReader(self.index, self.urls, self.local, self.shard_start, bad, self.verify, ranges)


class _WorkerCopy:
    """Stands in for the ``SampleState`` (and its feedback) in a pickled stream, which is what a spawned
    DataLoader worker holds: the policy, the length and the fingerprint stay readable; anything else that
    needs the per-sample state raises, naming where to call it."""

    def __init__(self, state: SampleState) -> None:
        self.config = state.config
        self.num_samples = state.num_samples
        self.fingerprint = state.fingerprint

    def __len__(self) -> int:
        return self.num_samples

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols probed by pickle, copy and hasattr: absent, as usual
            raise AttributeError(name)
        raise RuntimeError(f"this GEKOStream is a pickled copy (what a spawned DataLoader worker receives): it "
                           f"holds no SampleState, so `{name}` is not available here; set epochs, report and "
                           f"read the state on the stream in the main process")


class _Order:
    """This rank's order of one published plan, computed once per plan and process (with the epoch's shard
    positions, which the readers use to read each block in file order)."""

    def __init__(self, key: tuple[int, int], order: np.ndarray, shard_position: np.ndarray) -> None:
        self.key = key
        self.order = order  # (per_rank,) sample ids in yield order
        self.shard_position = shard_position  # (n_shards,) when each shard is visited this epoch


class GEKOStream(EpochDriver, IterableDataset):
    """Streams the current epoch's GEKO plan from WebDataset shards, filtering at read time.

    Args:
        source: a folder holding ``index.arrow`` (``write_shards`` / ``geko-data index``) or the index path.
        total_epochs: planned epochs (sets the curriculum's progress).
        config: the policy. Defaults to ``GEKOConfig()`` (or ``state.config`` when ``state`` is given; then
            ``config`` must equal it).
        seed: seed of every random choice (with epoch, rank and worker). Defaults to ``0``.
        decode: ``None`` (raw bytes), a callable ``sample -> sample``, or webdataset decoder specs
            (e.g. ``"pil"`` or a list of specs and handlers). With specs, members whose extension is in
            ``UNSAFE_EXTENSIONS`` (pickle, torch.load) raise ShardError instead of being unpickled; decode
            those yourself with a callable if you trust the data. Defaults to ``None``.
        max_decoded_bytes: with decoder specs, a member that decodes past this many bytes raises ShardError
            naming it (a decompression bomb): a ``.gz`` member is inflated in steps, never whole; an image's and
            an ``.npy``/``.npz`` array's size is read from its header first. Defaults to
            ``DEFAULT_MAX_DECODED_BYTES`` (256 MiB).
        verify: check every sample read against the BLAKE2b-128 content hash the index recorded (a
            cryptographic hash: whoever writes the shards cannot change a sample and keep its hash); a changed
            byte raises ShardError naming the shard, key and offset (costs one hash of the bytes read; see the
            README's benchmark). Defaults to ``False`` (sizes, keys and byte ranges are still checked).
        shuffle: shuffle shard order and, within ``shuffle_buffer`` blocks, samples. Defaults to ``True``.
        state: an existing ``SampleState`` for these shards. Defaults to a fresh one.
        world: ranks (``World(rank=, world_size=)``); each DataLoader worker reads its share of the rank's
            order. Defaults to ``World.detect()``.
        handler: webdataset-style exception handler to skip and count unreadable samples: returning True
            (``warn_and_continue``) skips the sample, False (``warn_and_stop``) also ends its shard for
            this worker and epoch. Skips are counted in ``stats`` / ``efficiency_report()`` (workers
            included). They make ranks yield unequal counts, so under DDP a skip can leave one rank
            waiting in a collective: prefer the default (raise) there. Defaults to ``None`` (raise).
        batch_size: the DataLoader's batch size; with it the order is independent of the number of
            workers and mid-epoch resume is exact with workers (required for a mid-epoch resume with
            more than one worker). Defaults to ``None`` (1).
        batches: ``fixed``: every epoch in batches of ``batch_size`` (an epoch that skips samples takes
            fewer steps); ``steps``: the epoch's batch size (``epoch_batch_size``, read after ``set_epoch``)
            cuts it into as many batches as a full epoch at ``batch_size``, down to half of it, as
            ``GEKOBatchSampler`` does: make each epoch's DataLoader with ``batch_size=stream.epoch_batch_size``.
            Needs ``batch_size``. Defaults to ``"fixed"``.
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
                 batch_size: int | None = None, batches: str = "fixed", shuffle_buffer: int = 512,
                 shard_url: str | Callable[[str], str] | None = None, epoch_length: int | None = None,
                 verify: bool = False, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 storage_options: dict[str, Any] | None = None, remote: RemoteConfig | None = None) -> None:
        # Everything is checked before the index is read: a bad argument fails fast, whatever the data.
        check_int("total_epochs", total_epochs, 1)
        check_int("max_decoded_bytes", max_decoded_bytes, 1)
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be a bool, got {verify!r}")
        check_int("batch_size", batch_size, 1, optional=True)
        if batches not in BATCHES:
            raise ValueError(f"`batches` must be one of {', '.join(BATCHES)}, got {batches!r}")
        if batches == "steps" and batch_size is None:
            raise ValueError("`batches='steps'` sizes each epoch's batches from `batch_size`: pass batch_size=B "
                             "(the DataLoader's batch size of a full epoch)")
        check_int("shuffle_buffer", shuffle_buffer, 1)
        check_instance("world", world, World)
        if handler is not None and not callable(handler):
            raise TypeError(f"`handler` must be callable, got {handler!r}")
        check_source_args(source, storage_options=storage_options, shard_url=shard_url, remote=remote)
        self._decoder = make_decoder(decode, max_decoded_bytes=max_decoded_bytes)
        remote = remote or RemoteConfig()
        self.index = _open_index(source, storage_options, remote)
        detected = world or World.detect()
        super().__init__(num_samples=self.index.num_samples, total_epochs=total_epochs, config=config, seed=seed,
                         state=state, world=World(rank=detected.rank, world_size=detected.world_size),
                         epoch_length=epoch_length, fingerprint=self.index.fingerprint, data_name="the shards hold")
        self.verify = verify
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.batches = batches
        self.handler = handler
        self.urls = _shard_urls(self.index, shard_url, storage_options)
        self._sources = _Sources(self, self.index, self.urls, verify=verify, storage_options=storage_options,
                                 remote=remote)
        self._split: tuple[np.ndarray, int, int, int] | None = None
        n_shards = len(self.index.shards)
        self._layout = ShardLayout(sample_shard=self.index.shard, num_shards=n_shards, shuffle_buffer=shuffle_buffer)
        self._shared = SharedPlan(self.index.num_samples)
        self._start = torch.zeros(1, dtype=torch.int64).share_memory_()  # resume position of the next epoch
        self._counters = _Counters(self.index.num_samples)
        # What earlier epochs read: efficiency_report gives run totals, like its other fields; stats the epoch's.
        self._read_before = dict.fromkeys(("bytes_read", "requests", "retries"), 0)
        self._order_cache: _Order | None = None
        self._yielded = 0
        self._reported = _Reported()
        self._warned_steps = -1  # the epoch whose batches were said to be too large for batches="steps"

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle of the stream carries: what a spawned DataLoader worker reads with, not the
        ``SampleState`` (32 bytes a sample, read and written only by the main process: the worker reads the
        epoch's plan from shared memory) nor the shard layout's column or a cached order (rebuilt from the
        index, which pickles as its file's name and is memory-mapped again)."""
        kept = self.__dict__.copy()
        kept["state"] = kept["feedback"] = _WorkerCopy(self.state)
        kept["_layout"] = kept["_order_cache"] = None
        return kept

    def __setstate__(self, kept: dict[str, Any]) -> None:
        self.__dict__.update(kept)
        # The index's shard column is a view of its mapped file: the layout costs no memory of its own.
        self._layout = ShardLayout(sample_shard=self.index.shard, num_shards=len(self.index.shards),
                                   shuffle_buffer=self.shuffle_buffer)

    @property
    def stats(self) -> dict[str, int]:
        """This epoch's counters (see ``readers.COUNTERS``) over the main process and every DataLoader worker,
        and ``skipped``: the distinct samples lost to bad data (unreadable, undecodable, or in a stopped
        shard)."""
        return self._counters.stats()

    @property
    def _range_dir(self) -> str | None:
        """The folder of the remote-range hand-over between this stream's workers (None: no remote shards)."""
        return self._sources.range_dir

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: repartition (every ``repartition_every`` epochs), fix and publish its plan."""
        if in_dataloader_worker():
            raise RuntimeError("set_epoch() must be called in the main process, not in a DataLoader worker")
        resuming = int(self._start.item()) > 0 and epoch == self.epoch
        # The state keeps the published plan: views of the shared memory workers read, the plan held once.
        self.state.plan = self._shared.publish(self._advance(epoch))
        self._order_cache = None
        read = self._counters.stats()
        for k in self._read_before:
            self._read_before[k] += read[k]
        self._counters.zero()
        if not resuming:
            self._start.zero_()
        self._yielded = int(self._start.item())
        self._sources.clear_ranges()

    def _order(self, plan: EpochPlan) -> _Order:
        # Keyed by the shared plan's version, not just its epoch: a persistent worker keeps this cache across
        # epochs, and the main process may publish another plan for the same epoch (set_epoch again after
        # feedback, a resumed plan).
        key = (plan.epoch, self._shared.version)
        if self._order_cache is None or self._order_cache.key != key:
            position = shard_positions(self._layout.num_shards, seed=self.seed, epoch=plan.epoch, shuffle=self.shuffle)
            order = rank_order(plan.counts, world=self.world, seed=self.seed, epoch=plan.epoch, shuffle=self.shuffle,
                               shards=self._layout, shard_position=position)
            self._order_cache = _Order(key, order, position)
        return self._order_cache

    @property
    def keeps_steps(self) -> bool:  # type: ignore[override]
        """With ``batches="steps"`` the epochs keep a full epoch's steps (the plan then takes
        ``config.short_run_keep_steps``)."""
        return self.batches == "steps"

    @property
    def epoch_batch_size(self) -> int | None:
        """The current epoch's batch size: ``batch_size``, or with ``batches="steps"`` the one that cuts this
        rank's epoch into as many batches as a full epoch at ``batch_size`` (``batches.epoch_batch_size``)."""
        if self.batches != "steps" or self.batch_size is None:
            return self.batch_size
        if self._shared.epoch < 0:
            self.set_epoch(max(self.epoch, 0))
        draws = int(self._order(self._shared.view()).order.shape[0])
        steps = full_epoch_steps(self.epoch_length or self.index.num_samples, world_size=self.world.world_size,
                                 batch_size=self.batch_size)
        return epoch_batch_size(draws, steps=steps, batch_size=self.batch_size,
                                min_batch=smallest_batch(self.batch_size))

    def __len__(self) -> int:
        """This rank's planned samples in the current epoch (after a resume: what is left of it); samples lost
        to bad data under a ``handler`` are not subtracted (see ``stats``)."""
        if self._shared.epoch < 0:
            self.set_epoch(max(self.epoch, 0))
        return int(self._order(self._shared.view()).order.shape[0] - self._start.item())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        world = self.world.in_this_worker()
        in_worker = in_dataloader_worker()
        if self._shared.epoch < 0:
            if in_worker:
                raise RuntimeError("call set_epoch() in the main process before iterating with workers")
            self.set_epoch(max(self.epoch, 0))
        plan = self._shared.view()  # no copy: the order is computed once per plan, weights taken below
        start = int(self._start.item())
        if world.num_workers > 1 and start > 0 and self.batch_size is None:
            # Without the DataLoader's batch size the workers' split is not the order the loop consumed,
            # so `consumed` would point at the wrong samples: some lost, some repeated, silently.
            raise RuntimeError(f"resuming mid-epoch (position {start}) with {world.num_workers} DataLoader "
                               f"workers needs GEKOStream(..., batch_size=B) with B the DataLoader's batch_size; "
                               f"got batch_size=None")
        order = self._order(plan)
        batch = self.epoch_batch_size or 1
        mine = worker_share(order.order, world=world, batch_size=batch, start=start)
        if not in_worker:
            self._yielded = start
        self._split = (order.order[start:], batch, world.num_workers, start)
        # This worker's weights, taken now: a plan published later (another epoch) does not change them.
        weights = plan.loss_weight[mine]
        yield from self._read_and_yield(mine, weights, plan.epoch, order.shard_position,
                                        world.worker if in_worker else None)

    # ------------------------------------------------------------------ the read-decode-tag loop
    def _read_and_yield(self, mine: np.ndarray, weights: np.ndarray, epoch: int, shard_position: np.ndarray,
                        worker: int | None) -> Iterator[dict[str, Any]]:
        """Read, decode and tag ``mine`` (this worker's draws, in order; ``weights`` theirs) block by block."""
        start = self._split[3] if self._split is not None else 0
        reader = self._sources.reader(handler=self.handler, lost=self._counters.lost.numpy(), worker=worker,
                                      split=self._split, chunk=self.shuffle_buffer,
                                      tag=f"e{epoch}v{self._shared.version}s{start}r{self.world.rank}")
        tally, total = reader.tally, dict.fromkeys(COUNTERS, 0)
        row = _Counters.row(worker)
        if worker is not None:
            self._counters.in_workers[0] = 1
        finished = False
        try:
            for lo in range(0, mine.shape[0], self.shuffle_buffer):
                block = mine[lo:lo + self.shuffle_buffer]
                samples, repeats = self._read_block(reader, block, shard_position)
                yield from self._tagged(block, weights[lo:lo + self.shuffle_buffer], samples, repeats, reader,
                                        worker is None)
                self._counters.flush(row, tally, total)
            finished = True
        finally:
            reader.close()
            self._counters.flush(row, tally, total)
        if finished and reader.bad.lost_here:
            where = "" if worker is None else f" in DataLoader worker {worker}"
            warnings.warn(f"GEKOStream skipped {len(reader.bad.lost_here)} unreadable or undecodable sample(s) "
                          f"({total['skipped_draws']} draw(s)) in epoch {epoch}{where} (handler="
                          f"{getattr(self.handler, '__name__', self.handler)}); see stats / efficiency_report()",
                          stacklevel=2)

    def _read_block(self, reader: ShardReader, block: np.ndarray,
                    shard_position: np.ndarray) -> tuple[dict[int, dict[str, Any] | None], bool]:
        """Stage 1: the block's distinct samples, read once each in file order, by id (failures left out),
        and whether the block draws a sample more than once."""
        uniq = np.unique(block)
        repeats = uniq.size < block.size
        uniq = uniq[np.argsort(shard_position[self.index.shard[uniq]], kind="stable")]  # read in file order
        return reader.read_all(uniq), repeats

    def _tagged(self, block: np.ndarray, weights: np.ndarray, samples: dict[int, dict[str, Any] | None],
                repeats: bool, reader: ShardReader, main: bool) -> Iterator[dict[str, Any]]:
        """Stages 2-3: every draw of the block in order, decoded (each draw anew: a random transform differs
        between repeats) and tagged with ``__url__``, ``__index__`` and ``__weight__`` (a ``LossWeight``).

        Samples are plain dicts (``_StreamSample`` says how ``default_collate`` still tells them apart). A
        raw sample drawn once in its block is tagged in place (the dict the reader made is not used again);
        a repeated one is copied for each draw, so what a loop does to one draw never reaches another."""
        urls, decoder = self.urls, self._decoder
        shards = self.index.shard[block].tolist()  # one lookup per block, not per draw
        yielded = skipped = 0
        try:
            for i, shard, weight in zip(block.tolist(), shards, _weight_objects(weights)):
                raw = samples.get(i)
                if raw is None:  # unreadable or undecodable (counted once as a sample): every draw is lost
                    skipped += 1
                    continue
                if decoder is None:
                    if repeats:  # a new dict per draw (a repeat is yielded again), built in one go
                        sample = {**raw, "__url__": urls[shard], "__index__": i, "__weight__": weight}
                    else:
                        sample = raw
                        sample["__url__"], sample["__index__"], sample["__weight__"] = urls[shard], i, weight
                else:
                    try:
                        sample = decoder({**raw, "__url__": urls[shard]})
                    except Exception as exn:  # noqa: BLE001 - decoders raise anything; the handler decides
                        skipped += 1
                        reader.reject(i, decoding_error(exn, url=urls[shard], key=str(self.index.keys[i])), samples)
                        continue
                    if not isinstance(sample, dict):  # it would fail below on item assignment, naming no argument
                        check_decoded(sample, url=urls[shard], key=str(self.index.keys[i]))
                    sample["__index__"] = i
                    sample["__weight__"] = weight
                yielded += 1
                if main:
                    self._yielded += 1
                yield sample
        finally:  # also when the loop stops early: what was yielded is counted
            reader.tally["samples_yielded"] += yielded
            reader.tally["skipped_draws"] += skipped

    def report(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
               answer: Any = None, step: int | None = None) -> int:
        """Feed per-sample results back (see ``Feedback.report``); the ids reported in the epoch are also
        counted, so that ``state_dict(consumed=)`` can tell they are the samples its position skips."""
        ids = to_numpy(ids, "ids")  # once: a tensor's copy to numpy is not made twice per batch
        rows = super().report(ids, losses, correct=correct, confidence=confidence, answer=answer,
                              step=step)
        if self._shared.epoch >= 0:
            got = ids.astype(np.int64, copy=False)
            self._reported.add(self._epoch_key(), got)
            self._check_steps_batch(got.shape[0])
        return rows

    def _check_steps_batch(self, reported: int) -> None:
        """Warn once an epoch when a ``batches="steps"`` epoch's batches are smaller than ``batch_size`` and a
        report holds ``batch_size`` samples: the DataLoader still cuts at the full batch size, so the epoch takes
        fewer optimizer steps than planned. (Reports of other sizes are other loops' business: a whole epoch
        reported at once, micro-batches.)"""
        if self.batches != "steps" or self.batch_size is None or self._warned_steps == self._shared.epoch:
            return
        size = self.epoch_batch_size
        if size is not None and size < reported == self.batch_size:
            self._warned_steps = self._shared.epoch
            warnings.warn(f"GEKOStream(batches='steps'): a report of {reported} samples in epoch {self._shared.epoch}, "
                          f"whose batches hold {size} (stream.epoch_batch_size): make the DataLoader with "
                          f"batch_size=stream.epoch_batch_size after each set_epoch, or the epoch takes fewer "
                          f"optimizer steps than a full one", RuntimeWarning, stacklevel=3)

    def _epoch_key(self) -> tuple[int, int, int]:
        return self._shared.epoch, self._shared.version, int(self._start.item())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Small JSON-serializable position; save the per-sample state apart with ``state.save``.

        ``consumed``: samples of this rank's current epoch the loop has used; without it, what the
        main-process iterator yielded. Required once DataLoader workers read the epoch (a ValueError says so:
        the position would otherwise be 0, and a resume would train the epoch again).
        """
        if in_dataloader_worker():
            raise RuntimeError("state_dict() must be called in the main process, not in a DataLoader worker")
        self._check_consumed(consumed, "stream")
        if consumed is None and int(self._counters.in_workers[0]):
            # The main process yielded nothing of it: position 0 would retrain the whole epoch on resume.
            raise ValueError("state_dict() needs `consumed=` when DataLoader workers read the epoch: the main "
                             "process cannot tell how many of their samples the loop used; pass consumed= the "
                             "samples of the batches your loop finished (from `stream.position`, 0 unless the "
                             "epoch was resumed, add each batch's length)")
        if consumed is not None and self._shared.epoch >= 0:
            self._check_reported(consumed)
        sd = self._base_state_dict("GEKOStream", self._yielded if consumed is None else consumed)
        stats = self._counters.stats()
        sd.update({"fingerprint": self.index.fingerprint, "batch_size": self.batch_size, "batches": self.batches,
                   "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                   # what the run read so far: a resumed stream's report goes on from it, as its passes do
                   "read": {k: int(v + stats[k]) for k, v in self._read_before.items()}})
        return sd

    def _draws_not_reportable(self) -> int:
        return int(self._counters.stats()["skipped_draws"])

    def _check_reported(self, consumed: int) -> None:
        """ValueError when the loop reported as many samples as ``consumed`` counts, but other ones than the
        first ``consumed`` of this rank's order (from the epoch's start): the position would resume at
        samples it did not use. Not checked when samples were lost to bad data (the loop never saw them)."""
        plan = self._shared.view()
        start = int(self._start.item())
        used = self._order(plan).order[start:consumed]
        if self._counters.lost.numpy()[used].any() or not self._reported.differs(self._epoch_key(), used):
            return
        raise ValueError(f"state_dict(consumed={consumed}): the loop reported {used.shape[0]} samples in this epoch, "
                         f"but not the {used.shape[0]} this rank yields first, which the position would skip on "
                         f"resume (some trained twice, some never). With DataLoader workers, give GEKOStream the "
                         f"DataLoader's batch_size (GEKOStream(..., batch_size=B) and DataLoader(stream, "
                         f"batch_size=B); with batches='steps', a new DataLoader at stream.epoch_batch_size each "
                         f"epoch)")

    @property
    def position(self) -> int:
        """Where in this rank's epoch the next iteration starts (0, or a resume's position): where a loop's
        count of the epoch's samples (``state_dict(consumed=)``) starts."""
        return int(self._start.item())

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
            "batch_size": self.batch_size, "batches": self.batches, "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer}, "stream")
        self.epoch = epoch
        self._start.fill_(position)
        read = state_dict.get("read") or {}
        self._read_before = {k: int(read.get(k, 0)) for k in self._read_before}
        if epoch >= 0:
            self.set_epoch(epoch)
            total = int(self._order(self._shared.view()).order.shape[0])
            if position > total:
                raise ValueError(f"state_dict position {position} is past this rank's epoch length {total}")

    def efficiency_report(self, *, epochs_done: int | None = None) -> dict[str, Any]:
        """The shared report plus this epoch's bad-data counts, gathered from every DataLoader worker:
        ``skipped_unreadable`` samples and the ``skipped_draws`` of the plan they cost; and what this stream
        read in all its epochs (``stats`` has the current epoch's): ``bytes_read`` (for remote shards: bytes
        fetched), ``requests`` and ``retries`` (remote shards)."""
        report = super().efficiency_report(epochs_done=epochs_done)
        stats = self.stats
        report["skipped_unreadable"] = stats["skipped"]
        report["skipped_draws"] = stats["skipped_draws"]
        for k in self._read_before:  # the run totals: earlier epochs plus this one
            report[k] = self._read_before[k] + stats[k]
        return report

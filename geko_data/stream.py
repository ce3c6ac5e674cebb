"""GEKOStream: an IterableDataset over WebDataset shards that filters at read time.

Each epoch's plan (``plan.py``) says how often every sample is drawn. The
stream reads only the samples drawn: in local files it seeks straight to
them with the shard index and over everything else (frozen and pruned
samples are never read, let alone decoded); from pipes and URLs it reads
through and discards. A sample drawn m times is read once and yielded m
times, spread by a seeded, bounded block shuffle.

Order and resume: a rank's order for an epoch is a pure function of (plan,
seed, epoch, rank). Batch j of it goes to DataLoader worker ``j % num_workers``,
which is exactly how the DataLoader's round-robin collects batches, so with
``batch_size`` set to the DataLoader's the loop sees the rank order itself,
whatever the number of workers, and a resume after ``consumed`` samples
re-splits what is left the same way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from geko_data.config import GEKOConfig
from geko_data.epochs import EpochDriver, check_int
from geko_data.feedback import Feedback
from geko_data.plan import PURPOSE_ORDER, PURPOSE_SHARDS, EpochPlan, rank_slice, rng
from geko_data.shards import ShardError, ShardIndex, parse_sample, read_index
from geko_data.shared import SharedPlan
from geko_data.state import SampleState, StateFileError
from geko_data.world import World

__all__ = ["GEKOStream", "stream_order"]


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


class _Reader:
    """Reads planned samples of one worker; seeks in local files, reads through pipes and URLs."""

    def __init__(self, index: ShardIndex, urls: list[str], handler: Callable[[Exception], bool] | None,
                 stats: dict[str, int]) -> None:
        self.index = index
        self.urls = urls
        self.handler = handler
        self.stats = stats
        self._file: Any = None
        self._file_shard = -1
        self._stream: Iterator[dict[str, Any]] | None = None
        self._stream_shard = -1
        self._stream_last = -1  # id of the last sample taken from the open stream

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._stream = None
        self._file_shard = self._stream_shard = -1

    def _fail(self, exn: Exception) -> None:
        if self.handler is None or not self.handler(exn):
            raise exn
        self.stats["skipped"] += 1

    def read(self, ids: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(id, raw sample) for ``ids`` (in read order); failures go to the handler."""
        for i in ids.tolist():
            shard = int(self.index.shard[i])
            try:
                if _is_local(self.urls[shard]):
                    sample = self._read_local(i, shard)
                else:
                    sample = self._read_stream(i, shard)
            except (ShardError, OSError) as exn:
                self.close()
                self._fail(exn)
                continue
            self.stats["samples_read"] += 1
            yield i, sample

    def _open_local(self, shard: int) -> Any:
        if self._file_shard != shard:
            self.close()
            path = self.urls[shard].removeprefix("file://")
            if not os.path.exists(path):
                raise ShardError(f"shard {path!r} is missing")
            f = open(path, "rb")  # noqa: SIM115 - kept open across samples of the shard
            size = os.fstat(f.fileno()).st_size
            if size != self.index.sizes[shard]:
                f.close()
                raise ShardError(f"shard {path!r} changed since indexing: {size} bytes, index says "
                                 f"{self.index.sizes[shard]}")
            self._file, self._file_shard = f, shard
        return self._file

    def _read_local(self, i: int, shard: int) -> dict[str, Any]:
        f = self._open_local(shard)
        offset, length = int(self.index.offset[i]), int(self.index.length[i])
        f.seek(offset)  # skipped samples are seeked over, never read
        buf = f.read(length)
        self.stats["bytes_read"] += len(buf)
        key = str(self.index.keys[i])
        if len(buf) != length:
            raise ShardError(f"shard {self.urls[shard]!r}: sample {key!r} is truncated "
                             f"({len(buf)} of {length} bytes)")
        return parse_sample(buf, shard=self.urls[shard], key=key)

    def _read_stream(self, i: int, shard: int) -> dict[str, Any]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        url = self.urls[shard]
        if self._stream_shard != shard or i <= self._stream_last:
            self.close()
            members = ({**m, "__url__": url} for m in tar_file_iterator(gopen(url, "rb")))
            self._stream = iter(group_by_keys(members))
            self._stream_shard, self._stream_last = shard, -1
        key = str(self.index.keys[i])
        assert self._stream is not None
        for sample in self._stream:  # samples before the wanted one are read and discarded
            if sample["__key__"] == key:
                self._stream_last = i
                sample.pop("__url__", None)
                sample.pop("__local_path__", None)
                return sample
        raise ShardError(f"shard {url!r}: key {key!r} not found (shard changed since indexing?)")


class GEKOStream(EpochDriver, IterableDataset):
    """Streams the current epoch's GEKO plan from WebDataset shards, filtering at read time.

    Args:
        source: a folder holding ``index.arrow`` (``write_shards`` / ``geko-data index``) or the index path.
        total_epochs: planned epochs (sets the curriculum's progress).
        config: the policy. Defaults to ``GEKOConfig()`` (or ``state.config`` when ``state`` is given).
        seed: seed of every random choice (with epoch, rank and worker). Defaults to ``0``.
        decode: ``None`` (raw bytes), a callable ``sample -> sample``, or webdataset decoder specs
            (e.g. ``"pil"`` or a list of handlers). Defaults to ``None``.
        shuffle: shuffle shard order and, within ``shuffle_buffer`` blocks, samples. Defaults to ``True``.
        state: an existing ``SampleState`` for these shards. Defaults to a fresh one.
        world: ranks (``World(rank=, world_size=)``). Defaults to ``World.detect()``.
        handler: webdataset-style exception handler (``webdataset.warn_and_continue``) to skip and count
            unreadable samples. Defaults to ``None`` (raise).
        batch_size: the DataLoader's batch size; with it the order is independent of the number of
            workers and mid-epoch resume is exact with workers. Defaults to ``None`` (1).
        shuffle_buffer: block size of the sample shuffle (samples held per worker). Defaults to ``512``.
        shard_url: maps a local shard path to the URL to read, e.g. ``"pipe:cat {}"``. Defaults to ``None``.
        epoch_length: draws per epoch over all ranks. Defaults to the number of active samples.
    """

    def __init__(self, source: str | os.PathLike, *, total_epochs: int, config: GEKOConfig | None = None,
                 seed: int = 0, decode: Any = None, shuffle: bool = True, state: SampleState | None = None,
                 world: World | None = None, handler: Callable[[Exception], bool] | None = None,
                 batch_size: int | None = None, shuffle_buffer: int = 512,
                 shard_url: str | Callable[[str], str] | None = None, epoch_length: int | None = None) -> None:
        check_int("total_epochs", total_epochs, 1)
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
        self.index = read_index(source)
        n = self.index.num_samples
        if state is not None:
            if not isinstance(state, SampleState):
                raise TypeError(f"`state` must be a SampleState, got {type(state).__name__}")
            if len(state) != n:
                raise ValueError(f"`state` holds {len(state)} samples but the shards hold {n}")
            if state.fingerprint is not None and state.fingerprint != self.index.fingerprint:
                raise StateFileError(f"`state` was written for other shards (fingerprint {state.fingerprint!r}, "
                                     f"these shards have {self.index.fingerprint!r})")
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
        self._decoder = self._make_decoder(decode)
        detected = world or World.detect()
        self.world = World(rank=detected.rank, world_size=detected.world_size)
        if shard_url is None:
            self.urls = list(self.index.shards)
        elif isinstance(shard_url, str):
            self.urls = [shard_url.format(p) for p in self.index.shards]
        elif callable(shard_url):
            self.urls = [shard_url(p) for p in self.index.shards]
        else:
            raise TypeError(f"`shard_url` must be None, a format string or a callable, got {shard_url!r}")
        self._shared = SharedPlan(n)
        self._start = torch.zeros(1, dtype=torch.int64).share_memory_()  # resume position of the next epoch
        self.epoch = -1
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._yielded = 0
        # Counters of the process that iterates (the main process when num_workers=0).
        self.stats = {"bytes_read": 0, "samples_read": 0, "samples_yielded": 0, "skipped": 0}

    @staticmethod
    def _make_decoder(decode: Any) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        if decode is None or callable(decode) and not isinstance(decode, (str, list, tuple)):
            return decode
        from webdataset import autodecode

        specs = [decode] if isinstance(decode, str) else list(decode)
        handlers = [autodecode.imagehandler(s) if isinstance(s, str) else s for s in specs]
        return autodecode.Decoder(handlers)

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: repartition (every ``repartition_every`` epochs), fix and publish its plan."""
        if get_worker_info() is not None:
            raise RuntimeError("set_epoch() must be called in the main process, not in a DataLoader worker")
        resuming = int(self._start.item()) > 0 and epoch == self.epoch
        self._shared.publish(self._advance(epoch))
        self._order_cache = None
        if not resuming:
            self._start.zero_()
        self._yielded = int(self._start.item())

    def _order(self, plan: EpochPlan) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != plan.epoch:
            order = stream_order(self.index, plan, seed=self.seed, rank=self.world.rank,
                                 world_size=self.world.world_size, shuffle=self.shuffle,
                                 shuffle_buffer=self.shuffle_buffer)
            self._order_cache = (plan.epoch, order)
        return self._order_cache[1]

    def __len__(self) -> int:
        """This rank's samples in the current epoch (after a resume: what is left of it)."""
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
        remaining = self._order(plan)[start:]
        batch = self.batch_size or 1
        # Batch j of what is left goes to worker j % num_workers: the DataLoader's round-robin order.
        mine = remaining[(np.arange(remaining.shape[0]) // batch) % num_workers == worker]
        if info is None:
            self._yielded = start
        yield from self._read_and_yield(mine, plan, info is None)

    def _read_and_yield(self, mine: np.ndarray, plan: EpochPlan, main: bool) -> Iterator[dict[str, Any]]:
        reader = _Reader(self.index, self.urls, self.handler, self.stats)
        n_shards = len(self.index.shards)
        shard_rank = np.arange(n_shards)
        if self.shuffle:
            shard_rank[rng(self.seed, plan.epoch, PURPOSE_SHARDS).permutation(n_shards)] = np.arange(n_shards)
        try:
            for lo in range(0, mine.shape[0], self.shuffle_buffer):
                chunk = mine[lo:lo + self.shuffle_buffer]
                uniq = np.unique(chunk)
                uniq = uniq[np.argsort(shard_rank[self.index.shard[uniq]], kind="stable")]  # read in file order
                cache = dict(reader.read(uniq))
                for i in chunk.tolist():
                    raw = cache.get(i)
                    if raw is None:  # skipped by the handler, already counted
                        continue
                    sample = dict(raw)
                    sample["__url__"] = self.urls[int(self.index.shard[i])]
                    if self._decoder is not None:
                        try:
                            sample = self._decoder(sample)
                        except Exception as exn:  # decoders raise anything; the handler decides
                            reader._fail(exn)
                            continue
                    sample["__index__"] = i
                    sample["__weight__"] = float(plan.loss_weight[i])
                    self.stats["samples_yielded"] += 1
                    if main:
                        self._yielded += 1
                    yield sample
        finally:
            reader.close()
        if self.stats["skipped"]:
            warnings.warn(f"GEKOStream skipped {self.stats['skipped']} unreadable sample(s) this epoch "
                          f"(handler={getattr(self.handler, '__name__', self.handler)})", stacklevel=2)

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
            **self._plan_fields(), "num_samples": self.index.num_samples, "fingerprint": self.index.fingerprint,
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
        report = super().efficiency_report(epochs_done=epochs_done)
        report["skipped_unreadable"] = self.stats["skipped"]
        return report

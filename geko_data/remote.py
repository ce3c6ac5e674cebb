"""Shards in object stores: read only the byte ranges of the samples an epoch draws.

A shard URL (``s3://``, ``gs://``, ``az://``, ``http(s)://`` or any protocol of an installed fsspec
filesystem) is read with byte-range requests: the index gives every sample's offset and length, the
planner (``plan_requests``, pure) coalesces the drawn samples of one worker into requests, and the
fetcher (``RangeFetcher``) keeps a bounded number of them in flight, retrying transient failures with
exponential backoff and jitter. Frozen samples are never fetched, and with several DataLoader workers each
range is fetched once, by the first worker that needs it, and handed to the others (``SharedRanges``), so
the bytes fetched shrink with the frozen share and do not grow with the number of workers. Fetched bytes
go through ``shards.parse_sample``, the parser of local seek reads.

Credentials stay in ``storage_options`` (or the filesystem library's usual sources: environment,
config files, instance roles); they are never written to an index or a state file, and every message
this module raises has them and any ``user:password@`` of a URL replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import random
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from geko_data.shards import (INDEX_NAME, ShardError, ShardIndex, fingerprint, index_shards, parse_sample,
                              read_index)

__all__ = ["RemoteConfig", "RangeFetcher", "RangeReader", "RemoteError", "Request", "index_remote", "is_url",
           "plan_requests", "read_index_url"]

#: Protocol -> (package that implements it, extra of geko-data that installs it).
PROTOCOL_PACKAGES = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
    "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
}
# Statuses worth another try: throttling (429, S3's 503 SlowDown), server errors, request timeout.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Errors that another try cannot fix. 403 and 404 arrive as PermissionError / FileNotFoundError from
# fsspec's filesystems, or as an HTTP status below 500 from aiohttp.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError,
              AttributeError, NotImplementedError, KeyError)
# Filesystems a forked child inherited: kept referenced and never closed in the child. Closing one there
# would unregister the parent's sockets from the event loop's epoll set, which parent and child share
# after a fork, and the parent's next request on a kept-alive connection would wait forever.
_INHERITED: list[Any] = []


class RemoteError(ValueError):
    """A remote URL that cannot be used: unknown protocol, filesystem package missing, bad options."""


def is_url(path: Any) -> bool:
    """True for a remote URL (``proto://...`` other than ``file://``); ``pipe:`` commands are not URLs."""
    return isinstance(path, str) and "://" in path and not path.startswith(("file://", "pipe:"))


def _secrets(options: Any) -> list[str]:
    """Every string value of ``storage_options`` long enough to be a credential, nested ones too."""
    if isinstance(options, dict):
        return [s for v in options.values() for s in _secrets(v)]
    if isinstance(options, (list, tuple)):
        return [s for v in options for s in _secrets(v)]
    return [options] if isinstance(options, str) and len(options) >= 4 else []


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def redact(text: str, storage_options: dict[str, Any] | None) -> str:
    """``text`` with credentials of ``storage_options`` and URL userinfo replaced by ``***``."""
    for secret in sorted(_secrets(storage_options or {}), key=len, reverse=True):
        text = text.replace(secret, "***")
    words = [_strip_userinfo(w) if "://" in w and "@" in w else w for w in text.split(" ")]
    return " ".join(words)


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """How remote shards are read. Every field is validated when the object is made.

    Args:
        concurrency: byte-range requests in flight per reader (one reader per DataLoader worker).
            Defaults to ``8``.
        gap: adjacent drawn samples are always fetched in one request; samples less than this many bytes
            apart are too, the bytes
            between them read and dropped: fewer requests for a few bytes more. The default reads through
            a tar header of a skipped non-sample member (512 bytes) but never a sample (1024 bytes at
            least). Samples of other DataLoader workers count as gaps too, so a large ``gap`` multiplies
            traffic with the number of workers. Defaults to ``1024``.
        max_request: bytes per request at most (a single sample larger than this is one request of its
            own size). Defaults to ``8 MiB``.
        retries: further tries of a request that failed transiently (connection refused or reset,
            timeout, HTTP 408/429/5xx) before a ShardError naming the URL, the byte range and the last
            error. 403, 404 and other client errors are never retried. Defaults to ``6``.
        backoff: seconds before the first retry; each retry doubles it, up to ``max_backoff``, and waits a
            random time between half of it and all of it (jitter, so workers do not retry in lockstep).
            Defaults to ``0.2``.
        max_backoff: longest wait between two tries, in seconds. Defaults to ``5.0``.
        timeout: seconds one request may take before it counts as failed (transient), for filesystems
            with an async implementation (s3fs, gcsfs, adlfs, HTTP). Defaults to ``60.0``.
    """

    concurrency: int = 8
    gap: int = 1024
    max_request: int = 8 << 20
    retries: int = 6
    backoff: float = 0.2
    max_backoff: float = 5.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        for name, lo in (("concurrency", 1), ("gap", 0), ("max_request", 512), ("retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"RemoteConfig `{name}` must be an int >= {lo}, got {value!r}")
        for name in ("backoff", "max_backoff", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"RemoteConfig `{name}` must be a number of seconds > 0, got {value!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed try ``attempt`` (0-based): exponential, capped, with jitter."""
        cap = min(self.max_backoff, self.backoff * 2.0 ** attempt)
        return cap / 2 + rand() * cap / 2

    @property
    def worst_case_wait(self) -> float:
        """Longest time a request keeps being retried before its ShardError: every backoff at its maximum
        plus every try running into ``timeout`` (a refused connection fails at once instead)."""
        waits = sum(min(self.max_backoff, self.backoff * 2.0 ** a) for a in range(self.retries))
        return waits + (self.retries + 1) * self.timeout


# ---------------------------------------------------------------------- planning (pure)
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


# ---------------------------------------------------------------------- filesystems
def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; RemoteError naming the package to install when
    its protocol is unknown or its filesystem library is missing."""
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"`storage_options` must be a dict or None, got {type(storage_options).__name__}")
    protocol = url.split("://", 1)[0].lower()
    package, extra = PROTOCOL_PACKAGES.get(protocol, (None, None))
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"reading {redact(url, storage_options)!r} needs fsspec: pip install "
                          f"'geko-data[{extra or 's3'}]'") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = f"the package {package}, which is not installed: pip install 'geko-data[{extra}]'" if extra \
            else f"a package that is not installed ({e})"
        raise RemoteError(f"protocol {protocol!r} of {redact(url, storage_options)!r} needs {hint}") from None
    except ValueError:
        known = ", ".join(sorted(PROTOCOL_PACKAGES))
        raise RemoteError(f"unknown protocol {protocol!r} in {redact(url, storage_options)!r}: use one of "
                          f"{known} or another protocol of an installed fsspec filesystem") from None
    # A filesystem of our own, not fsspec's shared instance: the fetcher closes it (sessions, sockets) in the
    # process that made it, before a DataLoader forks workers from that process.
    options = {"skip_instance_cache": True, **(storage_options or {})}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # a package the filesystem needs only when made (aiohttp for http)
        raise RemoteError(f"protocol {protocol!r} needs a package that is not installed: pip install "
                          f"'geko-data[{extra or protocol}]' ({e})") from None
    except (TypeError, ValueError) as e:
        raise RemoteError(f"`storage_options` rejected by the {protocol!r} filesystem: "
                          f"{redact(str(e), storage_options)}") from None
    return fs, path


def _status(exn: BaseException) -> int | None:
    """HTTP status of an error when it carries one (aiohttp, botocore)."""
    status = getattr(exn, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def is_transient(exn: BaseException) -> bool:
    """Whether another try may succeed: yes for connection errors, timeouts, throttling and 5xx; no for
    403/404, other client errors and programming errors."""
    if isinstance(exn, FileNotFoundError) and exn.__cause__ is not None:
        # fsspec's HTTP info() turns every failure, a refused connection too, into FileNotFoundError.
        return is_transient(exn.__cause__)
    status = _status(exn)
    if status is not None:
        return status in _TRANSIENT_STATUS
    if isinstance(exn, _PERMANENT):
        return False
    return not (isinstance(exn, ValueError) and not isinstance(exn, OSError))


def _describe(exn: BaseException) -> str:
    if isinstance(exn, FileNotFoundError) and exn.__cause__ is not None:
        exn = exn.__cause__
    status = _status(exn)
    what = {403: "access denied (403)", 404: "not found (404)"}.get(status or 0, "")
    if not what and isinstance(exn, FileNotFoundError):
        what = "not found (404)"
    elif not what and isinstance(exn, PermissionError):
        what = "access denied (403)"
    text = f"{type(exn).__name__}: {exn}"
    return f"{what}, {text}" if what else text


# ---------------------------------------------------------------------- fetching
@dataclass
class Fetched:
    """What became of one request: ``value`` (bytes, or a size), or ``error`` after ``attempts`` tries."""

    value: Any
    error: ShardError | None
    attempts: int


@dataclass
class RangeFetcher:
    """Byte-range GETs with retries, at most ``config.concurrency`` in flight (a small thread pool).

    Filesystems and the pool are made on first use in the process that fetches, so a fetcher made in
    the main process works in fork and spawn DataLoader workers alike.
    """

    storage_options: dict[str, Any] | None = None
    config: RemoteConfig = field(default_factory=RemoteConfig)
    sleep: Callable[[float], None] = time.sleep
    _fs: dict[str, tuple[Any, str]] = field(default_factory=dict, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)

    def _forked(self) -> None:
        # Threads and the filesystems' event loops do not survive a fork: a DataLoader worker starts afresh.
        if self._pid != os.getpid():
            _INHERITED.append(self._fs)
            self._fs, self._pool, self._lock, self._pid = {}, None, threading.Lock(), os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs={}, _pool=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    def filesystem(self, url: str) -> tuple[Any, str]:
        """(filesystem, path) for ``url``: one filesystem (one connection pool) per protocol."""
        self._forked()
        key = url if "::" in url else url.split("://", 1)[0]  # chained URLs ("simplecache::s3://") apart
        with self._lock:
            if key not in self._fs:
                self._fs[key] = open_url(url, self.storage_options)[0]
            fs = self._fs[key]
        return fs, (open_url(url, self.storage_options)[1] if "::" in url else fs._strip_protocol(url))

    def _failed(self, url: str, what: str, exn: Exception, attempt: int) -> Fetched:
        tries = f" after {attempt + 1} tries" if attempt else ""
        why = redact(f"{url}: {what}: failed{tries}: {_describe(exn)}", self.storage_options)
        return Fetched(None, ShardError(why), attempt + 1)

    def _checked(self, url: str, start: int, end: int, got: Fetched) -> Fetched:
        if got.error is None and len(got.value) != end - start:
            # A server that ignores Range sends the whole object; a shorter answer means a smaller one.
            why = (f"{url}: bytes {start}..{end}: got {len(got.value)} bytes for a {end - start}-byte range "
                   f"(object changed since indexing, or a server that ignores Range requests)")
            return Fetched(None, ShardError(redact(why, self.storage_options)), got.attempts)
        return got

    async def _afetch(self, fs: Any, path: str, url: str, start: int, end: int) -> Fetched:
        """``fetch`` as a coroutine on an async filesystem's own event loop: no thread per request."""
        for attempt in range(self.config.retries + 1):
            try:
                data = await asyncio.wait_for(fs._cat_file(path, start=start, end=end), self.config.timeout)
            except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
                if not is_transient(e) or attempt == self.config.retries:
                    return self._failed(url, f"bytes {start}..{end}", e, attempt)
                await asyncio.sleep(self.config.delay(attempt))
                continue
            return self._checked(url, start, end, Fetched(bytes(data), None, attempt + 1))
        raise AssertionError("unreachable")

    def _retry(self, url: str, what: str, call: Callable[[Any, str, dict[str, Any]], Any]) -> Fetched:
        """``call(fs, path, kwargs)`` until it succeeds, fails for good, or the retries are used up."""
        fs, path = self.filesystem(url)
        kwargs = {"timeout": self.config.timeout} if getattr(fs, "async_impl", False) else {}
        for attempt in range(self.config.retries + 1):
            try:
                return Fetched(call(fs, path, kwargs), None, attempt + 1)
            except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
                if not is_transient(e) or attempt == self.config.retries:
                    return self._failed(url, what, e, attempt)
                self.sleep(self.config.delay(attempt))
        raise AssertionError("unreachable")

    def fetch(self, url: str, start: int, end: int) -> Fetched:
        """Bytes ``start..end`` (end exclusive) of ``url``, retried per ``config``; never raises."""
        got = self._retry(url, f"bytes {start}..{end}",
                          lambda fs, path, kw: fs.cat_file(path, start=start, end=end, **kw))
        return self._checked(url, start, end, got)

    def size(self, url: str) -> Fetched:
        """The byte size of ``url``, retried per ``config``; never raises."""
        return self._retry(url, "reading its size", lambda fs, path, kw: int(fs.size(path)))

    def map(self, jobs: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """``fetch`` each ``(url, start, end)``, in order, with up to ``concurrency`` requests in flight: as
        coroutines on the filesystem's event loop when it is async (s3fs, gcsfs, adlfs, HTTP), else in a
        small thread pool."""
        self._forked()
        pending: deque[Future[Fetched]] = deque()
        try:
            for url, start, end in jobs:
                fs, path = self.filesystem(url)
                if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
                    future = asyncio.run_coroutine_threadsafe(self._afetch(fs, path, url, start, end), fs.loop)
                else:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency,
                                                        thread_name_prefix="geko-fetch")
                    future = self._pool.submit(self.fetch, url, start, end)
                pending.append(future)
                if len(pending) >= self.config.concurrency:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        """Stop the pool and drop the filesystems (their sessions close here); both are made again on use."""
        self._forked()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._fs = {}


class SharedRanges:
    """One rank's epoch fetched once, whatever the number of DataLoader workers: the byte ranges are planned
    over the rank's whole order (``block`` positions at a time, every worker's samples together), and the
    first worker that needs a range fetches it for all.

    The batches of the workers interleave sample by sample in file order (batch ``j`` goes to worker
    ``j % num_workers``), so ranges planned per worker would carry about one sample per worker each. Here
    a range covers a whole block; the worker that claims it (an ``O_EXCL`` file in ``folder``) fetches it,
    writes it once and hard-links it for every worker that has samples in it; each worker drops its link
    after the last chunk that needs the range, so the bytes leave the disk when the last reader is done. A
    claimant never waits on anyone (it fetches all its claims before it reads), so no worker waits forever;
    a waiter gives up after ``wait`` seconds with a ShardError.

    Every worker builds the same table from ``order`` (what is left of the rank's epoch), ``batch``,
    ``num_workers`` and ``tag`` (unique per epoch plan), so nothing but the files is shared.
    """

    def __init__(self, *, index: ShardIndex, remote: Sequence[bool], order: np.ndarray, batch: int,
                 num_workers: int, worker: int, chunk: int, folder: str, tag: str, config: RemoteConfig) -> None:
        self.folder, self.tag, self.worker = folder, tag, worker
        self.wait = config.worst_case_wait + 30.0
        n_pos = order.shape[0]
        pos = np.arange(n_pos)
        owner = (pos // batch) % num_workers
        block = pos // (chunk * num_workers)  # about one chunk of every worker
        keep = np.asarray(remote, dtype=bool)[index.shard[order]]
        pairs = np.unique(block[keep].astype(np.int64) * (index.num_samples + 1) + order[keep])
        pair_block, pair_id = np.divmod(pairs, index.num_samples + 1)
        # Ranges per (block, shard): pairs are sorted by block, then id (= shard, then file order).
        self.ranges: list[tuple[int, int, int]] = []  # (shard, start, end)
        pair_range = np.empty(pairs.shape[0], dtype=np.int64)
        cut = np.flatnonzero(np.diff(pair_block) | np.diff(index.shard[pair_id])) + 1
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, pairs.shape[0]]):
            ids = pair_id[lo:hi]
            for req in plan_requests(index.offset[ids], index.length[ids], gap=config.gap,
                                     max_request=config.max_request):
                pair_range[lo + req.lo:lo + req.hi] = len(self.ranges)
                self.ranges.append((int(index.shard[ids[0]]), req.start, req.end))
        # The range of every kept position, its readers, and the last chunk of this worker that reads it.
        kept_pos = pos[keep]
        where = np.searchsorted(pairs, block[kept_pos].astype(np.int64) * (index.num_samples + 1) + order[kept_pos])
        pos_range = pair_range[where]
        self.readers = [set() for _ in self.ranges]
        for r, w in set(zip(pos_range.tolist(), owner[kept_pos].tolist())):
            self.readers[r].add(w)
        mine = owner[kept_pos] == worker
        my_chunk = (np.cumsum(owner == worker) - 1)[kept_pos][mine] // chunk
        self.chunk_ranges: dict[int, dict[int, int]] = {}  # chunk -> {sample id: range}
        for c, i, r in zip(my_chunk.tolist(), order[kept_pos][mine].tolist(), pos_range[mine].tolist()):
            self.chunk_ranges.setdefault(c, {}).setdefault(i, r)
        self.last_chunk: dict[int, int] = {}
        for c, r in zip(my_chunk.tolist(), pos_range[mine].tolist()):
            self.last_chunk[r] = max(self.last_chunk.get(r, -1), c)

    def _name(self, r: int, what: str) -> str:
        return os.path.join(self.folder, f"{self.tag}-{r}.{what}")

    def claim(self, r: int) -> bool:
        """True for the one worker that fetches range ``r``."""
        try:
            os.close(os.open(self._name(r, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            return False

    def deliver(self, r: int, got: Fetched) -> None:
        """Hand range ``r``'s bytes (or its error) to every worker that reads it."""
        tmp = self._name(r, f"tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(got.value if got.error is None else str(got.error).encode())
        if got.error is not None:
            os.replace(tmp, self._name(r, "err"))
            return
        for w in sorted(self.readers[r]):
            os.link(tmp, self._name(r, f"w{w}"))
        os.unlink(tmp)

    def take(self, r: int) -> bytes | ShardError:
        """Range ``r``'s bytes, waiting (bounded) for the worker that claimed it."""
        mine, err = self._name(r, f"w{self.worker}"), self._name(r, "err")
        deadline, pause = time.monotonic() + self.wait, 0.001
        while True:
            try:
                with open(mine, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            if os.path.exists(err):
                with open(err, "rb") as f:
                    return ShardError(f.read().decode("utf-8", "replace"))
            if time.monotonic() > deadline:
                return ShardError(f"bytes {self.ranges[r][1]}..{self.ranges[r][2]} of shard #{self.ranges[r][0]}: "
                                  f"the DataLoader worker fetching them did not deliver within {self.wait:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def release(self, chunk: int) -> None:
        """Drop this worker's links to the ranges it reads for the last time in ``chunk``."""
        for r in [r for r, c in self.last_chunk.items() if c == chunk]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name(r, f"w{self.worker}"))
            del self.last_chunk[r]


class RangeReader:
    """Reads samples of remote shards for one worker: plans the requests, fetches, parses.

    ``tally`` counts ``bytes_read`` (all bytes fetched, gaps included), ``requests`` (every try) and
    ``retries`` since its owner last reset it. Each shard's size is checked once against the index.
    """

    def __init__(self, index: ShardIndex, urls: Sequence[str], fetcher: RangeFetcher,
                 share: SharedRanges | None = None) -> None:
        self.index = index
        self.urls = list(urls)
        self.fetcher = fetcher
        self.share = share  # with several DataLoader workers: ranges planned per rank, fetched once
        self._chunk = 0
        self.tally = {"bytes_read": 0, "requests": 0, "retries": 0}
        self._size_error: dict[int, ShardError | None] = {}
        self._remote = [is_url(u) for u in self.urls]

    def handles(self, shard: int) -> bool:
        """Whether shard number ``shard`` is remote (read here) rather than a local file or a pipe."""
        return self._remote[shard]

    def _count(self, got: Fetched) -> None:
        self.tally["requests"] += got.attempts
        self.tally["retries"] += got.attempts - 1
        if got.error is None and isinstance(got.value, bytes):
            self.tally["bytes_read"] += len(got.value)

    def _check_size(self, shard: int) -> ShardError | None:
        if shard not in self._size_error:
            got = self.fetcher.size(self.urls[shard])
            self._count(got)
            err = got.error
            if err is None and got.value != self.index.sizes[shard]:
                err = ShardError(redact(f"shard {self.urls[shard]!r} changed since indexing: {got.value} bytes, "
                                        f"index says {self.index.sizes[shard]}", self.fetcher.storage_options))
            self._size_error[shard] = err
        return self._size_error[shard]

    def read(self, ids: Iterable[int], *, check: Callable[[int, bytes], None] | None = None
             ) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
        """``(id, sample or ShardError)`` for every id; samples of one shard come in file order.

        ``check(id, raw bytes)`` runs before parsing and may raise ShardError (the content hash check).
        With a ``share``, ``ids`` must be the remote ids of the owner's next chunk (one call per chunk).
        """
        if self.share is not None:
            yield from self._read_shared(ids, check)
            return
        by_shard: dict[int, list[int]] = {}
        for i in ids:
            by_shard.setdefault(int(self.index.shard[i]), []).append(int(i))
        jobs: list[tuple[int, Request, np.ndarray]] = []
        for shard, group in by_shard.items():
            run = np.asarray(group, dtype=np.int64)
            run = run[np.argsort(self.index.offset[run], kind="stable")]
            err = self._check_size(shard)
            if err is not None:
                yield from ((int(i), err) for i in run)
                continue
            offsets, lengths = self.index.offset[run], self.index.length[run]
            for req in plan_requests(offsets, lengths, gap=self.fetcher.config.gap,
                                     max_request=self.fetcher.config.max_request):
                jobs.append((shard, req, run[req.lo:req.hi]))
        fetched = self.fetcher.map((self.urls[shard], req.start, req.end) for shard, req, _ in jobs)
        for (shard, req, run), got in zip(jobs, fetched):
            self._count(got)
            if got.error is not None:
                yield from ((int(i), got.error) for i in run)
                continue
            url = self.urls[shard]
            for i in run.tolist():
                off, length = int(self.index.offset[i]), int(self.index.length[i])
                buf = got.value[off - req.start:off - req.start + length]
                try:
                    if check is not None:
                        check(i, buf)
                    yield i, parse_sample(buf, shard=url, key=str(self.index.keys[i]), offset=off)
                except ShardError as e:
                    yield i, e

    def _parse(self, i: int, buf: bytes, check: Callable[[int, bytes], None] | None) -> dict[str, Any] | ShardError:
        off = int(self.index.offset[i])
        try:
            if check is not None:
                check(i, buf)
            return parse_sample(buf, shard=self.urls[int(self.index.shard[i])], key=str(self.index.keys[i]),
                                offset=off)
        except ShardError as e:
            return e

    def _read_shared(self, ids: Iterable[int], check: Callable[[int, bytes], None] | None
                     ) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
        share = self.share
        assert share is not None
        chunk, self._chunk = self._chunk, self._chunk + 1
        need = share.chunk_ranges.get(chunk, {})
        wanted = [int(i) for i in ids]
        for shard in sorted({int(self.index.shard[i]) for i in wanted}):
            err = self._check_size(shard)
            if err is not None:
                yield from ((i, err) for i in wanted if int(self.index.shard[i]) == shard)
                wanted = [i for i in wanted if int(self.index.shard[i]) != shard]
        ranges = sorted({need[i] for i in wanted})
        claimed = [r for r in ranges if share.claim(r)]
        jobs = [(self.urls[share.ranges[r][0]], share.ranges[r][1], share.ranges[r][2]) for r in claimed]
        fetched: dict[int, bytes | ShardError] = {}  # what this worker fetched needs no reading back
        for r, got in zip(claimed, self.fetcher.map(jobs)):
            self._count(got)
            share.deliver(r, got)
            fetched[r] = got.value if got.error is None else got.error
        by_range: dict[int, list[int]] = {}
        for i in wanted:
            by_range.setdefault(need[i], []).append(i)
        for r, members in by_range.items():
            data = fetched.pop(r) if r in fetched else share.take(r)
            start = share.ranges[r][1]
            for i in members:
                if isinstance(data, ShardError):
                    yield i, data
                    continue
                off, length = int(self.index.offset[i]), int(self.index.length[i])
                yield i, self._parse(i, data[off - start:off - start + length], check)
        share.release(chunk)

    def close(self) -> None:
        self.fetcher.close()


# ---------------------------------------------------------------------- indexes in object stores
def _index_url(url: str) -> str:
    return url if url.endswith(".arrow") else url.rstrip("/") + "/" + INDEX_NAME


def resolve_shard_name(index_url: str, name: str) -> str:
    """The URL of shard ``name`` of the index at ``index_url``. ``read_index`` has already held ``name`` to
    a relative path under the index's folder, so the result stays in that folder of the same store."""
    base = urlsplit(index_url)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(base.path) or "/", name))
    return urlunsplit((base.scheme, base.netloc, path, "", ""))


def read_index_url(url: str, *, storage_options: dict[str, Any] | None = None,
                   config: RemoteConfig | None = None) -> ShardIndex:
    """Read the shard index at ``url`` (an ``index.arrow`` URL or the folder URL holding one); shard names
    resolve against the index's folder, as for local indexes."""
    fetcher = RangeFetcher(storage_options=storage_options, config=config or RemoteConfig())
    url = _index_url(url)
    try:
        size = fetcher.size(url)
        got = size if size.error is not None else fetcher.fetch(url, 0, size.value)
    finally:
        fetcher.close()
    if got.error is not None:
        raise FileNotFoundError(f"shard index {redact(url, storage_options)!r} cannot be read ({got.error})") \
            if "(404)" in str(got.error) else got.error
    tmp = tempfile.mkdtemp(prefix="geko-index-")
    try:
        local = os.path.join(tmp, INDEX_NAME)
        with open(local, "wb") as f:
            f.write(got.value)
        index = read_index(local)
        raw = pa.ipc.open_file(local).schema.metadata[b"geko_data_index"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = json.loads(raw)["shards"]
    return replace(index, shards=tuple(resolve_shard_name(url, n) for n in names))


def expand_urls(urls: Sequence[str], fetcher: RangeFetcher) -> list[str]:
    """Shard URLs of ``urls``: a folder URL (ending in ``/``) or glob stands for the ``*.tar`` in it."""
    out: list[str] = []
    for url in urls:
        fs, path = fetcher.filesystem(url)
        if any(c in url for c in "*?[") or url.endswith("/"):
            pattern = path if any(c in url for c in "*?[") else path.rstrip("/") + "/*.tar"
            try:
                found = sorted(fs.glob(pattern))
            except Exception as e:  # noqa: BLE001 - listing errors are the filesystem's own
                raise ShardError(redact(f"cannot list {url!r}: {_describe(e)}", fetcher.storage_options)) from None
            if not found:
                raise ShardError(redact(f"no *.tar shards found at {url!r}", fetcher.storage_options))
            out += [p if "://" in p else fs.unstrip_protocol(p) for p in found]
        else:
            out.append(url)
    return out


def index_remote(urls: Sequence[str], *, output: str | None = None, storage_options: dict[str, Any] | None = None,
                 progress: bool = True, config: RemoteConfig | None = None) -> ShardIndex:
    """Index remote tars (``index_shards`` for URLs); write ``output`` (a local path or a URL) when given.

    Each shard is downloaded once, in ``max_request``-sized ranges with the usual retries, to a temporary
    file that is scanned with the local indexer and removed. ``progress`` shows bytes downloaded. An
    index written next to its shards (same store) names them relative to itself; a local index keeps
    their URLs.
    """
    config = config or RemoteConfig()
    fetcher = RangeFetcher(storage_options=storage_options, config=config)
    try:
        shard_urls = expand_urls(list(urls), fetcher)
        if output is not None:
            _check_output(output, shard_urls, storage_options)
        sizes = []
        for u in shard_urls:
            got = fetcher.size(u)
            if got.error is not None:
                raise got.error
            sizes.append(int(got.value))
        parts: list[ShardIndex] = []
        with tqdm(total=sum(sizes), desc=f"indexing {len(shard_urls)} remote shard(s)", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
            for u, size in zip(shard_urls, sizes):
                local = os.path.join(tmp, "shard.tar")
                with open(local, "wb") as f:
                    blocks = [(u, lo, min(lo + config.max_request, size)) for lo in range(0, size, config.max_request)]
                    for got in fetcher.map(blocks):
                        if got.error is not None:
                            raise got.error
                        f.write(got.value)
                        bar.update(len(got.value))
                try:
                    part = index_shards([local], progress=False)
                except ShardError as e:
                    raise ShardError(str(e).replace(repr(local), repr(redact(u, storage_options)))) from None
                parts.append(part)
    finally:
        fetcher.close()
    keys = np.concatenate([p.keys for p in parts])
    hashes = np.concatenate([p.hashes for p in parts]).astype(np.uint64)
    shard_no = np.concatenate([np.full(p.num_samples, s, dtype=np.int32) for s, p in enumerate(parts)])
    uniq, counts = np.unique(keys.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = str(uniq[counts > 1][0])
        where = sorted({shard_urls[s] for s in shard_no[keys == dup]})
        raise ShardError(redact(f"duplicate key {dup!r} in the index (in {where}); keys must be unique",
                                storage_options))
    index = ShardIndex(shards=tuple(shard_urls), sizes=tuple(sizes), keys=keys, shard=shard_no,
                       offset=np.concatenate([p.offset for p in parts]),
                       length=np.concatenate([p.length for p in parts]),
                       fingerprint=fingerprint(shard_urls, sizes, int(keys.shape[0]), hashes=hashes), hashes=hashes)
    if output is not None:
        write_index_url(index, output, storage_options=storage_options, config=config)
    return index


def _check_output(output: str, shard_urls: Sequence[str], storage_options: dict[str, Any] | None) -> None:
    """An index names its shards relative to its own folder: it must be a URL in a folder holding them, on a
    store that takes uploads (checked before any shard is read)."""
    if urlsplit(output).scheme in ("http", "https"):
        raise ShardError(redact(f"`output` {output!r}: an HTTP server takes no uploads; index a local copy of the "
                                f"shards (`geko-data index DIR/*.tar -o DIR/{INDEX_NAME}`) and serve its "
                                f"{INDEX_NAME} beside the shards", storage_options))
    out = _index_url(output) if is_url(output) else None
    folder = out.rsplit("/", 1)[0] + "/" if out else None
    outside = [u for u in shard_urls if folder is None or not u.startswith(folder)]
    if outside:
        raise ShardError(redact(f"`output` {output!r}: an index names its shards relative to its own folder, so "
                                f"an index of remote shards is written next to them (a URL of a folder that holds "
                                f"them, e.g. {shard_urls[0].rsplit('/', 1)[0]}/{INDEX_NAME}); {outside[0]!r} is "
                                f"not under it", storage_options))


def write_index_url(index: ShardIndex, output: str, *, storage_options: dict[str, Any] | None = None,
                         config: RemoteConfig | None = None) -> None:
    """Write ``index`` of remote shards to ``output``, a URL in a folder that holds them (uploaded whole once
    written, so readers never see half of it)."""
    from geko_data.shards import _write_index

    output = _index_url(output)
    _check_output(output, index.shards, storage_options)
    folder = output.rsplit("/", 1)[0] + "/"
    with tempfile.TemporaryDirectory() as tmp:
        # _write_index stores names relative to the file's folder: stage the file so that they come out
        # relative to the index URL's folder.
        staged = replace(index, shards=tuple(os.path.join(tmp, "d", u[len(folder):]) for u in index.shards))
        os.makedirs(os.path.join(tmp, "d"))
        local = os.path.join(tmp, "d", INDEX_NAME)
        _write_index(staged, local)
        fetcher = RangeFetcher(storage_options=storage_options, config=config or RemoteConfig())
        fs, path = fetcher.filesystem(output)
        try:
            fs.put_file(local, path)
        except Exception as e:  # noqa: BLE001
            raise ShardError(redact(f"cannot write the index to {output!r}: {_describe(e)}", storage_options)) from None
        finally:
            del fs
            fetcher.close()

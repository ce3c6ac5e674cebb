"""Byte-range requests with retries and a bounded number in flight (``RangeFetcher``), and how they are
tuned (``RemoteConfig``).

A request never raises: it comes back as a ``Fetched`` holding the bytes, or a ShardError naming the URL,
the byte range and the last error after the retries are used up. On filesystems with an async
implementation (s3fs, gcsfs, adlfs, HTTP) requests are coroutines on fsspec's I/O thread; elsewhere they
run in a small thread pool. Either way the caller's thread only submits and collects, so a DataLoader
worker parses and yields one block of samples while the next block's ranges are on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from geko_data.shards import CHANGED_HINT, ShardError
from geko_data.urls import REDIRECTS, describe, is_transient, lower_scheme, open_url, redact
from geko_data.validate import check_int, check_number

__all__ = ["Fetched", "RangeFetcher", "RemoteConfig"]

# Every filesystem a fetcher made, kept referenced for the life of the process so that none is ever
# garbage-collected. fsspec closes a collected filesystem's session from a finalizer, and one collected in a
# forked DataLoader worker (the parent's, copied at the fork) closes the parent's sockets there (they
# share the epoll set after a fork: the parent's next request on a kept-alive connection waits forever)
# and, run by the collector on the worker's I/O thread, blocks that thread for its 0.1 s timeout on the
# parent's dead loop, again for every such filesystem. A fetcher closes its sessions itself (``close``).
_KEPT: list[Any] = []


def _close_session(fs: Any) -> None:
    """Close an async filesystem's client session now, in the process that made it (HTTP, s3fs)."""
    session = getattr(fs, "_session", None) or getattr(fs, "_s3", None)
    close = getattr(type(fs), "close_session", None)
    loop = getattr(fs, "loop", None)
    if session is not None and close is not None and loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            close(loop, session)


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """How remote shards are read. Every field is validated when the object is made.

    Args:
        concurrency: byte-range requests in flight per reader (one reader per DataLoader worker); a
            reader also keeps the ranges of at most its next block of samples fetched ahead, so this
            and ``shuffle_buffer`` bound its memory. Defaults to ``8``.
        gap: adjacent drawn samples are always fetched in one request; samples less than this many bytes
            apart are too, the bytes between them read and dropped: fewer requests for a few bytes more.
            The default reads through a tar header of a skipped non-sample member (512 bytes) but never a
            sample (1024 bytes at least). Defaults to ``1024``.
        max_request: bytes per request at most (a single sample larger than this is one request of its
            own size). Smaller requests start yielding sooner; larger ones cost fewer requests.
            Defaults to ``2 MiB``.
        retries: further tries of a request that failed transiently (connection refused or reset,
            timeout, HTTP 408/429/5xx) before a ShardError naming the URL, the byte range and the last
            error. 403, 404, other client errors and missing credentials are never retried; on S3,
            botocore's and s3fs's own retries are off unless ``config_kwargs`` sets ``retries``, so these
            are the only ones. Defaults to ``6``.
        backoff: seconds before the first retry; each retry doubles it, up to ``max_backoff``, and waits a
            random time between half of it and all of it (jitter, so workers do not retry in lockstep).
            Defaults to ``0.2``.
        max_backoff: longest wait between two tries, in seconds. Defaults to ``5.0``.
        timeout: seconds one request may take before it counts as failed (transient), for filesystems
            with an async implementation (s3fs, gcsfs, adlfs, HTTP). Defaults to ``60.0``.
        follow_redirects: which HTTP(S) redirects are followed: ``"same-origin"`` only those to the same
            scheme, host and port as the URL requested; ``"any"`` also those to another origin (a CDN),
            without the headers of ``storage_options`` (``headers``, ``client_kwargs["headers"]``),
            ``Authorization`` or cookies, and refused when ``client_kwargs`` holds an ``auth`` (aiohttp
            sends that to every host); ``"none"`` no redirect at all. A redirect not followed is a
            ShardError naming the URL and the redirect's target, not retried. Defaults to
            ``"same-origin"``: a server, or whoever can write a redirect rule on it, cannot send your
            requests and their credentials to a host you did not name.
        max_index_bytes: largest remote ``index.arrow`` read, in bytes: a larger size, as the server
            declares it, is a ShardError before anything is downloaded (a remote index is read whole into
            memory, so a server could otherwise make a reader take any amount). An index takes about 40-60
            bytes a sample, so the default holds some 70-100 million samples; raise it for a larger
            dataset. Defaults to ``4 GiB``.
    """

    concurrency: int = 8
    gap: int = 1024
    max_request: int = 2 << 20
    retries: int = 6
    backoff: float = 0.2
    max_backoff: float = 5.0
    timeout: float = 60.0
    follow_redirects: str = "same-origin"
    max_index_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        for name, lo in (("concurrency", 1), ("gap", 0), ("max_request", 512), ("retries", 0),
                         ("max_index_bytes", 1)):
            check_int(name, getattr(self, name), lo, prefix="RemoteConfig ")
        for name in ("backoff", "max_backoff", "timeout"):  # seconds
            check_number(name, getattr(self, name), 0, lo_open=True, prefix="RemoteConfig ")
        if not isinstance(self.follow_redirects, str) or self.follow_redirects not in REDIRECTS:
            raise ValueError(f"RemoteConfig `follow_redirects` must be one of {', '.join(map(repr, REDIRECTS))}, "
                             f"got {self.follow_redirects!r}")

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


@dataclass
class Fetched:
    """What became of one request: ``value`` (bytes, or a size), or ``error`` after ``attempts`` tries."""

    value: Any
    error: ShardError | None
    attempts: int


@dataclass
class RangeFetcher:
    """Byte-range GETs with retries, at most ``config.concurrency`` in flight.

    Filesystems, the pool and the counters are made on first use in the process that fetches, so a
    fetcher made in the main process works in fork and spawn DataLoader workers alike. ``take_tally()``
    returns what this process fetched (``bytes_read``, ``requests`` counting every try, ``retries``).
    """

    storage_options: dict[str, Any] | None = None
    config: RemoteConfig = field(default_factory=RemoteConfig)
    sleep: Callable[[float], None] = time.sleep
    _fs: dict[str, Any] = field(default_factory=dict, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)
    _sizes: dict[str, Any] = field(default_factory=dict, repr=False)  # url -> Future / Task of its size
    _sem: Any = field(default=None, repr=False)  # asyncio.Semaphore, made on the I/O loop
    _tally: dict[str, int] = field(default_factory=lambda: {"bytes_read": 0, "requests": 0, "retries": 0},
                                   repr=False)

    def _forked(self) -> None:
        # Threads and the filesystems' event loops do not survive a fork: a DataLoader worker starts afresh.
        if self._pid != os.getpid():
            self._fs, self._pool, self._lock, self._pid = {}, None, threading.Lock(), os.getpid()
            self._sizes, self._sem = {}, None
            self._tally = dict.fromkeys(self._tally, 0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs={}, _pool=None, _lock=None, _sizes={}, _sem=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    def filesystem(self, url: str) -> tuple[Any, str]:
        """(filesystem, path) for ``url``: one filesystem (one connection pool) per protocol."""
        self._forked()
        url = lower_scheme(url)
        key = url if "::" in url else url.split("://", 1)[0]  # chained URLs ("simplecache::s3://") apart
        with self._lock:
            if key not in self._fs:
                self._fs[key] = open_url(url, self.storage_options, follow_redirects=self.config.follow_redirects)[0]
                _KEPT.append(self._fs[key])
            fs = self._fs[key]
        return fs, (open_url(url, self.storage_options, follow_redirects=self.config.follow_redirects)[1]
                    if "::" in url else fs._strip_protocol(url))

    def take_tally(self) -> dict[str, int]:
        """What this process fetched since the last call (and zero it)."""
        self._forked()
        with self._lock:
            out, self._tally = self._tally, dict.fromkeys(self._tally, 0)
        return out

    def _count(self, got: Fetched) -> None:
        with self._lock:
            self._tally["requests"] += got.attempts
            self._tally["retries"] += got.attempts - 1
            if got.error is None and isinstance(got.value, bytes):
                self._tally["bytes_read"] += len(got.value)

    def _failed(self, url: str, what: str, exn: Exception, attempt: int) -> Fetched:
        tries = f" after {attempt + 1} tries" if attempt else ""
        why = redact(f"{url}: {what}: failed{tries}: {describe(exn)}", self.storage_options)
        return Fetched(None, ShardError(why), attempt + 1)

    def _checked(self, url: str, start: int, end: int, got: Fetched, size: Fetched | None, want: int | None
                 ) -> Fetched:
        """``got`` held to its range, and to the object size the index expects (``want``)."""
        if size is not None and size.error is not None:
            return Fetched(None, size.error, got.attempts)
        if size is not None and size.value != want:
            why = f"shard {url!r} changed since indexing: {size.value} bytes, index says {want} ({CHANGED_HINT})"
            return Fetched(None, ShardError(redact(why, self.storage_options)), got.attempts)
        if got.error is None and len(got.value) != end - start:
            # A server that ignores Range sends the whole object; a shorter answer means a smaller one.
            why = (f"{url}: bytes {start}..{end}: got {len(got.value)} bytes for a {end - start}-byte range "
                   f"(object changed since indexing, or a server that ignores Range requests)")
            return Fetched(None, ShardError(redact(why, self.storage_options)), got.attempts)
        return got

    # ------------------------------------------------------------------ async filesystems
    async def _atry(self, url: str, what: str, call: Callable[[], Any]) -> Fetched:
        """``await call()`` until it succeeds, fails for good, or the retries are used up."""
        for attempt in range(self.config.retries + 1):
            try:
                return Fetched(await asyncio.wait_for(call(), self.config.timeout), None, attempt + 1)
            except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
                if not is_transient(e) or attempt == self.config.retries:
                    return self._failed(url, what, e, attempt)
                await asyncio.sleep(self.config.delay(attempt))
        raise AssertionError("unreachable")

    async def _asize(self, fs: Any, path: str, url: str) -> Fetched:
        got = await self._atry(url, "reading its size", lambda: fs._size(path))
        self._count(got)
        return got

    async def _ajob(self, fs: Any, path: str, url: str, start: int, end: int, want: int | None,
                    then: Callable[[Fetched], None] | None) -> Fetched:
        if self._sem is None:  # made here, on the I/O loop it belongs to
            self._sem = asyncio.Semaphore(self.config.concurrency)
        size_task = None
        if want is not None:
            if url not in self._sizes:  # one size check per object, shared by all its ranges
                self._sizes[url] = asyncio.ensure_future(self._asize(fs, path, url))
            size_task = self._sizes[url]
        async with self._sem:
            got = await self._atry(url, f"bytes {start}..{end}",
                                   lambda: fs._cat_file(path, start=start, end=end))
        self._count(got)
        got = self._checked(url, start, end, got, None if size_task is None else await size_task, want)
        if then is not None:
            then(got)
        return got

    # ------------------------------------------------------------------ other filesystems
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

    def _job(self, url: str, start: int, end: int, want: int | None, then: Callable[[Fetched], None] | None
             ) -> Fetched:
        size = None
        if want is not None:
            with self._lock:
                mine = url not in self._sizes
                if mine:
                    self._sizes[url] = Future()
            if mine:
                got = self.size(url)
                self._count(got)
                self._sizes[url].set_result(got)
            size = self._sizes[url].result()
        got = self.fetch(url, start, end)
        self._count(got)
        got = self._checked(url, start, end, got, size, want)
        if then is not None:
            then(got)
        return got

    def fetch(self, url: str, start: int, end: int) -> Fetched:
        """Bytes ``start..end`` (end exclusive) of ``url``, retried per ``config``; never raises."""
        got = self._retry(url, f"bytes {start}..{end}",
                          lambda fs, path, kw: fs.cat_file(path, start=start, end=end, **kw))
        return self._checked(url, start, end, got, None, None)

    def size(self, url: str) -> Fetched:
        """The byte size of ``url``, retried per ``config``; never raises."""
        return self._retry(url, "reading its size", lambda fs, path, kw: int(fs.size(path)))

    # ------------------------------------------------------------------ both
    def submit(self, url: str, start: int, end: int, *, size: int | None = None,
               then: Callable[[Fetched], None] | None = None) -> Future[Fetched]:
        """Start fetching bytes ``start..end`` of ``url``; at most ``concurrency`` run at once.

        ``size``: the object's size as indexed; it is checked once per URL, in flight with the ranges, and
        a mismatch makes every range of the URL a ShardError ("changed since indexing"). ``then`` runs on
        the I/O thread with the result as soon as it is there (the hand-over to other workers).
        """
        fs, path = self.filesystem(url)
        if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            return asyncio.run_coroutine_threadsafe(self._ajob(fs, path, url, start, end, size, then), fs.loop)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="geko-fetch")
        return self._pool.submit(self._job, url, start, end, size, then)

    def map(self, jobs: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """``fetch`` each ``(url, start, end)``, in order, with up to ``concurrency`` requests in flight."""
        pending: deque[Future[Fetched]] = deque()
        try:
            for url, start, end in jobs:
                pending.append(self.submit(url, start, end))
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
        for fs in self._fs.values():
            _close_session(fs)
        self._fs, self._sizes = {}, {}

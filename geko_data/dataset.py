"""WebDataset shards, local or in an object store, as a map-style dataset: ``ds[i]`` is sample ``i`` of the index.

``GEKOStream`` reads a plan in file order, for a loop of one's own; the framework integrations
(``GEKOTrainer``, ``GEKOSFTTrainer``, ``GEKOCallback``) and ``GEKOSampler`` index a dataset. ``ShardDataset``
gives them the same shards: the sampler draws the ids, and a DataLoader fetches each batch with one call
(``__getitems__``) that reads only those samples, a frozen sample never, with the stream's checks (byte
ranges, keys, sizes; content hashes with ``verify=True``) and its decoders (nothing from a file runs).
Remote shards are read by byte ranges, a batch's ranges coalesced and fetched concurrently.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from geko_data.decode import DEFAULT_MAX_DECODED_BYTES, check_decoded, decoding_error, make_decoder
from geko_data.readers import BadData, ShardReader
from geko_data.remote import RangeFetcher, RangeReader, RemoteConfig, is_url
from geko_data.stream import _is_local, _open_index, _shard_urls, check_source_args
from geko_data.validate import check_int

__all__ = ["ShardDataset"]

_STATS = ("samples_read", "bytes_read", "requests", "retries")
_ROWS = 1 + 64  # the main process, then DataLoader workers by id (modulo: rows are only spread, never read apart)


class ShardDataset(Dataset):
    """The samples of a shard index as a map-style dataset, for ``GEKOSampler`` and the framework integrations.

    Args:
        source: a folder holding ``index.arrow`` (``write_shards`` / ``geko-data index``), the index path, or
            their URL (``s3://bucket/shards/``, ``gs://``, ``az://``, ``http(s)://``).
        decode: ``None`` (raw bytes), a callable ``sample -> sample``, or webdataset image specs, as
            ``GEKOStream``'s (members that would unpickle are refused). Defaults to ``None``.
        verify: check every sample read against the content hash the index recorded. Defaults to ``False``
            (sizes, keys and byte ranges are still checked).
        shard_url: maps a local shard path to the URL to read, as ``GEKOStream``'s. Defaults to ``None``.
        storage_options: options of the filesystem library for remote shards (credentials, an S3 endpoint);
            never written to a state file or checkpoint (a pickle of the dataset, which a spawned worker gets,
            carries them). Defaults to ``None``.
        remote: how remote shards are fetched (``RemoteConfig``). Defaults to ``RemoteConfig()``.
        max_decoded_bytes: with decoder specs, the most bytes a member may decode to. Defaults to 256 MiB.

    An item is a dict: ``__key__``, ``__url__`` and the sample's members (bytes, or what ``decode`` made).
    ``fingerprint`` names the data (the index's); a ``GEKOSampler`` over the dataset (the integrations' too)
    keeps it in its state without ``fingerprint=``, so a resume on other shards is refused. A bad sample
    raises ``ShardError`` naming its shard and key (a map-style dataset has no item to skip it with).
    """

    def __init__(self, source: str | os.PathLike, *, decode: Any = None, verify: bool = False,
                 shard_url: str | Callable[[str], str] | None = None,
                 storage_options: dict[str, Any] | None = None, remote: RemoteConfig | None = None,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
        check_int("max_decoded_bytes", max_decoded_bytes, 1)
        if not isinstance(verify, bool):
            raise TypeError(f"`verify` must be a bool, got {verify!r}")
        check_source_args(source, storage_options=storage_options, shard_url=shard_url, remote=remote)
        self._decoder = make_decoder(decode, max_decoded_bytes=max_decoded_bytes)
        remote = remote or RemoteConfig()
        self.index = _open_index(source, storage_options, remote)
        self.urls = _shard_urls(self.index, shard_url, storage_options)
        self.verify = verify
        self._local = [_is_local(u) for u in self.urls]
        ranged = [is_url(u) for u in self.urls]
        self._fetcher = RangeFetcher(storage_options=storage_options, config=remote) if any(ranged) else None
        self._shard_start = np.searchsorted(self.index.shard, np.arange(len(self.index.shards) + 1))
        self._reader: ShardReader | None = None
        self._pid = -1  # the process the reader belongs to (a forked worker makes its own)
        # What was read, a row per process (the main one, each DataLoader worker), in shared memory made before
        # any worker starts: fork and spawn workers add to it where this process sums it.
        self._counts = torch.zeros((_ROWS, len(_STATS)), dtype=torch.int64).share_memory_()

    def __getstate__(self) -> dict[str, Any]:
        """A spawned DataLoader worker gets the index (its file's name: mapped again) and the settings, no reader."""
        kept = self.__dict__.copy()
        kept["_reader"], kept["_pid"] = None, -1
        return kept

    def __len__(self) -> int:
        return self.index.num_samples

    @property
    def fingerprint(self) -> str:
        """The index's fingerprint of the sample keys: the name of this data in a state file."""
        return self.index.fingerprint

    @property
    def stats(self) -> dict[str, int]:
        """What was read so far, by this process and its DataLoader workers: ``samples_read``, ``bytes_read``
        and, for remote shards, ``requests`` and ``retries``."""
        return dict(zip(_STATS, self._counts.numpy().sum(axis=0).tolist()))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"a sample index must be an int, got {i!r}")
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Any) -> list[dict[str, Any]]:
        """The samples of ``indices`` in that order (a DataLoader's batch), read in one go: each distinct
        sample once, in file order, remote ranges coalesced and fetched concurrently."""
        ids = self._check_ids(indices)
        if ids.size == 0:
            return []
        reader = self._reader_here()
        distinct = np.unique(ids)  # ascending: shard order, then file order (the index's)
        try:
            read = reader.read_all(distinct)
        finally:
            info = get_worker_info()
            row = 0 if info is None else 1 + info.id % (_ROWS - 1)
            self._counts.numpy()[row] += np.asarray([reader.tally[k] for k in _STATS], dtype=np.int64)
            for k in reader.tally:
                reader.tally[k] = 0
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for i in ids.tolist():
            raw = read[i]
            url = self.urls[int(self.index.shard[i])]
            if self._decoder is not None:
                try:
                    sample = self._decoder({**raw, "__url__": url})
                except Exception as exn:  # noqa: BLE001 - decoders raise anything: name the sample
                    raise decoding_error(exn, url=url, key=str(self.index.keys[i])) from exn
                check_decoded(sample, url=url, key=str(self.index.keys[i]))
            elif i in seen:  # a repeated draw: its own dict, so what a loop does to one never reaches another
                sample = {**raw, "__url__": url}
            else:
                sample = raw
                sample["__url__"] = url
            seen.add(i)
            out.append(sample)
        return out

    def _check_ids(self, indices: Any) -> np.ndarray:
        ids = np.asarray(indices)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise TypeError(f"sample indices must be integers, got {indices!r}")
        ids = ids.astype(np.int64, copy=False)
        n = self.index.num_samples
        bad = (ids < 0) | (ids >= n)
        if bad.any():
            raise IndexError(f"sample index {int(ids[bad][0])} is out of range: the shards hold {n} samples "
                             f"(0 to {n - 1})")
        return ids

    def _reader_here(self) -> ShardReader:
        if self._reader is None or self._pid != os.getpid():
            ranges = RangeReader(self.index, self.urls, self._fetcher) if self._fetcher is not None else None
            bad = BadData(handler=None, lost=np.zeros(0, dtype=np.uint8), sample_shard=self.index.shard)
            self._reader = ShardReader(self.index, self.urls, self._local, self._shard_start, bad, self.verify,
                                       ranges)
            self._pid = os.getpid()
        return self._reader

    def close(self) -> None:
        """Close this process's open shards and remote connections (made again on the next read)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


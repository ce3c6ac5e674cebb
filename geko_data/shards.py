"""WebDataset shards and the shard index that makes read-time filtering cheap.

``write_shards`` writes tars with ``webdataset.ShardWriter`` and an
``index.arrow`` beside them; ``index_shards`` builds the same index for tars
anyone else wrote (``tar``, ``webdataset.TarWriter``, ...). The index maps
every sample's dense id to (shard, key, byte offset, byte length) of its tar
members, so a reader can seek straight to a sample and over everything it
skips. Its fingerprint (shard names, sizes, sample count) is stored in every
state file, so state is never applied to other shards.

Tar member names are only parsed into keys; they are never used as
file-system paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from geko_data.atomic import atomic_path

__all__ = ["INDEX_NAME", "ShardError", "ShardIndex", "fingerprint", "index_shards", "parse_sample",
           "read_index", "write_shards"]

INDEX_NAME = "index.arrow"
INDEX_VERSION = 1
_META_KEY = b"geko_data_index"
_BLOCK = 512
# WebDataset's conventions: the key is everything before the first dot of the base name; members named
# like __meta__ are skipped (webdataset.tariterators.tar_file_iterator does the same).
_SKIP_META = ("__",)


class ShardError(ValueError):
    """A shard that cannot be read as indexed; the message names the shard (and member)."""


def _split_key(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    base = name.rsplit("/", 1)[-1]
    if base.startswith(_SKIP_META) and base.endswith("__"):
        return None, None
    return base_plus_ext(name)


def fingerprint(names: Sequence[str], sizes: Sequence[int], num_samples: int) -> str:
    """Identity of a shard set: sha256 over shard base names, byte sizes and the sample count."""
    payload = json.dumps([[os.path.basename(n) for n in names], [int(s) for s in sizes], int(num_samples)])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ShardIndex:
    """The shard index as arrays. Build with ``read_index`` or ``index_shards``.

    Args:
        shards: shard paths (absolute, or as given for URLs), in id order.
        sizes: byte size of each shard when indexed.
        keys: (N,) object array of sample keys.
        shard: (N,) int32 shard number of each sample.
        offset: (N,) int64 byte offset of each sample's first tar header.
        length: (N,) int64 byte length of each sample's members (headers and padding included).
        fingerprint: identity of the shard set.
    """

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    keys: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    fingerprint: str

    @property
    def num_samples(self) -> int:
        return int(self.shard.shape[0])

    def __len__(self) -> int:
        return self.num_samples

    def verify(self) -> None:
        """Check that every local shard exists with its indexed size; raise ShardError naming the shard."""
        for path, size in zip(self.shards, self.sizes):
            if "://" in path or path.startswith("pipe:"):
                continue
            if not os.path.exists(path):
                raise ShardError(f"shard {path!r} is missing")
            actual = os.path.getsize(path)
            if actual != size:
                raise ShardError(f"shard {path!r} changed since indexing: {actual} bytes, index says {size}")


def _scan_tar(path: str) -> list[tuple[str, int, int]]:
    """(key, offset, length) of every sample in one tar, members grouped by consecutive key."""
    out: list[tuple[str, int, int]] = []
    current: str | None = None
    start = end = 0
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                key, _ext = _split_key(member.name)
                if key is None:
                    continue
                member_end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if key == current:
                    end = member_end
                    continue
                if current is not None:
                    out.append((current, start, end - start))
                current, start, end = key, member.offset, member_end
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {path!r}: not a readable tar ({e})") from None
    if current is not None:
        out.append((current, start, end - start))
    return out


def index_shards(paths: Iterable[str | os.PathLike], *, output: str | os.PathLike | None = None,
                 progress: bool | None = None) -> ShardIndex:
    """Index tars that follow WebDataset's conventions; write ``output`` (an Arrow file) when given.

    Samples get ids in the order of ``paths`` and, within a shard, of the file. Several files per key
    (``k.json`` + ``k.txt``), keys with directories, and tars from any writer are fine. Duplicate keys
    raise ShardError naming the key and the shards.
    """
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("`paths` must name at least one shard, got none")
    for p in paths:
        if not os.path.isfile(p):
            raise ShardError(f"shard {p!r} is missing")
    keys: list[str] = []
    shard_no: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    sizes = [os.path.getsize(p) for p in paths]
    show = progress if progress is not None else sum(sizes) > (256 << 20)
    for i, path in enumerate(tqdm(paths, desc="indexing shards", unit="shard", disable=not show)):
        for key, off, length in _scan_tar(path):
            keys.append(key)
            shard_no.append(i)
            offsets.append(off)
            lengths.append(length)
    if not keys:
        raise ShardError(f"no samples found in {len(paths)} shard(s) (first: {paths[0]!r})")
    key_arr = np.array(keys, dtype=object)
    uniq, first, counts = np.unique(key_arr.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = str(uniq[counts > 1][0])
        where = sorted({paths[shard_no[j]] for j in np.flatnonzero(key_arr == dup)})
        raise ShardError(f"duplicate key {dup!r} in the index (in {where}); keys must be unique")
    index = ShardIndex(shards=tuple(paths), sizes=tuple(sizes), keys=key_arr,
                       shard=np.array(shard_no, dtype=np.int32), offset=np.array(offsets, dtype=np.int64),
                       length=np.array(lengths, dtype=np.int64),
                       fingerprint=fingerprint(paths, sizes, len(keys)))
    if output is not None:
        _write_index(index, os.fspath(output))
    return index


def _write_index(index: ShardIndex, output: str) -> None:
    root = os.path.dirname(os.path.abspath(output))
    names = [os.path.relpath(p, root) for p in index.shards]
    meta = {"format_version": INDEX_VERSION, "shards": names, "sizes": list(index.sizes),
            "num_samples": index.num_samples, "fingerprint": index.fingerprint}
    table = pa.table({
        "id": pa.array(np.arange(index.num_samples, dtype=np.int64)),
        "key": pa.array(index.keys.tolist(), type=pa.string()),
        "shard": pa.array(index.shard),
        "offset": pa.array(index.offset),
        "length": pa.array(index.length),
    }).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    with atomic_path(output) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Read ``index.arrow`` (or a folder holding one); shard paths resolve relative to its folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard index {path!r} does not exist (write it with write_shards or "
                                f"`geko-data index`)")
    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
        raw = (reader.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ShardError(f"{path}: not a geko_data shard index")
        meta = json.loads(raw)
        table = reader.read_all()
    except ShardError:
        raise
    except (pa.ArrowException, OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not a readable shard index ({e})") from None
    if meta.get("format_version", 0) > INDEX_VERSION:
        raise ShardError(f"{path}: index format {meta.get('format_version')} is newer than this geko_data reads")
    root = os.path.dirname(os.path.abspath(path))
    shards = tuple(s if ("://" in s or s.startswith("pipe:")) else os.path.normpath(os.path.join(root, s))
                   for s in meta["shards"])
    return ShardIndex(shards=shards, sizes=tuple(int(s) for s in meta["sizes"]),
                      keys=np.array(table.column("key").to_pylist(), dtype=object),
                      shard=table.column("shard").to_numpy().astype(np.int32),
                      offset=table.column("offset").to_numpy().astype(np.int64),
                      length=table.column("length").to_numpy().astype(np.int64),
                      fingerprint=str(meta["fingerprint"]))


def _fast_members(buf: bytes) -> list[tuple[str, bytes]] | None:
    """(name, data) of the regular members in ``buf``, parsing ustar / pax / GNU headers directly.

    ``tarfile`` costs ~100 us per sample in header objects; this is the common case in a few us. Returns
    None for anything unusual (bad checksum, base-256 sizes, sparse files), and the caller falls back
    to ``tarfile``.
    """
    out: list[tuple[str, bytes]] = []
    pos, end = 0, len(buf)
    long_name: str | None = None
    view = memoryview(buf)
    while pos + _BLOCK <= end:
        header = buf[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:
            break
        chk = header[148:156].split(b"\0", 1)[0].strip()
        size_field = header[124:136]
        if not chk or size_field[:1] in (b"\x80", b"\xff"):
            return None
        try:
            if int(chk, 8) != sum(header[:148]) + 256 + sum(header[156:]):
                return None
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        kind = header[156:157]
        start = pos + _BLOCK
        data = view[start:start + size]
        if len(data) != size:
            return None  # truncated: tarfile's error message names it
        if kind == b"x":  # pax extended header: only `path` matters here
            for record in bytes(data).split(b"\n"):
                _, _, kv = record.partition(b" ")
                k, _, v = kv.partition(b"=")
                if k == b"path":
                    long_name = v.decode("utf-8", "surrogateescape")
        elif kind == b"L":  # GNU long name
            long_name = bytes(data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if prefix:
                        name = f"{prefix}/{name}"
            out.append((name, bytes(data)))
            long_name = None
        elif kind in (b"g", b"K", b"S"):
            return None
        else:  # directories, links: not sample members
            long_name = None
        pos = start + -(-size // _BLOCK) * _BLOCK
    return out


def _tarfile_members(buf: bytes) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            f = tf.extractfile(member)
            assert f is not None
            data = f.read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name!r} is truncated")
            out.append((member.name, data))
    return out


def parse_sample(buf: bytes, *, shard: str, key: str) -> dict[str, Any]:
    """The members of one sample's tar bytes as ``{"__key__": key, ext: bytes, ...}``.

    Raises ShardError naming the shard and key when the bytes are not that sample's members (truncated
    tar, or a shard changed since indexing).
    """
    sample: dict[str, Any] = {"__key__": key}
    members = _fast_members(buf)
    if members is None:
        try:
            members = _tarfile_members(buf)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"shard {shard!r}: sample {key!r} is unreadable ({e})") from None
    for name, data in members:
        mkey, ext = _split_key(name)
        if mkey is None:
            continue
        if mkey != key:
            raise ShardError(f"shard {shard!r}: member {name!r} where the index expects key {key!r} "
                             f"(shard changed since indexing?)")
        sample[ext] = data
    if len(sample) == 1:
        raise ShardError(f"shard {shard!r}: no members for key {key!r} at the indexed offset "
                         f"(shard changed since indexing?)")
    return sample


def write_shards(samples: Iterable[dict[str, Any]], pattern: str, *, maxcount: int = 10_000,
                 maxsize: float = 3e9, progress: bool = False) -> ShardIndex:
    """Write ``samples`` as WebDataset shards named ``pattern % i`` and ``index.arrow`` beside them.

    Every sample dict needs a unique string ``__key__``; other entries are ``ext: bytes | str | ...`` as
    ``webdataset.TarWriter`` takes them. Returns the index.
    """
    import webdataset as wds

    if "%" not in pattern:
        raise ValueError(f"`pattern` must contain a %-format for the shard number, got {pattern!r}")
    if isinstance(maxcount, bool) or not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"`maxcount` must be an int >= 1, got {maxcount!r}")
    if not maxsize > 0:
        raise ValueError(f"`maxsize` must be > 0, got {maxsize!r}")
    folder = os.path.dirname(os.path.abspath(pattern))
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for i, sample in enumerate(tqdm(samples, desc="writing shards", unit="sample", disable=not progress)):
            key = sample.get("__key__") if isinstance(sample, dict) else None
            if not isinstance(key, str) or not key:
                raise ValueError(f"sample {i} needs a non-empty string `__key__`, got {key!r}")
            if "." in key.rsplit("/", 1)[-1]:
                raise ValueError(f"sample {i}: `__key__` {key!r} must not contain a dot in its base name "
                                 f"(WebDataset splits keys from extensions at the first dot)")
            sink.write(sample)
            if sink.fname not in written:
                written.append(sink.fname)
    return index_shards(written, output=os.path.join(folder, INDEX_NAME))

"""WebDataset shards and the shard index that makes read-time filtering cheap.

``write_shards`` writes tars with ``webdataset.ShardWriter`` and an
``index.arrow`` beside them; ``index_shards`` builds the same index for tars
anyone else wrote (``tar``, ``webdataset.TarWriter``, ...). The index maps
every sample's dense id to (shard, key, byte offset, byte length) of its tar
members, so a reader can seek straight to a sample and over everything it
skips. Its fingerprint (shard names, sizes, sample count) is stored in every
state file, so state is never applied to other shards.

Both readers hold a sample to exactly its indexed bytes: members must cover
the sample's byte range with nothing missing (a corrupt header inside it is
an error, never the end of the sample), extensions are lowercased as
webdataset does, and two members with one extension in one sample are an
error. Tar member names are only parsed into keys; they are never used as
file-system paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from geko_data.atomic import atomic_path

__all__ = ["INDEX_NAME", "ShardError", "ShardIndex", "fingerprint", "index_shards", "iter_tar_samples",
           "parse_sample", "read_index", "write_shards"]

INDEX_NAME = "index.arrow"
INDEX_VERSION = 1
_META_KEY = b"geko_data_index"
_BLOCK = 512
# WebDataset's conventions (webdataset.tariterators): the key is everything before the first dot of the
# base name, the extension is lowercased; `__meta__` members and `__x__/` folders are skipped.
_SKIP_META = re.compile(r"__[^/]*__($|/)")
# Progress bars update at most once per this many bytes: tqdm costs ~1 us a call, members can be tiny.
_PROGRESS_STEP = 8 << 20


class ShardError(ValueError):
    """A shard that cannot be read as indexed; the message names the shard (and member)."""


def _split_key(name: str) -> tuple[str | None, str | None]:
    """(key, lowercased extension) of a member name, or (None, None) for members that are not sample data."""
    from webdataset.tariterators import base_plus_ext

    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
        return None, None
    key, ext = base_plus_ext(name)
    return (key, ext.lower()) if key is not None else (None, None)


def _put(sample: dict[str, Any], ext: str, data: bytes, *, shard: str, name: str) -> None:
    # webdataset's group_by_keys raises on this too; keeping the last copy would hide a broken writer.
    if ext in sample:
        raise ShardError(f"shard {shard!r}: sample {sample['__key__']!r} has two members with extension "
                         f"{ext!r} (second: {name!r}); extensions are compared lowercased")
    sample[ext] = data


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


def _scan_tar(path: str, advance: Callable[[int], None] | None = None) -> list[tuple[str, int, int]]:
    """(key, offset, length) of every sample in one tar, members grouped by consecutive key.

    ``advance(n)`` is called as the scan moves through the file (progress in bytes). Past the last member
    only zero padding may follow: ``tarfile`` takes a corrupt header for the end of the archive, and
    trusting it would drop every sample after it without a word.
    """
    out: list[tuple[str, int, int]] = []
    current: str | None = None
    start = end = reported = 0
    try:
        with tarfile.open(path, mode="r:") as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()  # random-access mode keeps every TarInfo; an index holds millions
                if advance is not None and member.offset - reported >= _PROGRESS_STEP:
                    advance(member.offset - reported)
                    reported = member.offset
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
            stop = tf.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {path!r}: not a readable tar ({e})") from None
    bad = _first_nonzero(path, stop)
    if bad is not None:
        raise ShardError(f"shard {path!r}: unreadable tar header at byte {stop} (non-zero data at byte {bad} "
                         f"after what tarfile took for the end of the archive: a corrupt header, or "
                         f"concatenated tars)")
    if advance is not None:
        advance(os.path.getsize(path) - reported)
    if current is not None:
        out.append((current, start, end - start))
    return out


def _first_nonzero(path: str, pos: int) -> int | None:
    """Offset of the first non-zero byte at or after ``pos``, or None (a well-formed tar's tail is zeros)."""
    with open(path, "rb") as f:
        f.seek(pos)
        while chunk := f.read(1 << 20):
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return pos + len(chunk) - len(stripped)
            pos += len(chunk)
    return None


def index_shards(paths: Iterable[str | os.PathLike], *, output: str | os.PathLike | None = None,
                 progress: bool | None = None) -> ShardIndex:
    """Index tars that follow WebDataset's conventions; write ``output`` (an Arrow file) when given.

    Samples get ids in the order of ``paths`` and, within a shard, of the file. Several files per key
    (``k.json`` + ``k.txt``), keys with directories, and tars from any writer are fine. Duplicate keys
    raise ShardError naming the key and the shards; so does a corrupt header (naming its byte offset).
    ``progress`` shows a byte-count bar; defaults to on for inputs over 256 MiB.
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
    # Progress in bytes, not shards: one big tar would otherwise sit at 0/1 until it is done.
    with tqdm(total=sum(sizes), desc=f"indexing {len(paths)} shard(s)", unit="B", unit_scale=True,
              unit_divisor=1024, disable=not show) as bar:
        for i, path in enumerate(paths):
            for key, off, length in _scan_tar(path, bar.update if show else None):
                keys.append(key)
                shard_no.append(i)
                offsets.append(off)
                lengths.append(length)
    if not keys:
        raise ShardError(f"no samples found in {len(paths)} shard(s) (first: {paths[0]!r})")
    key_arr = np.array(keys, dtype=object)
    uniq, counts = np.unique(key_arr.astype(str), return_counts=True)
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
    try:
        if not isinstance(meta, dict):
            raise TypeError(f"metadata is a JSON {type(meta).__name__}, expected an object")
        if meta.get("format_version", 0) > INDEX_VERSION:
            raise ShardError(f"{path}: index format {meta.get('format_version')} is newer than this geko_data "
                             f"reads")
        names, sizes = list(meta["shards"]), [int(x) for x in meta["sizes"]]
        if len(names) != len(sizes) or not all(isinstance(x, str) for x in names):
            raise ValueError("'shards' and 'sizes' must be lists of the same length (paths and byte sizes)")
        root = os.path.dirname(os.path.abspath(path))
        shards = tuple(x if ("://" in x or x.startswith("pipe:")) else os.path.normpath(os.path.join(root, x))
                       for x in names)
        index = ShardIndex(shards=shards, sizes=tuple(sizes),
                           keys=table.column("key").to_numpy(zero_copy_only=False).astype(object),
                           shard=table.column("shard").to_numpy().astype(np.int32),
                           offset=table.column("offset").to_numpy().astype(np.int64),
                           length=table.column("length").to_numpy().astype(np.int64),
                           fingerprint=str(meta["fingerprint"]))
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, pa.ArrowException) as e:
        raise ShardError(f"{path}: not a usable shard index ({type(e).__name__}: {e})") from None
    if index.num_samples and (index.shard.min() < 0 or index.shard.max() >= len(shards)):
        raise ShardError(f"{path}: not a usable shard index (shard numbers outside 0..{len(shards) - 1})")
    return index


def _fast_members(buf: bytes) -> tuple[list[tuple[str, bytes]], int] | None:
    """(name, data) of the regular members in ``buf`` and the byte where parsing stopped (``len(buf)``
    unless an all-zero block came first), parsing ustar / pax / GNU headers directly.

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
    return out, min(pos, end)


def _tarfile_members(buf: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """As ``_fast_members``, with ``tarfile``; raises ``tarfile.TarError`` where it cannot read."""
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
        # tarfile stops silently at a bad header past byte 0; where it stopped tells the caller.
        return out, tf.offset


def parse_sample(buf: bytes, *, shard: str, key: str, offset: int = 0) -> dict[str, Any]:
    """The members of one sample's tar bytes as ``{"__key__": key, ext: bytes, ...}``.

    ``offset`` is where ``buf`` starts in the shard (for error messages). Raises ShardError naming the
    shard, key and byte offset when the bytes are not exactly that sample's members: a truncated tar, a
    corrupt or zeroed header inside the range, another key, a duplicate extension, or a shard changed
    since indexing.
    """
    parsed = _fast_members(buf)
    if parsed is None:
        try:
            parsed = _tarfile_members(buf)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"shard {shard!r}: sample {key!r} at byte {offset} is unreadable ({e})") from None
    members, covered = parsed
    if covered != len(buf):
        raise ShardError(f"shard {shard!r}: sample {key!r}: bad or empty tar header at byte {offset + covered}, "
                         f"inside the sample's indexed bytes {offset}..{offset + len(buf)} (corrupt, or changed "
                         f"since indexing)")
    sample: dict[str, Any] = {"__key__": key}
    for name, data in members:
        mkey, ext = _split_key(name)
        if mkey is None:
            continue
        if mkey != key:
            raise ShardError(f"shard {shard!r}: member {name!r} where the index expects key {key!r} "
                             f"at byte {offset} (shard changed since indexing?)")
        assert ext is not None
        _put(sample, ext, data, shard=shard, name=name)
    if len(sample) == 1:
        raise ShardError(f"shard {shard!r}: no members for key {key!r} at the indexed byte {offset} "
                         f"(shard changed since indexing?)")
    return sample


def iter_tar_samples(fileobj: Any, *, shard: str) -> Iterator[tuple[dict[str, Any], int, int]]:
    """``(sample, start, end)`` for each sample of a tar *stream* (pipes, URLs), in file order.

    Members are grouped by consecutive key as webdataset's ``group_by_keys`` does, with the rules of
    ``parse_sample``; ``start..end`` are the sample's bytes in the tar, so the caller can hold them to the
    index (a header ``tarfile`` silently takes for the end of the archive shows up as a short sample).
    Tar errors raise ShardError naming the shard and the last key read.
    """
    current: dict[str, Any] | None = None
    start = end = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                key, ext = _split_key(member.name)
                if key is None:
                    continue
                f = tf.extractfile(member)
                assert f is not None
                data = f.read()
                tf.members = []  # stream mode keeps every TarInfo otherwise (webdataset does the same)
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} is truncated")
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current, start, end
                    current, start = {"__key__": key}, member.offset
                assert ext is not None
                _put(current, ext, data, shard=shard, name=member.name)
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f"after sample {current['__key__']!r}" if current is not None else "at its start"
        raise ShardError(f"shard {shard!r}: unreadable tar {where} ({type(e).__name__}: {e})") from None
    if current is not None:
        yield current, start, end


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

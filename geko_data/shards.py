"""WebDataset shards and the shard index that makes read-time filtering cheap.

``write_shards`` writes tars with ``webdataset.ShardWriter`` and an
``index.arrow`` beside them; ``index_shards`` builds the same index for tars
anyone else wrote (``tar``, ``webdataset.TarWriter``, ...). The index maps
every sample's dense id to (shard, key, byte offset, byte length) of its tar
members, so a reader can seek straight to a sample and over everything it
skips, and a BLAKE2b-128 hash of each sample's bytes. Its fingerprint (shard
names, sizes, sample count and a hash over the per-sample hashes) is stored
in every state file, so state is never applied to other shards or to shards
whose content changed. The hashes are cryptographic because whoever writes the
shards chooses their bytes: a non-cryptographic hash (format 2's xxh3_64) can be
collided on purpose, a sample changed with its hash kept.

An index is data, never instructions: its shard names must be relative paths
under its own folder (no absolute paths, ``..``, URL schemes, ``pipe:``
commands, NUL bytes, or symlinks that leave the folder). A command or URL
template for reading shards comes only from the caller's code
(``GEKOStream(shard_url=...)``).

Both readers hold a sample to exactly its indexed bytes: members must cover
the sample's byte range with nothing missing (a corrupt header inside it is
an error, never the end of the sample), extensions are lowercased as
webdataset does, and two members with one extension in one sample are an
error. GNU sparse members (any of GNU tar's sparse formats) are refused when
indexing and when reading: no WebDataset writer makes one, and reading one
fills its holes with zeros in memory (a 10 KiB tar held a 1 GiB member). Tar
member names are only parsed into keys; they are never used as file-system
paths. The fast header parser reads what ``tarfile`` reads or
hands the sample to ``tarfile``; the indexer takes byte ranges from
``tarfile`` itself.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import stat
import tarfile
import threading
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from geko_data.atomic import atomic_path
from geko_data.keys import Keys

__all__ = ["INDEX_NAME", "Keys", "ShardError", "ShardIndex", "fingerprint", "index_shards", "iter_tar_samples",
           "parse_sample", "parse_samples", "read_index", "sample_hash", "write_shards"]

INDEX_NAME = "index.arrow"
# 2: per-sample `hash` column (xxh3_64 of the sample's bytes), covered by the fingerprint.
# 3: `hash` is BLAKE2b with a 16-byte digest, fixed_size_binary(16): xxh3_64 is not collision resistant, so
#    whoever writes the shards could change a sample keeping its hash (4 bytes of a 1 KiB sample, in a red-team).
INDEX_VERSION = 3
#: Bytes of each per-sample content hash (BLAKE2b's digest_size).
HASH_BYTES = 16
_META_KEY = b"geko_data_index"
_BLOCK = 512
# WebDataset's conventions (webdataset.tariterators): the key is everything before the first dot of the
# base name, the extension is lowercased; `__meta__` members and `__x__/` folders are skipped.
_SKIP_META = re.compile(r"__[^/]*__($|/)")
# Progress bars update at most once per this many bytes: tqdm costs ~1 us a call, members can be tiny.
_PROGRESS_STEP = 8 << 20


class ShardError(ValueError):
    """A shard that cannot be read as indexed; the message names the shard (and member)."""


# webdataset.tariterators.base_plus_ext's pattern, compiled once (it is matched for every member read).
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _split_key(name: str) -> tuple[str | None, str | None]:
    """(key, lowercased extension) of a member name, or (None, None) for members that are not sample data."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
        return None, None
    m = _BASE_PLUS_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m is not None else (None, None)


def _put(sample: dict[str, Any], ext: str, data: bytes, *, shard: str, name: str) -> None:
    # webdataset's group_by_keys raises on this too; keeping the last copy would hide a broken writer.
    if ext in sample:
        raise ShardError(f"shard {shard!r}: sample {sample['__key__']!r} has two members with extension "
                         f"{ext!r} (second: {name!r}); extensions are compared lowercased")
    sample[ext] = data


def _hash_matrix(hashes: Any, what: str = "`hashes`") -> np.ndarray:
    """``hashes`` as the (N, HASH_BYTES) uint8 array an index holds: from such an array (not copied) or from
    the index's Arrow ``hash`` column (fixed_size_binary(16)). Anything else is a TypeError: a format-2
    uint64 array must not be taken for digests."""
    if isinstance(hashes, (pa.Array, pa.ChunkedArray)):
        if hashes.type != pa.binary(HASH_BYTES) or hashes.null_count:
            raise TypeError(f"{what} must be fixed_size_binary({HASH_BYTES}) without nulls, got {hashes.type} "
                            f"({hashes.null_count} null)")
        chunks = hashes.chunks if isinstance(hashes, pa.ChunkedArray) else [hashes]
        if len(chunks) != 1:  # one chunk (as _write_index writes) is viewed in place; others are joined
            chunks = [pa.concat_arrays(chunks)] if chunks else [pa.array([], pa.binary(HASH_BYTES))]
        arr = chunks[0]
        if not len(arr):
            return np.zeros((0, HASH_BYTES), np.uint8)
        # The data buffer of a fixed-size binary array is its values back to back (a mapped file's pages).
        return np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * HASH_BYTES,
                             offset=arr.offset * HASH_BYTES).reshape(-1, HASH_BYTES)
    if not (isinstance(hashes, np.ndarray) and hashes.dtype == np.uint8 and hashes.ndim == 2
            and hashes.shape[1] == HASH_BYTES):
        got = (f"{hashes.dtype} array of shape {hashes.shape}" if isinstance(hashes, np.ndarray)
               else type(hashes).__name__)
        raise TypeError(f"{what} must be an (N, {HASH_BYTES}) uint8 array of BLAKE2b-{HASH_BYTES * 8} digests "
                        f"(sample_hash of each sample's bytes), got {got}")
    return hashes


def fingerprint(names: Sequence[str], sizes: Sequence[int], num_samples: int, *, hashes: Any) -> str:
    """Identity of a shard set: sha256 over shard base names, byte sizes, the sample count and a BLAKE2b over
    the per-sample content hashes (so rewriting a shard with other bytes of the same size changes it).

    ``hashes``: (N, 16) uint8 BLAKE2b-128 digests (``ShardIndex.hashes``), or the index's ``hash`` column.
    """
    # Cryptographic here too: each per-sample digest can be steered in ~32 of its bits by brute force, enough
    # to collide a non-cryptographic hash of the column (xxh3's lanes trade 32-bit halves). The array's own
    # buffer (a mapped index's column) is hashed in place, in C, without the GIL.
    matrix = np.ascontiguousarray(_hash_matrix(hashes))
    content = hashlib.blake2b(memoryview(matrix).cast("B"), digest_size=HASH_BYTES).hexdigest()
    payload = json.dumps([[os.path.basename(n) for n in names], [int(s) for s in sizes], int(num_samples),
                          content])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


#: The end of a missing local shard's message: a local index of remote shards (``geko-data index URL -o
#: index.arrow``) keeps no URL, so without ``shard_url`` its shards are looked for beside it.
MISSING_HINT = ("a local index of remote shards reads them with shard_url=ShardsAt(their folder URL, index path), "
                "from geko_data.remote")
#: The end of a "changed since indexing" message: an index copied beside other shards looks the same.
CHANGED_HINT = "or the index was made for other shards: index these with `geko-data index`"


@dataclass(frozen=True)
class _IndexFile:
    """Which index file a ``ShardIndex`` maps, as a pickle names it: the file's identity when it was read
    and checked, and what the index took from it besides the arrays."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    fingerprint: str
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    num_samples: int


@dataclass(frozen=True)
class ShardIndex:
    """The shard index as arrays. Build with ``read_index`` or ``index_shards``.

    ``read_index`` memory-maps the file: keys and columns are views of its pages, shared by every process
    that maps it, and a pickled index (a spawned DataLoader worker's copy of a stream) carries the file's
    path and identity, not the arrays: unpickling maps the file again, and refuses it if it changed
    (another size, modification time, inode or fingerprint). An index built in memory pickles its arrays.

    Args:
        shards: shard paths (absolute; URLs in an index of remote shards), in id order.
        sizes: byte size of each shard when indexed.
        keys: (N,) sample keys: ``Keys`` (an Arrow string array), or a sequence of str made into one.
        shard: (N,) int32 shard number of each sample.
        offset: (N,) int64 byte offset of each sample's first tar header.
        length: (N,) int64 byte length of each sample's members (headers and padding included).
        fingerprint: identity of the shard set (``fingerprint``).
        hashes: (N, 16) uint8: BLAKE2b-128 (``sample_hash``) of each sample's ``length`` bytes at ``offset``,
            one digest a row (the index file's ``hash`` column, fixed_size_binary(16)); None only for an index
            built by hand (``GEKOStream(verify=True)`` needs it). Cryptographic, because whoever writes the
            shards chooses their bytes and could collide a non-cryptographic hash.
    """

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    keys: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    fingerprint: str
    hashes: np.ndarray | None = None
    # Set by read_index. Not an init field: `dataclasses.replace` (other shard paths, a deleted temporary
    # file's index) makes an index that pickles by value.
    _file: _IndexFile | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.keys, Keys):
            object.__setattr__(self, "keys", Keys.of(self.keys))
        n = self.num_samples
        if self.hashes is not None:  # checked here, not at the first verify: format 2's uint64 has one a sample too
            try:
                object.__setattr__(self, "hashes", _hash_matrix(self.hashes))
            except TypeError as e:
                raise ValueError(str(e)) from None
        for name in ("keys", "offset", "length", "hashes"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"`{name}` has {len(value)} entries but `shard` has {n}: one per sample")

    def __reduce__(self) -> tuple[Any, ...]:
        if self._file is not None:
            return _open_mapped, (self._file,)
        return _by_value, (self.shards, self.sizes, self.keys, self.shard, self.offset, self.length,
                           self.fingerprint, self.hashes)

    @property
    def num_samples(self) -> int:
        return int(self.shard.shape[0])

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        # The generated repr printed every array: hundreds of lines for one look at an index in a REPL.
        where = f", first {self.shards[0]!r}" if self.shards else ""
        return (f"ShardIndex({len(self.shards)} shards{where}, {self.num_samples:,} samples, "
                f"fingerprint={self.fingerprint!r})")

    def verify(self) -> None:
        """Check that every local shard exists with its indexed size; raise ShardError naming the shard.
        (Remote shards, in an index built by ``geko_data.remote``, are checked when they are read.)"""
        for path, size in zip(self.shards, self.sizes):
            if "://" in path:
                continue
            if not os.path.exists(path):
                raise ShardError(f"shard {path!r} is missing ({MISSING_HINT})")
            actual = os.path.getsize(path)
            if actual != size:
                raise ShardError(f"shard {path!r} changed since indexing: {actual} bytes, index says {size} "
                                 f"({CHANGED_HINT})")


# tarfile reads these and then stops at anything it cannot parse; every other exception it raises on a
# hostile header (a pax size of 10**20 overflows a seek, ...) is as much a bad shard as a TarError.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, MemoryError)


#: Leading bytes of compressed files, with the command that decompresses each.
#: (A tar begins with a member name, so each signature is long enough not to be mistaken for one.)
_COMPRESSED = ((b"\x1f\x8b\x08", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))


def _refuse_compressed(path: str) -> None:
    """A compressed tar cannot be read by seeking to a sample's bytes, which an index is for: say what to do."""
    with open(path, "rb") as f:
        head = f.read(10)
    for magic, kind, command in _COMPRESSED:
        # bzip2: "BZh", the block size digit, then the first block's signature (0x314159265359).
        if head.startswith(magic) and (kind != "bzip2" or head[3:4].isdigit() and head[4:10] == b"1AY&SY"):
            raise ShardError(f"shard {path!r} is a {kind}-compressed tar; shards are read by seeking to each "
                             f"sample's bytes, which a compressed file cannot do: decompress it first "
                             f"(`{command} {os.path.basename(path)}`) and index the .tar")


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What a link or special member is ("symlink", "hard link", ...); None for files and folders, which a
    tar of a folder holds as a matter of course."""
    for test, kind in ((member.issym, "symlink"), (member.islnk, "hard link"), (member.isfifo, "FIFO"),
                       (member.ischr, "character device"), (member.isblk, "block device")):
        if test():
            return kind
    return None


def _refuse_sparse(member: tarfile.TarInfo, *, shard: str, offset: int) -> None:
    """ShardError naming the shard, the member and its header's byte ``offset`` if ``member`` is a GNU sparse
    file (old GNU type 'S', or pax GNU.sparse 0.0 / 0.1 / 1.0). Checked before its data is read: tarfile
    reads a sparse member as its full size with the holes filled in, so a 10 KiB tar can hold a 1 GiB read
    (and every read path reads the whole member into memory). WebDataset writers never write one."""
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        raise ShardError(f"shard {shard!r}: member {member.name!r} at byte {offset} is a GNU sparse file "
                         f"({member.size:,} bytes once its holes are filled in); sparse members are refused, "
                         f"never expanded: rewrite the shard without --sparse (WebDataset writers never make them)")


def _scan_tar(path: str, advance: Callable[[int], None] | None = None,
              skipped: list[tuple[str, str, str]] | None = None) -> list[tuple[str, int, int]]:
    """(key, offset, length) of every sample in one tar, members grouped by consecutive key.

    The byte ranges are tarfile's own: a member starts at its first header (pax or GNU long-name headers
    included) and ends where tarfile reads the next header, so the readers, which hand anything their fast
    parser is unsure of to tarfile, cover exactly these bytes. ``advance(n)`` is called as the scan moves
    through the file (progress in bytes). Past the last member only zero padding may follow: ``tarfile``
    takes a corrupt header for the end of the archive, and trusting it would drop every sample after it
    without a word.
    """
    out: list[tuple[str, int, int]] = []
    current: str | None = None
    start = end = reported = 0
    at = 0  # header of the last member read, for error messages
    try:
        _refuse_compressed(path)  # inside the try: an unreadable file is worded like any other bad tar
        with tarfile.open(path, mode="r:") as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()  # random-access mode keeps every TarInfo; an index holds millions
                at = member.offset
                # Any sparse member, sample data or not: every reader refuses it too.
                _refuse_sparse(member, shard=path, offset=member.offset)
                if advance is not None and member.offset - reported >= _PROGRESS_STEP:
                    advance(member.offset - reported)
                    reported = member.offset
                if not member.isreg():
                    kind = _member_kind(member)
                    if kind is not None and skipped is not None:  # never read (nor followed): say so
                        skipped.append((path, member.name, kind))
                    continue
                key, _ext = _split_key(member.name)
                if key is None:
                    continue
                try:
                    member.name.encode("utf-8")
                except UnicodeEncodeError:
                    raise ShardError(f"shard {path!r}: member name {member.name!r} at byte {member.offset} is not "
                                     f"UTF-8 (keys are stored as UTF-8 text)") from None
                # tf.offset is where tarfile reads the next header, past any extended headers' data.
                member_end = tf.offset
                if key == current:
                    end = member_end
                    continue
                if current is not None:
                    out.append((current, start, end - start))
                current, start, end = key, member.offset, member_end
            stop = tf.offset
    except ShardError:
        raise
    except _TAR_ERRORS as e:
        raise ShardError(f"shard {path!r}: not a readable tar at or after the member at byte {at} "
                         f"({type(e).__name__}: {e})") from None
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


def _hash_samples(path: str, ranges: Sequence[tuple[str, int, int]]) -> bytes:
    """BLAKE2b-128 of each ``(key, offset, length)`` byte range of ``path`` (read in file order), the digests
    back to back (``HASH_BYTES`` each)."""
    out = bytearray()
    with open(path, "rb") as f:
        for _key, offset, length in ranges:
            f.seek(offset)
            out += _hash_range(f, length)
    return bytes(out)


def _hash_range(f: Any, length: int) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    left = length
    while left > 0:  # in pieces: one sample may be larger than memory allows twice
        chunk = f.read(min(left, 16 << 20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.digest()


def sample_hash(buf: bytes | bytearray | memoryview) -> bytes:
    """The content hash the index keeps for a sample: BLAKE2b with a 16-byte digest of its tar bytes.

    Cryptographic on purpose: whoever writes the shards chooses their bytes, and a non-cryptographic hash
    (xxh3_64, index format 2) can be collided, a sample changed with its hash kept. hashlib hashes in C and
    releases the GIL on large buffers.
    """
    return hashlib.blake2b(buf, digest_size=HASH_BYTES).digest()


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

    Samples get ids in the order of ``paths`` and, within a shard, of the file; each gets the BLAKE2b-128 of
    its bytes (``sample_hash``). Several files per key (``k.json`` + ``k.txt``), keys with directories, and
    tars from any writer are fine. Duplicate keys raise ShardError naming the key and the shards; so does a
    corrupt header (naming its byte offset). With ``output``, every shard must lie under the output's folder: the index
    stores names relative to it. ``progress`` shows a byte-count bar; defaults to on for inputs over 256 MiB.
    A GNU sparse member is a ShardError naming the shard, the member and its byte offset.
    """
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("`paths` must name at least one shard, got none")
    for p in paths:
        if not os.path.isfile(p):
            raise ShardError(f"shard {p!r} is missing")
    if output is not None:
        root = os.path.dirname(os.path.abspath(os.fspath(output)))
        for p in paths:  # fail before the scan, not after minutes of it
            _check_shard_name(os.path.relpath(p, root), root=root, where=f"`output` {os.fspath(output)!r}",
                              hint="an index stores shard names relative to its folder: write it in a folder "
                                   "that holds the shards")
    keys: list[str] = []
    shard_no: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    hashes = bytearray()  # HASH_BYTES a sample, back to back
    sizes = [os.path.getsize(p) for p in paths]
    show = progress if progress is not None else sum(sizes) > (256 << 20)
    # Progress in bytes, not shards: one big tar would otherwise sit at 0/1 until it is done.
    with tqdm(total=sum(sizes), desc=f"indexing {len(paths)} shard(s)", unit="B", unit_scale=True,
              unit_divisor=1024, disable=not show) as bar:
        skipped: list[tuple[str, str, str]] = []
        for i, path in enumerate(paths):
            ranges = _scan_tar(path, bar.update if show else None, skipped)
            hashes += _hash_samples(path, ranges)
            for key, off, length in ranges:
                keys.append(key)
                shard_no.append(i)
                offsets.append(off)
                lengths.append(length)
    if skipped:  # webdataset skips them too; a sample made only of them is not in the index
        some = ", ".join(f"{name!r} ({kind}) in {os.path.basename(path)!r}" for path, name, kind in skipped[:3])
        warnings.warn(f"index_shards skipped {len(skipped)} tar member(s) that are links or special files, not "
                      f"regular files: {some}{', ...' if len(skipped) > 3 else ''}. They are never read nor "
                      f"followed; a sample made only of them is not in the index", stacklevel=2)
    if not keys:
        raise ShardError(f"no samples found in {len(paths)} shard(s) (first: {paths[0]!r})")
    key_arr = Keys.of(keys)
    del keys  # the Arrow copy is what the index keeps: ~70 B a key less
    dup = key_arr.first_duplicate()
    if dup is not None:
        where = sorted({paths[shard_no[j]] for j in key_arr.where(dup)})
        hint = ""
        if len(where) == 1:  # twice in one tar: most often a sample's members are not next to each other
            hint = (f"; the members of a sample must be adjacent in the tar (`tar -cf x.tar dir/` adds files in "
                    f"directory order, which can split them): write it with `tar --sort=name -cf x.tar dir/`")
        raise ShardError(f"duplicate key {dup!r} in the index (in {where}); keys must be unique{hint}")
    hash_arr = np.frombuffer(bytes(hashes), np.uint8).reshape(-1, HASH_BYTES)
    index = ShardIndex(shards=tuple(paths), sizes=tuple(sizes), keys=key_arr,
                       shard=np.array(shard_no, dtype=np.int32), offset=np.array(offsets, dtype=np.int64),
                       length=np.array(lengths, dtype=np.int64),
                       fingerprint=fingerprint(paths, sizes, len(key_arr), hashes=hash_arr), hashes=hash_arr)
    if output is not None:
        _write_index(index, os.fspath(output))
    return index


def _hash_column(hashes: np.ndarray) -> pa.Array:
    """The index file's ``hash`` column: (N, 16) uint8 digests as fixed_size_binary(16), without a copy.

    One 16-byte value a sample rather than two uint64 columns: a digest is a string of bytes (no byte order
    to agree on, shown as one value by pyarrow, pandas and DuckDB), and the (N, 16) uint8 view of its one
    data buffer serves the NumPy code as the uint64 column did."""
    matrix = np.ascontiguousarray(_hash_matrix(hashes))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(HASH_BYTES), len(matrix), [None, pa.py_buffer(matrix)])


def _write_index(index: ShardIndex, output: str) -> None:
    if index.hashes is None:
        raise ValueError("an index without per-sample hashes cannot be written (build it with index_shards)")
    root = os.path.dirname(os.path.abspath(output))
    names = [os.path.relpath(p, root) for p in index.shards]
    for name in names:
        _check_shard_name(name, root=root, where=f"`output` {output!r}",
                          hint="an index stores shard names relative to its folder")
    meta = {"format_version": INDEX_VERSION, "shards": names, "sizes": list(index.sizes),
            "num_samples": index.num_samples, "fingerprint": index.fingerprint}
    table = pa.table({
        "id": pa.array(np.arange(index.num_samples, dtype=np.int64)),
        "key": index.keys.arrow,
        "shard": pa.array(index.shard),
        "offset": pa.array(index.offset),
        "length": pa.array(index.length),
        "hash": _hash_column(index.hashes),
    }).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    if os.path.islink(output):
        warnings.warn(f"`output` {output!r} was a symbolic link (to {os.readlink(output)!r}); the index replaces "
                      f"the link, not the file it names: an index is written into the shards' folder, where "
                      f"whoever wrote the shards could have planted the link", stacklevel=3)
    with atomic_path(output, through_links=False) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


# "pipe:", "http:", "file:", "s3:", "C:" ...: anything webdataset's gopen or Windows would not take as a
# plain relative path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _check_shard_name(name: Any, *, root: str, where: str, hint: str) -> str:
    """The path of shard ``name`` under ``root``; ShardError naming ``where`` and the name unless it is a
    relative path that stays inside ``root`` (symlinks resolved)."""
    why = None
    if not isinstance(name, str) or not name:
        why = "is not a non-empty string"
    elif "\0" in name:
        why = "contains a NUL byte"
    elif _SCHEME.match(name):
        why = "has a URL scheme or command prefix"
    elif os.path.isabs(name) or name.startswith(("/", "\\")):
        why = "is an absolute path"
    elif ".." in re.split(r"[\\/]", name):
        why = "has a '..' component"
    else:
        path = os.path.normpath(os.path.join(root, name))
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            why = f"resolves to {real!r}, outside the folder (a symlink)"
        else:
            return path
    raise ShardError(f"{where}: shard name {name!r} {why}; shard names must be relative paths under "
                     f"{root!r} ({hint})")


def _column(table: pa.Table, name: str, kind: str, dtype: Any = None) -> Any:
    """A column, refusing nulls and other types (a hand-edited index must not half-work): the Arrow array of
    a ``"str"`` column, the (N, 16) uint8 view of a ``"hash"`` column (fixed_size_binary(16)), else a NumPy
    view of the column as ``dtype`` (a copy only when the file holds another integer type, whose values must
    then fit ``dtype``)."""
    col = table.column(name)
    if kind == "hash":  # (N, 16) uint8, a view of the file's pages
        return _hash_matrix(col, what=f"column {name!r}")
    ok = {"int": pa.types.is_integer, "str": pa.types.is_string}[kind]
    if not ok(col.type) or col.null_count:
        raise TypeError(f"column {name!r} must be {kind} without nulls, got {col.type} ({col.null_count} null)")
    if kind == "str":
        return col
    # One chunk (as _write_index writes): a zero-copy view of the mapped file's pages.
    values = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy(zero_copy_only=False)
    if values.dtype != dtype:
        info = np.iinfo(dtype)
        if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
            raise TypeError(f"column {name!r} holds values outside {np.dtype(dtype)}")
        values = values.astype(dtype)
    return values


def _map_table(path: str) -> tuple[pa.Table, dict[str, Any]]:
    """The index file's table, memory-mapped (zero-copy), and its metadata; ShardError if it is not one."""
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
    except RecursionError:  # metadata JSON nested deeper than Python's stack
        raise ShardError(f"{path}: not a readable shard index (its metadata is nested too deep)") from None
    return table, meta


def _from_table(table: pa.Table, *, shards: tuple[str, ...], sizes: tuple[int, ...], fingerprint: str) -> ShardIndex:
    return ShardIndex(shards=shards, sizes=sizes, keys=Keys(_column(table, "key", "str")),
                      shard=_column(table, "shard", "int", np.int32), offset=_column(table, "offset", "int", np.int64),
                      length=_column(table, "length", "int", np.int64), fingerprint=fingerprint,
                      hashes=_column(table, "hash", "hash"))


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_index(path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> ShardIndex:
    """Read ``index.arrow`` (or a folder holding one); shard paths resolve relative to its folder.

    ``path`` may be a URL of a remote store (``s3://``, ``https://``, ...; ``storage_options`` go to its
    filesystem): the index is fetched and its shard names resolve to URLs in the index's folder.

    A local file is memory-mapped, not copied: keys and columns are views of its pages (see ``ShardIndex``
    for what that means for pickling). Replace an index file by writing a new one and renaming it over
    the old (as ``geko-data index`` does), never by rewriting it in place while it is open.

    Everything in the file is checked before use: shard names (relative paths inside the index's folder,
    see the module docstring), byte ranges (inside their shard, in file order, not overlapping), unique
    keys, and the fingerprint against the content hashes. An index written before content hashes existed
    (format 1), or with xxh3_64 ones (format 2, not collision resistant), is refused: re-run
    ``geko-data index``.
    """
    path = os.fspath(path)
    from geko_data.remote import is_url, read_index_url  # remote.py builds on this module

    if is_url(path):
        return read_index_url(path, storage_options=storage_options)
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard index {path!r} does not exist (write it with write_shards or "
                                f"`geko-data index`)")
    before = _identity(path)
    if not stat.S_ISREG(os.stat(path).st_mode):  # mapping a FIFO or a device would wait or read forever
        raise ShardError(f"shard index {path!r} is not a regular file")
    table, meta = _map_table(path)
    root = os.path.dirname(os.path.abspath(path))
    try:
        if not isinstance(meta, dict):
            raise TypeError(f"metadata is a JSON {type(meta).__name__}, expected an object")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or version > INDEX_VERSION:
            raise ShardError(f"{path}: index format {version!r} is newer than this geko_data reads")
        if version < 2 or "hash" not in table.column_names:
            raise ShardError(f"{path}: index format {version} has no per-sample content hashes, so changed "
                             f"shards could go unnoticed; re-run `geko-data index <shards> -o {path}`")
        if version < INDEX_VERSION:
            raise ShardError(f"{path}: index format {version} keeps xxh3_64 per-sample content hashes, which are "
                             f"not collision resistant (whoever writes the shards can change a sample and keep "
                             f"its hash), so changed shards could go unnoticed; re-run "
                             f"`geko-data index <shards> -o {path}` (format {INDEX_VERSION}: BLAKE2b-128)")
        names, sizes = list(meta["shards"]), [int(x) for x in meta["sizes"]]
        if len(names) != len(sizes) or min(sizes, default=0) < 0 or max(sizes, default=0) >= 1 << 62:
            raise ValueError("'shards' and 'sizes' must be lists of the same length (paths, and byte sizes "
                             "from 0 to 2**62)")
        shards = tuple(_check_shard_name(x, root=root, where=path, hint="`pipe:` commands and URLs come only "
                                         "from GEKOStream(shard_url=...)") for x in names)
        index = _from_table(table, shards=shards, sizes=tuple(sizes), fingerprint=str(meta["fingerprint"]))
    except ShardError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, pa.ArrowException) as e:
        raise ShardError(f"{path}: not a usable shard index ({type(e).__name__}: {e})") from None
    _check_rows(index, path)
    if _identity(path) != before:
        raise ShardError(f"{path}: the shard index changed while it was read; read it again")
    dev, ino, size, mtime_ns = before
    object.__setattr__(index, "_file", _IndexFile(
        path=os.path.abspath(path), device=dev, inode=ino, size=size, mtime_ns=mtime_ns,
        fingerprint=index.fingerprint, shards=index.shards, sizes=index.sizes, num_samples=index.num_samples))
    return index


# Indexes mapped by unpickling in this process, by file: a worker that unpickles several objects holding
# one index maps it once.
_MAPPED: weakref.WeakValueDictionary[_IndexFile, ShardIndex] = weakref.WeakValueDictionary()


def _open_mapped(file: _IndexFile) -> ShardIndex:
    """Unpickle an index read from a file: map the file again, if it is still the file that was read.

    The rows were checked when the index was first read; the same file (device, inode, size, modification
    time, and the fingerprint in it) is not checked again, so a DataLoader worker starts in milliseconds
    and shares the file's pages instead of holding its own copy.
    """
    try:
        now = _identity(file.path)
    except OSError as e:
        raise ShardError(f"{file.path}: the shard index this object was pickled from cannot be opened again "
                         f"({e.strerror or e}); it must stay in place while the stream is used") from None
    was = (file.device, file.inode, file.size, file.mtime_ns)
    if now != was:
        raise ShardError(f"{file.path}: the shard index changed since it was read (device, inode, bytes, "
                         f"mtime_ns {now} != {was}); it must not change while the stream is used: create the "
                         f"stream again")
    index = _MAPPED.get(file)
    if index is not None:
        return index
    table, meta = _map_table(file.path)
    got = meta.get("fingerprint") if isinstance(meta, dict) else None
    if got != file.fingerprint or table.num_rows != file.num_samples:
        raise ShardError(f"{file.path}: the shard index changed since it was read (fingerprint {got!r}, "
                         f"{table.num_rows} rows; expected {file.fingerprint!r}, {file.num_samples})")
    try:
        index = _from_table(table, shards=file.shards, sizes=file.sizes, fingerprint=file.fingerprint)
    except (TypeError, ValueError) as e:
        raise ShardError(f"{file.path}: not a usable shard index ({type(e).__name__}: {e})") from None
    object.__setattr__(index, "_file", file)
    _MAPPED[file] = index
    return index


def _by_value(shards: tuple[str, ...], sizes: tuple[int, ...], keys: Keys, shard: np.ndarray, offset: np.ndarray,
              length: np.ndarray, fingerprint: str, hashes: np.ndarray | None) -> ShardIndex:
    """Unpickle an index built in memory (its arrays were pickled)."""
    return ShardIndex(shards=shards, sizes=sizes, keys=keys, shard=shard, offset=offset, length=length,
                      fingerprint=fingerprint, hashes=hashes)


# Rows checked per step: each step's temporaries (a few MB) stay in cache across its several passes, whatever
# the index's size (whole-column temporaries of a 100M-sample index were GBs). At 20M rows, steps of 256K
# took 0.20 s of CPU for all the row checks, steps of 4M 0.28 s.
_CHECK_STEP = 1 << 18


def _check_rows(index: ShardIndex, path: str) -> None:
    """Refuse byte ranges a reader must not follow and rows that contradict each other or the fingerprint."""
    n, shard, offset, length = index.num_samples, index.shard, index.offset, index.length
    if not n:
        return
    sizes = np.asarray(index.sizes, dtype=np.int64)
    for a in range(0, n, _CHECK_STEP):
        b = min(n, a + _CHECK_STEP)
        s = shard[a:b]
        if s.min() < 0 or s.max() >= len(index.shards):
            raise ShardError(f"{path}: not a usable shard index (shard numbers outside 0..{len(index.shards) - 1})")
        off, ln = offset[a:b], length[a:b]
        # `ln > size - off`, not `off + ln > size`: the sum of two hostile int64 values can wrap around.
        bad = np.flatnonzero((off < 0) | (ln < _BLOCK) | (off & (_BLOCK - 1) != 0) | (ln > sizes[s] - off))
        if bad.size:
            j = a + int(bad[0])
            raise ShardError(f"{path}: row {j} (key {index.keys[j]!r}) has byte range offset={int(offset[j])} "
                             f"length={int(length[j])}, outside shard {index.shards[int(shard[j])]!r} of "
                             f"{index.sizes[int(shard[j])]} bytes (offsets are >= 0 and 512-aligned, lengths >= 512)")
        # Each step also compares its first row with the previous step's last.
        w = slice(max(a - 1, 0), b)
        s, off = shard[w], offset[w]
        if (s[1:] < s[:-1]).any():
            raise ShardError(f"{path}: rows must be grouped by shard, in shard order")
        clash = np.flatnonzero((s[1:] == s[:-1]) & (off[1:] - off[:-1] < length[w][:-1]))
        if clash.size:
            j = w.start + int(clash[0])
            raise ShardError(f"{path}: rows {j} and {j + 1} (keys {index.keys[j]!r}, {index.keys[j + 1]!r}) "
                             f"overlap or are out of file order in shard {index.shards[int(shard[j])]!r} "
                             f"(bytes {int(offset[j])}..{int(offset[j]) + int(length[j])} and {int(offset[j + 1])}..)")
    dup = index.keys.first_duplicate()
    if dup is not None:
        raise ShardError(f"{path}: duplicate key {dup!r}; keys must be unique")
    assert index.hashes is not None
    expect = fingerprint(index.shards, index.sizes, n, hashes=index.hashes)
    if expect != index.fingerprint:
        raise ShardError(f"{path}: fingerprint {index.fingerprint!r} does not match the index's own rows "
                         f"({expect!r}): edited by hand? re-run `geko-data index`")


# tarfile.REGULAR_TYPES without GNU sparse; the other built-in types whose data tarfile does not skip.
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
# Global pax, Solaris pax, GNU long link, GNU sparse: rare, and tarfile's rules for them are its own.
_TARFILE_ONLY = (b"g", b"X", b"K", b"S")
# Numeric header fields other than size and checksum (mode, uid, gid, mtime, devmajor, devminor): tarfile
# refuses a header where any of them is not octal, so the fast parser must too.
_NUMERIC = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))


def _plain_octal(n: int) -> bytes:
    """Regex for an n-byte field of k octal digits then a NUL (anything after it), a space and a NUL, only
    spaces, or nothing: what writers put there, all valid for tarfile's ``nti``. Each alternative is
    exactly n bytes, so fields cannot run into each other."""
    alts = []
    for k in range(n - 1, -1, -1):
        alts.append(b"[0-7]{%d}\\0.{%d}" % (k, n - k - 1))
        if n - k >= 2:
            alts.append(b"[0-7]{%d} \\0.{%d}" % (k, n - k - 2))
        alts.append(b"[0-7]{%d} {%d}" % (k, n - k))
    alts.append(b"[0-7]{%d}" % n)
    return b"(?:" + b"|".join(alts) + b")"


# One match checks every number field (one regex call instead of eight conversions, the bulk of the
# parser's time otherwise): first the layout tarfile and GNU tar write (then size and checksum are plain
# octal at fixed places), then any plain layout of the six others; a header that matches neither gets
# tarfile's exact conversion.
_TYPICAL_HEADER = re.compile(rb".{100}[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0[0-7]{11}\0[0-7]{11}\0[0-7]{6}\0 .{173}"
                             rb"(?:[0-7]{7}\0|\0{8})(?:[0-7]{7}\0|\0{8})", re.DOTALL)
_PLAIN_FIELDS = re.compile(b".{100}" + _plain_octal(8) * 3 + b".{12}" + _plain_octal(12) + b".{181}"
                           + _plain_octal(8) * 2, re.DOTALL)
_LOW_BIT = bytes(i & 1 for i in range(256))
_ADLER_MOD = 65521


def _checksum_ok(header: bytes, chksum: int) -> bool:
    """Whether ``chksum`` is the unsigned header checksum (the byte sum, the checksum field counted as
    spaces), as ``sum(header[:148]) + 256 + sum(header[156:]) == chksum`` but ~3x cheaper.

    The byte sum S of 512 bytes is at most 130,560. adler32's low half is (1 + S) mod 65521, which leaves
    S or S +- 65521; 65521 is odd, so S's parity (the count of odd bytes) tells those apart. Both are
    computed in C.
    """
    raw = chksum - 256 + sum(header[148:156])  # the expected sum of the bytes as they are
    return (0 <= raw <= 255 * _BLOCK and zlib.adler32(header) & 0xFFFF == (1 + raw) % _ADLER_MOD
            and header.translate(_LOW_BIT).count(1) % 2 == raw % 2)


def _nts(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _nti(field: bytes) -> int:
    """tarfile's ``nti`` for an octal field (ValueError where tarfile finds the header invalid)."""
    return int(_nts(field).decode("ascii").strip() or "0", 8)


def _pax_records(block: bytes) -> dict[str, str] | None:
    """The ``path`` and ``size`` records of a pax extended header (its data blocks, padding included), split
    by their length prefixes; None where tarfile might read the header otherwise (then tarfile decides)."""
    if b"hdrcharset=" in block:  # tarfile searches the whole block for it, even inside other values
        return None
    out: dict[str, str] = {}
    # Common case first: one record per line, each line's length prefix saying exactly that. Then the
    # lines are the records, and everything after the last one is zero padding.
    content = block.rstrip(b"\0")
    if content.endswith(b"\n"):
        for line in content[:-1].split(b"\n"):
            digits, _, record = line.partition(b" ")
            if not (digits.isdigit() and len(digits) <= 20 and int(digits) == len(line) + 1
                    and _pax_put(out, record)):
                break
        else:
            return out
        out.clear()
    pos, end = 0, len(block)
    while pos < end and block[pos] != 0:
        space = block.find(b" ", pos, pos + 21)
        digits = block[pos:space] if space > pos else b""
        if not digits.isdigit():  # ASCII digits only
            return None
        stop = pos + int(digits)
        if stop > end or block[stop - 1] != 0x0A or not _pax_put(out, block[space + 1:stop - 1]):
            return None
        pos = stop
    if block.count(0, pos) != end - pos:  # tarfile would go on parsing whatever is not zero padding
        return None
    return out


def _pax_put(out: dict[str, str], record: bytes) -> bool:
    """Keep ``path`` and ``size`` of one ``key=value`` record (length prefix and newline removed), the only
    keys that change what tarfile reads here; False for records tarfile must judge."""
    key, eq, value = record.partition(b"=")
    if key == b"path" or key == b"size":
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
    elif not eq or not key or key.startswith(b"GNU.sparse"):
        return False
    return True


def _fast_members(buf: bytes) -> tuple[list[tuple[str, bytes]], int] | None:
    """(name, data) of the regular members in ``buf`` and the byte where parsing stopped (``len(buf)``
    unless an all-zero block came first), parsing ustar / pax / GNU / v7 headers directly.

    ``tarfile`` costs ~100 us per sample in header objects; this is the common case in a few us. It reads
    exactly what ``tarfile`` reads (names, prefixes, pax ``path`` and ``size``, what counts as a regular
    member and how much data follows each header) and returns None for anything it is not sure of (bad or
    signed checksums, base-256 sizes, sparse files, chained or global extended headers, malformed pax
    records, a truncated end): the caller then asks ``tarfile``.
    """
    out: list[tuple[str, bytes]] = []
    pos, end = 0, len(buf)
    ext_name: str | None = None  # from a pax or GNU long-name header, for the member that follows
    ext_size: int | None = None
    extended = False
    while pos + _BLOCK <= end:
        header = buf[pos:pos + _BLOCK]
        if _TYPICAL_HEADER.match(header) is not None:  # every number field as tarfile and GNU tar write it
            chksum, size = int(header[148:154], 8), int(header[124:135], 8)
        else:
            if header[124] in (0x80, 0xFF):
                return None
            try:
                chksum, size = _nti(header[148:156]), _nti(header[124:136])
                if _PLAIN_FIELDS.match(header) is None:
                    for lo, hi in _NUMERIC:
                        if header[lo] not in (0x80, 0xFF):
                            _nti(header[lo:hi])
            except ValueError:
                return None
        if not _checksum_ok(header, chksum):
            if header.count(0) == _BLOCK:  # (its checksum field reads 0) the end of the archive
                break
            return None
        kind = header[156:157]
        start = pos + _BLOCK
        if kind in (b"x", b"L"):
            stop = start + -(-size // _BLOCK) * _BLOCK
            if extended or size < 0 or stop > end:
                return None
            block = buf[start:stop]
            if kind == b"x":
                records = _pax_records(block)
                if records is None:
                    return None
                if "path" in records:
                    ext_name = records["path"].rstrip("/")
                if "size" in records:
                    try:
                        ext_size = int(records["size"])
                    except ValueError:
                        ext_size = 0  # as tarfile does
            else:
                ext_name = _nts(block).decode("utf-8", "surrogateescape")
            extended, pos = True, stop
            continue
        if kind in _TARFILE_ONLY:
            return None
        name = _nts(header[0:100]).decode("utf-8", "surrogateescape")
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # v7 directory
        if ext_size is not None:
            size = ext_size
        if kind in _NO_DATA:
            if size != 0:
                return None
            pos = start
        else:
            stop = start + -(-size // _BLOCK) * _BLOCK
            if size < 0 or stop > end:
                return None
            if kind in _REGULAR:
                if ext_name is not None:
                    name = ext_name
                else:
                    prefix = _nts(header[345:500])
                    if prefix:  # tarfile joins it whatever the magic says (v7 headers included)
                        name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
                out.append((name, buf[start:start + size]))
            pos = stop  # unknown types: tarfile skips their data and does not list them
        ext_name, ext_size, extended = None, None, False
    if extended:
        return None
    return out, pos


def _tarfile_members(buf: bytes, *, shard: str = "<buffer>",
                     offset: int = 0) -> tuple[list[tuple[str, bytes]], int]:
    """As ``_fast_members``, with ``tarfile``; raises one of ``_TAR_ERRORS`` where it cannot read, and
    ShardError (naming ``shard`` and the byte in it, ``buf`` starting at ``offset``) for a sparse member."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
        for member in tf:
            _refuse_sparse(member, shard=shard, offset=offset + member.offset)  # before read() fills its holes
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
    parsed = _fast_members(buf)  # None for sparse members (their types and pax records are tarfile's)
    if parsed is None:
        try:
            parsed = _tarfile_members(buf, shard=shard, offset=offset)
        except ShardError:
            raise  # a sparse member: already names the shard, the member and the byte
        except _TAR_ERRORS as e:
            raise ShardError(f"shard {shard!r}: sample {key!r} at byte {offset} is unreadable "
                             f"({type(e).__name__}: {e})") from None
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


# The pax header most writers put before each member (Python's tarfile with a float mtime, webdataset's
# ShardWriter): one time record and zero padding. Its length prefix is checked by the caller.
_PAX_TIME = re.compile(rb"(\d{1,20}) [amc]time=[0-9.]{1,40}\n(\0*)")
_OCTAL_FIELDS = np.r_[100:107, 108:115, 116:123, 124:135, 136:147, 148:154]  # typical layout: octal digits
_NUL_FIELDS = np.array([107, 115, 123, 135, 147, 154])
_CHKSUM_POWERS = 8 ** np.arange(5, -1, -1)


def _walk_sample(buf: bytes | bytearray, pos: int, end: int, headers: list[int]) -> list[tuple[bytes, int, int]] | None:
    """(raw name, data start, size) of the regular members of the sample at ``buf[pos:end]``, walking its
    headers and appending their places to ``headers`` (whose checks ``_headers_ok`` does for a whole run);
    None for anything but plain ustar members, each with at most one pax time record before it."""
    members: list[tuple[bytes, int, int]] = []
    after_pax = False
    while pos < end:
        if pos + _BLOCK > end:
            return None
        try:
            size = int(buf[pos + 124:pos + 135], 8)
        except ValueError:
            return None
        headers.append(pos)
        start = pos + _BLOCK
        stop = start + -(-size // _BLOCK) * _BLOCK
        kind = buf[pos + 156]
        if stop > end:
            return None
        if kind == 0x78:  # "x": a pax header for the next member
            m = _PAX_TIME.fullmatch(buf, start, stop)
            if after_pax or m is None or int(m.group(1)) != m.start(2) - start or m.start(2) - start != size:
                return None
            after_pax = True
        elif kind in (0x30, 0x37):  # "0", "7": regular files ("\0" v7 headers go to the full parser)
            if buf[pos + 345] != 0:  # a ustar prefix
                return None
            members.append((bytes(buf[pos:pos + 100]).split(b"\0", 1)[0], start, size))
            after_pax = False
        else:
            return None
        pos = stop
    return None if after_pax else members


def _headers_ok(buf: bytes | bytearray, headers: list[int] | np.ndarray) -> np.ndarray:
    """(len(headers),) bool: each header has the typical layout (every number field octal, as
    ``_TYPICAL_HEADER`` checks) and its unsigned checksum is right; in one pass over the run."""
    at = np.asarray(headers)
    if (at % _BLOCK).any():  # a run starts at a sample, so at a tar block: this is never taken for real tars
        rows = np.frombuffer(buf, np.uint8)[at[:, None] + np.arange(_BLOCK)]  # (h, 512)
    else:
        rows = _blocks(buf)[at // _BLOCK]
    return _rows_ok(rows)


def _blocks(buf: bytes | bytearray) -> np.ndarray:
    """``buf`` as (blocks, 512) uint8 tar blocks, without a copy (a partial last block left out)."""
    return np.frombuffer(buf, np.uint8, count=len(buf) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)


def _rows_ok(rows: np.ndarray) -> np.ndarray:
    """``_headers_ok`` of header rows already gathered: (h, 512) uint8 -> (h,) bool."""
    octal = rows[:, _OCTAL_FIELDS]
    ok = ((octal >= 0x30) & (octal <= 0x37)).all(axis=1) & (rows[:, _NUL_FIELDS] == 0).all(axis=1)
    ok &= rows[:, 155] == 0x20
    for lo in (329, 337):  # devmajor, devminor: 7 octal digits and a NUL, or all NULs
        field = rows[:, lo:lo + 8]
        digits = ((field[:, :7] >= 0x30) & (field[:, :7] <= 0x37)).all(axis=1) & (field[:, 7] == 0)
        ok &= digits | (field == 0).all(axis=1)
    chksum = (rows[:, 148:154].astype(np.int64) - 0x30) @ _CHKSUM_POWERS
    return ok & (chksum == _byte_sums(rows) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 0x20)


def _byte_sums(rows: np.ndarray) -> np.ndarray:
    """(h,) int64 byte sum of each 512-byte row: summed as 64-bit words in 16-bit lanes (8x fewer elements
    than summing bytes; 64 words of 4 lanes of at most 2 x 255 stay below 2**16)."""
    words = np.ascontiguousarray(rows).view(np.uint64)  # (h, 64)
    lanes = (words & 0x00FF00FF00FF00FF) + ((words >> 8) & 0x00FF00FF00FF00FF)
    total = lanes.sum(axis=1, dtype=np.uint64)  # 4 lanes of <= 64 * 510 = 32,640 each: no carry between them
    total = (total & 0xFFFF) + ((total >> 16) & 0xFFFF) + ((total >> 32) & 0xFFFF) + (total >> 48)
    return total.astype(np.int64)


class _Layout:
    """The layout of one plain sample (``_walk_sample``'s kind: ustar members, each with at most one pax time
    record) relative to its start, to which other samples are held byte for byte except where a writer
    puts per-sample values: the key in the names, the times (and so the pax records' lengths) and the
    checksums. ShardWriter writes every sample of a dataset with the same members and sizes, so one layout
    covers most samples, and checking a run of them is comparing their header blocks with the layout's,
    8 bytes at a time, plus a few narrow checks of the varying fields, in numpy passes over the run."""

    def __init__(self, buf: bytes | bytearray, lo: int, n: int, key: bytes) -> None:
        headers: list[int] = []
        members = _walk_sample(buf, lo, lo + n, headers)
        self.ok = bool(members) and len(key) + 1 < 100
        if not self.ok:
            return
        self.length, self.width = n, len(key)
        rel = (np.asarray(headers) - lo) // _BLOCK  # (k,) header blocks from the sample's start
        blocks = _blocks(buf)
        rows = blocks[lo // _BLOCK + rel]  # (k, 512)
        kinds = rows[:, 156]
        pax = np.flatnonzero(kinds == 0x78)  # (P,) pax headers (the others: members)
        self.members_at = np.flatnonzero(kinds != 0x78)
        sizes = [int(bytes(buf[h + 124:h + 135]), 8) for h in np.asarray(headers)[pax].tolist()]
        # Every pax record's length has the same number of digits (others: sample by sample).
        digits = {len(str(size)) for size in sizes}
        self.ok = bool(_rows_ok(rows).all()) and len(digits) <= 1
        if not self.ok:  # the sample goes to the per-sample path, which says what is wrong
            return
        self.digits = digits.pop() if digits else 0
        self.pax = pax
        self.rel = np.concatenate([rel, rel[pax] + 1])  # (k + P,) header blocks, then pax data blocks
        k, d = len(headers), self.digits
        template = blocks[lo // _BLOCK + self.rel]  # (k + P, 512)
        # Bytes that may differ from sample to sample, checked apart: the key part of every name (a pax
        # header's name is not read at all, as in `_walk_sample`), size, time and checksum fields, and in a
        # pax record its length and the time with its newline (the NULs after it are compared here).
        same = np.ones(template.shape, bool)
        same[:k, :self.width] = False
        same[:k, 124:156] = False
        same[k:, :d] = False
        same[k:, d + 7:d + 7 + _TIME_WINDOW] = False
        # A header's checksum is this plus its varying bytes (the checksum field counted as spaces).
        self.fixed_sum = (rows.astype(np.int64) * same[:k]).sum(axis=1) + 8 * 0x20  # (k,)
        # What every byte must be, as (byte & mask) == expect, compared 8 bytes at a time: the fixed bytes
        # the layout's (mask 0xFF); the size, time and checksum fields octal digits ('0'..'7': mask 0xF8,
        # expect '0') with their NULs and the checksum's space in place; a member's size the layout's (its
        # digits are summed with the varying fields for the checksum, so `fixed_sum` leaves them out); the
        # key and the pax length and time free here (mask 0), checked below.
        mask = np.where(same, 0xFF, 0).astype(np.uint8)
        mask[:k, 124:156] = np.where(_FIELD_OCTAL, 0xF8, 0xFF)
        mask[self.members_at, 124:136] = 0xFF
        expect = template & mask
        expect[:k, 124:156] = _FIELD_BASE
        expect[self.members_at, 124:136] = template[self.members_at, 124:136]
        self.mask = mask.view(np.uint64)  # (k + P, 64)
        self.words = expect.view(np.uint64)
        self.powers = 10 ** np.arange(d - 1, -1, -1)
        self.members: list[tuple[str, int, int]] = []  # (extension, data start from the sample's, size)
        by_start = {start: (raw, size) for raw, start, size in members}
        exts = set()
        for q in self.members_at.tolist():
            h = headers[q]
            raw, size = by_start[h + _BLOCK]
            suffix = raw[len(key):]
            # `_fast_sample`'s fast case: the name is "key.ext" (the key plain, checked by the caller), no
            # slash, UTF-8, one member per extension.
            try:
                ext = suffix[1:].decode("utf-8").lower()
            except UnicodeDecodeError:
                ext = None
            # An extension "__key__" (or any "__x__", the reader's own entries) would replace what the
            # reader sets: the slow path refuses it by name.
            if (not raw.startswith(key) or suffix[:1] != b"." or b"/" in raw or ext is None or ext in exts
                    or ext.startswith("__")):
                self.ok = False
                return
            exts.add(ext)
            self.members.append((ext, h + _BLOCK - lo, size))

    def fits(self, blocks: np.ndarray, starts: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """(m,) bool: the samples starting at tar block ``starts`` (m,) with the key bytes ``keys`` (m, L)
        have this layout: blocks equal to the layout's but for the varying bytes (the members' sizes are
        the layout's); size, time and checksum fields octal as tarfile writes them (``_rows_ok``'s layout);
        names the sample's key (the rest of each name is the layout's); checksums right; each pax record a
        time record (``_PAX_TIME``) of its header's length. The checks of ``_walk_sample`` and
        ``_fast_sample``, ``_FIT_STEP`` samples at a time."""
        out = np.empty(starts.shape[0], bool)
        for lo in range(0, starts.shape[0], _FIT_STEP):
            out[lo:lo + _FIT_STEP] = self._fits(blocks, starts[lo:lo + _FIT_STEP], keys[lo:lo + _FIT_STEP])
        return out

    def _fits(self, blocks: np.ndarray, starts: np.ndarray, keys: np.ndarray) -> np.ndarray:
        m, k, d = starts.shape[0], self.fixed_sum.shape[0], self.digits
        # Gathered into this thread's reused arrays: fresh ones of this size are fresh pages every call.
        rows = _scratch("rows", (m, self.rel.shape[0], _BLOCK), np.uint8)  # (m, k + P, 512)
        np.take(blocks, starts[:, None] + self.rel, axis=0, out=rows, mode="clip")  # in range: see _regular_run
        words = _scratch("words", (m, self.rel.shape[0] * _BLOCK // 8), np.uint64)
        np.bitwise_and(rows.view(np.uint64).reshape(m, -1), self.mask.reshape(-1), out=words)
        ok = (words == self.words.reshape(-1)).all(axis=1)  # (a bool temporary: cheaper than xor and any)
        fields = rows[:, :k, 124:156]  # (m, k, 32): size, time, checksum
        ok &= (rows[:, self.members_at, :self.width] == keys[:, None, :]).reshape(m, -1).all(axis=1)
        chksum = (fields[:, :, 24:30].astype(np.int64) - 0x30) @ _CHKSUM_POWERS  # (m, k)
        total = self.fixed_sum + rows[:, :k, :self.width].sum(axis=2, dtype=np.int64)
        total += fields[:, :, :24].sum(axis=2, dtype=np.int64)
        ok &= (chksum == total).all(axis=1)
        if self.pax.size:
            # `_PAX_TIME`: "<length> " then "[amc]time=" (the layout's), the time (digits and dots, 1 to 40)
            # and a newline, then NULs; the length in decimal is the header's size field.
            size = (fields[:, self.pax, :11].astype(np.int64) - 0x30) @ _SIZE_POWERS  # (m, P)
            record = rows[:, k:]  # (m, P, 512)
            # The length prefix is `size` in d decimal digits (leading zeros allowed, as int() reads them).
            ok &= (size < 10 ** d).all(axis=1)
            ok &= (record[:, :, :d] == size[:, :, None] // self.powers % 10 + 0x30).reshape(m, -1).all(axis=1)
            # The time's length (the newline is right after it): every byte of the window has the class
            # `_TIME_EXPECT` gives for that length (a length out of 1..40 has a row nothing matches).
            value = np.clip(size - 1 - (d + 7), 0, _TIME_WINDOW)  # (m, P)
            window = record[:, :, d + 7:d + 7 + _TIME_WINDOW]  # (m, P, 41)
            ok &= (np.take(_TIME_CLASS, window) == np.take(_TIME_EXPECT, value, axis=0)).reshape(m, -1).all(axis=1)
        return ok


# Bytes 124..156 of a header as tarfile and GNU tar write them: size (11 octal digits, NUL), time (the
# same), checksum (6 octal digits, NUL, space): where the digits are, and '0' there, the NULs and the space.
_FIELD_OCTAL = np.r_[[True] * 11, False, [True] * 11, False, [True] * 6, False, False]
_FIELD_BASE = np.where(_FIELD_OCTAL, 0x30, 0).astype(np.uint8)
_FIELD_BASE[-1] = 0x20
_SIZE_POWERS = 8 ** np.arange(10, -1, -1)
_TIME_WINDOW = 41  # a pax time of up to 40 digits and dots, and its newline
# The class of each byte of a pax time window: 0 a digit or a dot, 1 a newline, 2 a NUL, 3 anything else;
# and the classes a window must have for a time of v bytes (row v; rows 0 and 41, lengths out of range,
# hold a class no byte has).
_TIME_CLASS = np.full(256, 3, np.uint8)
_TIME_CLASS[list(b"0123456789.")] = 0
_TIME_CLASS[0x0A], _TIME_CLASS[0] = 1, 2
_TIME_EXPECT = np.full((_TIME_WINDOW + 1, _TIME_WINDOW), 255, np.uint8)
for _v in range(1, _TIME_WINDOW):
    _TIME_EXPECT[_v] = [0] * _v + [1] + [2] * (_TIME_WINDOW - 1 - _v)
del _v
# Samples checked per numpy pass: the temporaries of a pass stay small (a few hundred KB), where those of a
# whole run of large samples' headers are fresh pages every run (page faults cost more than the checks).
_FIT_STEP = 128
_scratch_arrays = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array of ``shape`` reused by this thread under ``name`` (contents undefined)."""
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    have = getattr(_scratch_arrays, name, None)
    if have is None or have.size < need:
        have = np.empty(need, np.uint8)
        setattr(_scratch_arrays, name, have)
    return have[:need].view(dtype).reshape(shape)
# Layouts kept from earlier runs (most recent first) and made per run; samples that fit none are parsed
# one by one. Kept per process: a layout holds no sample's bytes, only what every sample must share.
_KEPT_LAYOUTS = 8
_NEW_LAYOUTS = 4
_recent_layouts: list[_Layout] = []


def _regular_run(buf: bytes | bytearray, spans: Sequence[tuple[int, int]] | np.ndarray,
                 keys: Sequence[str]) -> list[dict[str, Any] | None]:
    """The samples of a run that fit a layout (``_Layout``: one kept from earlier runs, or made from the
    run's first samples), None for the others: ``parse_samples`` parses those one by one. Spans that do not
    start at a tar block are all left to it."""
    n = len(spans)
    out: list[dict[str, Any] | None] = [None] * n
    if n == 0:
        return out
    at = np.array(spans, dtype=np.int64).reshape(n, 2)
    starts, lengths = at[:, 0], at[:, 1]
    if (starts % _BLOCK).any():
        return out
    encoded = [k.encode("utf-8") for k in keys]
    width = np.fromiter(map(len, encoded), np.int64, n)
    blocks = _blocks(buf)
    view = memoryview(buf)
    todo = np.ones(n, bool)
    kept, made = list(_recent_layouts), 0
    while todo.any():
        if kept:
            layout = kept.pop(0)
        elif made < _NEW_LAYOUTS:
            made += 1
            t = int(np.flatnonzero(todo)[0])
            todo[t] = False  # tried once as a layout's model: whatever happens, it is not tried again
            key = keys[t]
            if "." in key or "/" in key or key.startswith("__") or "\0" in key or not encoded[t]:
                continue
            layout = _Layout(buf, int(starts[t]), int(lengths[t]), encoded[t])
            if not layout.ok:
                continue
            todo[t] = True
            _recent_layouts.insert(0, layout)
            del _recent_layouts[_KEPT_LAYOUTS:]
        else:
            break
        # Only samples inside `buf` (its blocks are gathered by index, clipped, in `_Layout.fits`).
        same = np.flatnonzero(todo & (lengths == layout.length) & (width == layout.width)
                              & (starts + lengths <= len(buf)))
        if not same.size:
            continue
        names = np.frombuffer(b"".join([encoded[i] for i in same.tolist()]), np.uint8).reshape(same.size, -1)
        # Keys `_fast_sample` takes as plain: no dot, slash or NUL, not starting with "__".
        plain = ~((names == 0x2E) | (names == 0x2F) | (names == 0)).any(axis=1)
        if names.shape[1] >= 2:
            plain &= ~((names[:, 0] == 0x5F) & (names[:, 1] == 0x5F))
        fit = same[plain & layout.fits(blocks, starts[same] // _BLOCK, names)]
        todo[fit] = False  # the others may fit another layout (another member size, say)
        # Each member's bytes copied out of the buffer once; the slices hold no reference to it.
        members = [(ext, start, start + size) for ext, start, size in layout.members]
        for i, lo in zip(fit.tolist(), starts[fit].tolist()):
            sample = {"__key__": keys[i]}
            for ext, a, b in members:
                sample[ext] = view[lo + a:lo + b].tobytes()
            out[i] = sample
    return out


def parse_samples(buf: bytes | bytearray, spans: Sequence[tuple[int, int]] | np.ndarray, *, shard: str, keys: Sequence[str],
                  offsets: Sequence[int]) -> list[dict[str, Any] | ShardError]:
    """``parse_sample`` of each sample in a run read at once: ``spans`` are (start, length) in ``buf``,
    ``offsets`` where they start in the shard. Each result is the sample or the ShardError it raised.

    Samples that share a plain layout (``_Layout``: what ShardWriter writes) are checked together in a few
    numpy passes; other plain ustar samples are walked one by one with every header checked in one
    vectorized pass, ~4x cheaper than ``parse_sample``; any sample with something else in it, or anything
    wrong, goes to ``parse_sample``, which decides.
    """
    out: list[dict[str, Any] | ShardError | None] = _regular_run(buf, spans, keys)
    rest = [j for j, sample in enumerate(out) if sample is None]
    if not rest:
        return out  # type: ignore[return-value]
    spans = [(int(lo), int(n)) for lo, n in spans]  # plain ints (``spans`` may be an (n, 2) array)
    headers: list[int] = []
    walked = [_walk_sample(buf, spans[j][0], spans[j][0] + spans[j][1], headers) for j in rest]
    ok = _headers_ok(buf, headers) if headers else np.zeros(0, bool)
    bad_rows = np.flatnonzero(~ok)
    bad_at = set(np.asarray(headers)[bad_rows].tolist()) if bad_rows.size else set()
    for j, members in zip(rest, walked):
        (lo, n), key = spans[j], keys[j]
        sample = None
        if members is not None and not (bad_at and any(lo <= h < lo + n for h in bad_at)):
            sample = _fast_sample(buf, members, key)
        if sample is None:
            try:
                sample = parse_sample(bytes(buf[lo:lo + n]), shard=shard, key=key, offset=offsets[j])
            except ShardError as e:
                sample = e
        out[j] = sample
    return out  # type: ignore[return-value]


def _fast_sample(buf: bytes | bytearray, members: list[tuple[bytes, int, int]], key: str) -> dict[str, Any] | None:
    """The sample dict of walked, checked members; None when ``parse_sample`` must judge (another key, a
    duplicate extension, a name that is not UTF-8, no members)."""
    view = memoryview(buf)
    sample: dict[str, Any] = {"__key__": key}
    # A plain key (no dot, no slash, not a `__meta__` name) splits off any "key.ext" name as _split_key does.
    plain = "." not in key and "/" not in key and not key.startswith("__")
    prefix = key + "."
    for raw, start, size in members:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if plain and name.startswith(prefix) and "/" not in name:
            mkey, ext = key, name[len(prefix):].lower()
        else:
            mkey, ext = _split_key(name)
            if mkey is None:
                continue
        if mkey != key or ext in sample:
            return None
        sample[ext] = bytes(view[start:start + size])
    return sample if len(sample) > 1 else None


def iter_tar_samples(fileobj: Any, *, shard: str) -> Iterator[tuple[dict[str, Any], int, int]]:
    """``(sample, start, end)`` for each sample of a tar *stream* (pipes, URLs), in file order.

    Members are grouped by consecutive key as webdataset's ``group_by_keys`` does, with the rules of
    ``parse_sample``; ``start..end`` are the sample's bytes in the tar, so the caller can hold them to the
    index (a header ``tarfile`` silently takes for the end of the archive shows up as a short sample).
    Tar errors raise ShardError naming the shard, the last key read and the byte offset.
    """
    current: dict[str, Any] | None = None
    start = end = at = 0  # `at`: header of the last member read, for error messages
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for member in tf:
                at = member.offset
                if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
                    # Refused before read() fills its holes; a sample of another key before it is whole, so
                    # it is handed out first and the error falls on the sample that holds the member.
                    if current is not None and _split_key(member.name)[0] not in (None, current["__key__"]):
                        yield current, start, end
                        current = None
                    _refuse_sparse(member, shard=shard, offset=member.offset)
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
                end = tf.offset  # where tarfile reads the next header (as the index's ranges)
    except _TAR_ERRORS as e:
        if isinstance(e, ShardError):
            raise
        where = f" after sample {current['__key__']!r}" if current is not None else ""
        raise ShardError(f"shard {shard!r}: unreadable tar at or after the member at byte {at}{where} "
                         f"({type(e).__name__}: {e})") from None
    if current is not None:
        yield current, start, end


#: The time ``write_shards`` gives every tar member (2000-01-01 UTC): a constant, so the same samples write
#: the same bytes.
SHARD_MTIME = 946_684_800


def write_shards(samples: Iterable[dict[str, Any]], pattern: str, *, maxcount: int = 10_000,
                 maxsize: float = 3e9, progress: bool = False) -> ShardIndex:
    """Write ``samples`` as WebDataset shards named ``pattern % i`` and ``index.arrow`` beside them.

    Every sample dict needs a unique string ``__key__``; other entries are ``ext: bytes | str | ...`` as
    ``webdataset.TarWriter`` takes them. Returns the index.

    The same samples give the same bytes, and so the same index fingerprint: every member's time is
    ``SHARD_MTIME``, not the clock (a state saved against the shards still matches them when they are
    written again). Without it each member also carries a pax record of its fractional time.
    """
    import webdataset as wds

    if "%" not in pattern:
        raise ValueError(f"`pattern` must contain a %-format for the shard number, got {pattern!r}")
    if isinstance(maxcount, bool) or not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"`maxcount` must be an int >= 1, got {maxcount!r}")
    if not maxsize > 0:
        raise ValueError(f"`maxsize` must be > 0, got {maxsize!r}")
    total = len(samples) if isinstance(samples, Sized) else None  # the progress bar's total, before iter()
    rest = iter(samples)
    first = next(rest, None)
    if first is None:  # before any file is made (ShardWriter opens its first shard at once)
        raise ValueError("`samples` is empty: there is nothing to write")
    samples = itertools.chain([first], rest)
    folder = os.path.dirname(os.path.abspath(pattern))
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []
    previous = None
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=SHARD_MTIME) as sink:
        for i, sample in enumerate(tqdm(samples, total=total, desc="writing shards", unit="sample",
                                              disable=not progress)):
            key = sample.get("__key__") if isinstance(sample, dict) else None
            if not isinstance(key, str) or not key:
                raise ValueError(f"sample {i} needs a non-empty string `__key__`, got {key!r}")
            if "." in key.rsplit("/", 1)[-1]:
                raise ValueError(f"sample {i}: `__key__` {key!r} must not contain a dot in its base name "
                                 f"(WebDataset splits keys from extensions at the first dot)")
            if key == previous:
                # A reader groups adjacent members by key: the two would be read as one sample with every
                # member twice (index_shards refuses a repeated key that is not adjacent).
                raise ValueError(f"sample {i}: `__key__` {key!r} repeats the previous sample's; keys must be unique")
            previous = key
            try:
                sink.write(sample)
            except (ValueError, TypeError, AttributeError) as exn:  # webdataset's encoder names no sample
                raise ValueError(f"sample {i} ({key!r}) cannot be written: {exn}. Values must be bytes or str, "
                                 f"or of an extension webdataset's encoder knows (e.g. a dict as 'json')") from exn
            if sink.fname not in written:
                written.append(sink.fname)
    return index_shards(written, output=os.path.join(folder, INDEX_NAME))

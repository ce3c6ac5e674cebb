"""The state file: one Arrow IPC file per ``SampleState``, its columns, metadata, checksum and validation.

``write_table`` writes a table atomically; ``read_table`` is the one reader every consumer uses
(``SampleState.load``, ``geko-data``), so every reader refuses the same files. A file is trusted only after
``read_table`` has checked it whole: structure, value ranges and a checksum of its columns and metadata.
``column_values`` gives a column as numpy without copying it (a view of the memory-mapped file), which is
what lets a loaded state cost no memory until a column is written.

The layout is described in docs/architecture.md ("State file").
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from geko_data import policy
from geko_data.atomic import atomic_path
from geko_data.config import GEKOConfig
from geko_data.efficiency import format_partition
from geko_data.plan import EpochPlan

__all__ = ["BUCKET_TYPE", "COLUMNS", "FORMAT_VERSION", "META_KEY", "OPTIONAL_COLUMNS", "PLAN_COLUMNS",
           "FingerprintError", "PartitionStats", "StateFileError", "StoredState", "check_fingerprint", "checksum",
           "column_values", "fingerprint_of", "fingerprint_source", "is_unset", "read_table",
           "resume_fingerprint_error", "state_table", "unset_column", "write_table"]

#: 2: the metadata carries a checksum of the columns and of itself (format 1 files, without it, still load).
#: 3: ``bucket`` is a dictionary column (its names, not codes, in pandas, polars and DuckDB) and an ``id``
#: column holds the sample id. Format 1 and 2 files (``bucket`` as uint8 codes, no ``id``) still load.
#: 4: ``id`` is uint32 when every id fits (under 2**32 samples: 4 bytes a sample instead of 8, 0.4 GB at 100M),
#: int64 past that. Format 3 files (int64 ``id``) still load.
#: 5: an optional ``answer`` column (uint32: which answer a sample has, ``SampleState.report(answer=)``),
#: written once a report gave answers. A file without it (older ones too) loads with every answer 0.
FORMAT_VERSION = 5
META_KEY = b"geko_data"

#: (column, numpy dtype, initial value), in file order.
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("loss", "float32", math.nan),
    ("loss_ema", "float32", math.nan),
    ("loss_var", "float32", 0.0),
    ("confidence", "float32", math.nan),
    ("correct", "bool", False),
    ("q", "float32", 0.5),
    ("bucket", "uint8", policy.FOCUS),
    ("times_seen", "uint16", 0),
    ("frozen_epochs", "uint8", 0),
    ("forgets", "uint16", 0),
    ("pruned", "bool", False),
    ("last_step", "int32", -1),
    ("answer", "uint32", 0),
)
_NAMES = tuple(c[0] for c in COLUMNS)
#: Columns a file may lack: written only once a report gave them a value, loaded as their initial value
#: otherwise (``unset_column``), so a state that never heard of them costs neither memory nor file bytes.
OPTIONAL_COLUMNS = frozenset({"answer"})
#: The file's ``bucket`` type: int8 codes 0-3 (the same bytes as the uint8 column in memory) into the names.
BUCKET_TYPE = pa.dictionary(pa.int8(), pa.string())
_BUCKET_DICT = pa.array(policy.BUCKET_NAMES, pa.string())
#: Optional columns: the current epoch's plan (draws and loss weight per sample), when the state has one.
PLAN_COLUMNS = (("plan_count", "uint16"), ("plan_weight", "float32"))


class StateFileError(ValueError):
    """A state file that cannot be used: truncated, corrupted, foreign, too new, or for other data."""


class FingerprintError(StateFileError):
    """A state written for other data (its fingerprint differs from the data's), wherever it is checked."""


def check_fingerprint(stored: str | None, expected: str | None, *, where: str) -> None:
    """Raise FingerprintError naming ``where`` and both fingerprints unless they agree (None agrees with all)."""
    if stored is not None and expected is not None and stored != expected:
        raise FingerprintError(f"{where}: state was written for other data (other shards or samples: its "
                               f"fingerprint is {stored!r}, the data here has {expected!r}); point at the data it was "
                               f"written for, or start a new state for this data")


def resume_fingerprint_error(checkpoint: str, stored: str | None, expected: str | None, *, run: str,
                             fresh: str) -> FingerprintError:
    """The FingerprintError of a framework resume whose checkpoint holds state of other data: names the
    checkpoint, both fingerprints (``run``: where this run's came from) and both ways out (``fresh``: how
    to start over). One wording for every integration (GEKOTrainer, GEKOCallback)."""
    return FingerprintError(f"{checkpoint} holds GEKO state written for other data (its fingerprint is {stored!r}, "
                            f"{run} is {expected!r}): resume it with the data it was written for, or {fresh}")


def fingerprint_source(given: str | None, run: str) -> str:
    """What ``resume_fingerprint_error`` calls this run's fingerprint: ``run`` (the argument it was given by),
    or, given none, the one the data carries (a ``ShardDataset``'s index)."""
    return run if given is not None else "the fingerprint of this run's shards (their index, by ShardDataset)"


def fingerprint_of(keys: Any) -> str:
    """A fingerprint of a map-style dataset from its sample keys in index order (ids, paths, hashes...).

    Pass it as ``GEKOSampler(..., fingerprint=)``: a state saved for other data of the same length is then
    refused on resume. Each key is hashed as its ``str``; order matters, as ids index the state.
    """
    if isinstance(keys, (str, bytes)):  # iterating it would hash each character as a key
        raise TypeError(f"`keys` must be one key a sample (a list, an array, a dataset column), not one "
                        f"{type(keys).__name__}: got {keys[:40]!r}")
    h = xxhash.xxh3_128()
    n = 0
    for key in keys:
        text = str(key).encode("utf-8", "surrogatepass")
        # Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        h.update(len(text).to_bytes(8, "little"))
        h.update(text)
        n += 1
    if n == 0:
        raise ValueError("`keys` must hold at least one key, got none")
    return f"keys-{n}-{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class PartitionStats:
    """Counts of one repartition. ``active`` = unpruned and not FREEZE; bucket counts exclude pruned."""

    epoch: int
    progress: float
    phase: str
    step: int
    freeze: int
    light: int
    focus: int
    hard: int
    pruned: int
    newly_pruned: int
    active: int
    seen: int
    forgets: int
    mean_loss: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_loss"] = None if math.isnan(self.mean_loss) else self.mean_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartitionStats":
        d = dict(d)
        d["mean_loss"] = math.nan if d.get("mean_loss") is None else d["mean_loss"]
        return cls(**d)

    def format(self) -> str:
        """One line as gekolib prints it, with the pruned count added (``efficiency.format_partition``)."""
        return format_partition(self.to_dict())


def unset_column(n: int, dtype: str, init: Any) -> np.ndarray:
    """An optional column no report has set: ``init`` everywhere, in no memory (a read-only broadcast of one
    value, which ``SampleState._writable`` copies before the first write)."""
    return np.broadcast_to(np.array(init, dtype=dtype), (n,))


def is_unset(values: np.ndarray) -> bool:
    """Whether ``values`` is an ``unset_column`` (one value for every sample, held once)."""
    return values.ndim == 1 and values.strides[0] == 0 and not values.flags.writeable


def state_table(columns: dict[str, np.ndarray], meta: dict[str, Any], *, ids_later: bool = False) -> pa.Table:
    """The file's table from numpy columns (``COLUMNS``' names, optionally ``PLAN_COLUMNS``') and metadata.

    Numeric columns are wrapped without copying; ``id`` (the row number) comes first so a user can join the
    table with their data, and ``bucket`` (uint8 codes) becomes a dictionary column whose values read as
    FREEZE/LIGHT/FOCUS/HARD. The metadata gets ``format_version`` and a ``checksum`` covering the columns and
    the rest of the metadata, so a file changed after writing is refused by ``read_table``.

    ``ids_later``: the table's ``id`` column is zeros that take no memory (an anonymous map never written:
    its pages read as the kernel's zero page) and the checksum covers the real ids, which ``write_state``
    writes into the file: a save makes no (N,) array of ids (4 bytes a sample of fresh memory).
    """
    n = columns[COLUMNS[0][0]].shape[0]
    id_type = _id_type(n)
    if ids_later:
        zeros = pa.py_buffer(mmap.mmap(-1, n * np.dtype(id_type).itemsize))
        arrays = {"id": pa.Array.from_buffers(pa.from_numpy_dtype(id_type), n, [None, zeros])}
    else:
        arrays = {"id": pa.array(np.arange(n, dtype=id_type))}
    for name, dtype in [(c[0], c[1]) for c in COLUMNS] + list(PLAN_COLUMNS):
        if name not in columns:
            continue
        values = columns[name]
        if values.dtype != np.dtype(dtype):
            raise ValueError(f"column {name!r} must be {dtype}, got {values.dtype}")
        arrays[name] = pa.array(values)
    arrays["bucket"] = pa.DictionaryArray.from_arrays(pa.array(columns["bucket"].view(np.int8)), _BUCKET_DICT)
    table = pa.table(arrays)
    meta = {"format_version": FORMAT_VERSION, **meta}
    meta["checksum"] = checksum(table, meta, ids=_id_steps(n, id_type) if ids_later else None)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def _id_type(n: int) -> Any:
    return np.uint32 if n <= 2**32 else np.int64


#: Ids per step of a save's ``id`` column (4 MB of uint32): made and written a step at a time.
_ID_STEP = 1 << 20


def _id_steps(n: int, id_type: Any) -> Any:
    """``np.arange(n, dtype=id_type)`` in steps of ``_ID_STEP``, each written over the last (use one before
    asking for the next)."""
    step = np.arange(min(n, _ID_STEP), dtype=id_type)
    for a in range(0, n, _ID_STEP):
        yield step[:n - a]
        step += _ID_STEP


def write_table(path: str | os.PathLike, table: pa.Table) -> None:
    """Write ``table`` as one Arrow IPC file atomically: a failed or killed write leaves the previous file whole.

    A symlink at ``path`` is written through (its target is replaced); an existing file keeps its mode.
    """
    with atomic_path(path) as tmp:
        _write_arrow(tmp, table)


def write_state(path: str | os.PathLike, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``write_table(path, state_table(columns, meta))``'s file, made with no (N,) array of ids: the table's
    ``id`` column is zeros that take no memory, and the row numbers are written over them in the file, a step
    at a time, before the file takes its name."""
    table = state_table(columns, meta, ids_later=True)
    with atomic_path(path) as tmp:
        _write_arrow(tmp, table)
        _write_ids(tmp, table.num_rows)


def _write_arrow(path: str, table: pa.Table) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _write_ids(path: str, n: int) -> None:
    """Write the row numbers into the ``id`` column of the Arrow file at ``path`` (its values' place is found
    by reading the file's own layout), over the pages just written: no fresh memory."""
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            whole = pa.py_buffer(mapped)
            data = pa.ipc.open_file(whole).get_batch(0).column("id").buffers()[1]
            start, end = data.address - whole.address, data.address - whole.address + data.size
            del whole, data  # the map cannot close while Arrow holds views of it
        at = start
        for step in _id_steps(n, _id_type(n)):
            at += os.pwrite(f.fileno(), step, at)
        if at != start + n * np.dtype(_id_type(n)).itemsize or at > end:
            raise StateFileError(f"{path}: the id column is {end - start} bytes, {at - start} were written")


class StoredState:
    """What makes a ``SampleState`` a state file: ``metadata``, ``to_arrow``, ``save`` and ``load``.

    A base of ``SampleState``, kept here with the format it writes; it reads and sets the state's columns
    (``COLUMNS``), ``plan``, ``config``, ``fingerprint``, ``epoch``, ``step``, ``num_nonfinite`` and
    ``history``.
    """

    num_samples: int
    config: GEKOConfig
    fingerprint: str | None
    epoch: int
    step: int
    num_nonfinite: int
    history: list[dict[str, Any]]
    plan: EpochPlan | None

    #: A loaded state's boolean columns still packed as the file's bitmaps, by name.
    _packed: dict[str, pa.Array] = {}

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set: a loaded state's boolean column is unpacked (1 byte a sample) the
        # first time it is read, so a state loaded to be inspected or resumed pays for what it uses.
        packed = self.__dict__.get("_packed")
        if packed and name in packed:
            values = packed.pop(name).to_numpy(zero_copy_only=False)
            setattr(self, name, values)
            return values
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def metadata(self) -> dict[str, Any]:
        """The JSON stored in the file's schema metadata."""
        from geko_data import __version__

        plan = self.plan
        return {"format_version": FORMAT_VERSION, "writer": f"geko_data {__version__}",
                "num_samples": self.num_samples, "config": self.config.to_dict(), "epoch": self.epoch,
                "step": self.step, "num_nonfinite": self.num_nonfinite, "fingerprint": self.fingerprint,
                "history": self.history,
                "plan": None if plan is None else {"epoch": plan.epoch, "progress": plan.progress,
                                                   "seed": plan.seed, "epoch_length": plan.epoch_length}}

    def to_arrow(self) -> pa.Table:
        """The state as a pyarrow Table (numeric columns zero-copy) with the metadata attached.

        ``id`` is the sample id (the row number) and ``bucket`` a dictionary column whose values read as
        FREEZE/LIGHT/FOCUS/HARD. With a current plan, two more columns hold it: ``plan_count`` (draws this epoch) and
        ``plan_weight`` (loss weight this epoch). The metadata's ``checksum`` covers the columns and the
        rest of the metadata, so a file changed after writing is refused on load.
        """
        return state_table(self._columns(), self.metadata())

    def _columns(self) -> dict[str, np.ndarray]:
        columns = {name: getattr(self, name) for name, _, _ in COLUMNS
                   if not (name in OPTIONAL_COLUMNS and is_unset(getattr(self, name)))}
        if self.plan is not None:
            # max_repeats <= 1000 keeps a count within uint16.
            columns["plan_count"] = self.plan.counts.astype(np.uint16, copy=False)  # shared and loaded plans: uint16
            columns["plan_weight"] = self.plan.loss_weight.astype(np.float32, copy=False)
        return columns

    def save(self, path: str | os.PathLike) -> None:
        """Write one Arrow IPC file atomically: a failed or killed save leaves the previous file whole.

        A symlink at ``path`` is written through (its target is replaced); an existing file keeps its mode.
        The file is ``to_arrow()``'s table; its ``id`` column is written into the file a step at a time.
        """
        write_state(path, self._columns(), self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, *, memory_map: bool = True, expect_fingerprint: str | None = None,
             config: GEKOConfig | None = None, verify: bool = True) -> "Any":
        """Read a file written by ``save``.

        With ``memory_map`` the numeric columns are zero-copy views of the file (copied on the first
        mutation). ``expect_fingerprint`` guards against state written for other data (FingerprintError);
        ``config`` replaces the stored policy (default: the stored one). ``verify`` (default True) checks the
        stored checksum, which reads every byte of the file once; pass False only for a quick look at a file
        you trust (the structure and value ranges are checked either way).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"state file {path!r} does not exist")
        table, meta = read_table(path, memory_map=memory_map, verify=verify)
        check_fingerprint(meta.get("fingerprint"), expect_fingerprint, where=path)
        return cls._from_table(table, meta, config=config, path=path)

    @classmethod
    def _from_table(cls, table: pa.Table, meta: dict[str, Any], *, config: GEKOConfig | None,
                    path: str) -> "Any":
        try:
            stored_config = GEKOConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{path}: bad config in metadata ({e})") from None
        self = cls.__new__(cls)
        self.num_samples = table.num_rows
        self.config = config if config is not None else stored_config
        self.fingerprint = meta.get("fingerprint")
        self.epoch = int(meta.get("epoch", -1))
        self.step = int(meta.get("step", 0))
        self.num_nonfinite = int(meta.get("num_nonfinite", 0))
        self.history = list(meta.get("history", []))
        # Booleans are bits in the file: kept packed (1 bit a sample) until first read (``__getattr__``).
        self._packed = {}
        for name, dtype, init in COLUMNS:
            if name not in table.column_names:  # an optional column the writer never set
                setattr(self, name, unset_column(self.num_samples, dtype, init))
            elif dtype == "bool":
                self._packed[name] = _chunk(table.column(name))
            else:
                setattr(self, name, column_values(table, name))
        self.plan = None
        plan_meta = meta.get("plan")
        if isinstance(plan_meta, dict) and all(n in table.column_names for n, _ in PLAN_COLUMNS):
            try:
                self.plan = EpochPlan(
                    epoch=int(plan_meta["epoch"]), progress=float(plan_meta["progress"]),
                    counts=column_values(table, "plan_count"),  # uint16, a view of the file: not widened
                    loss_weight=column_values(table, "plan_weight"),
                    seed=int(plan_meta["seed"]), epoch_length=plan_meta.get("epoch_length"))
            except (KeyError, TypeError, ValueError) as e:
                raise StateFileError(f"{path}: bad plan in metadata ({e})") from None
        return self


def read_table(path: str | os.PathLike, *, memory_map: bool = True, columns: list[str] | None = None,
               verify: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    """Open a state file as ``(table, metadata)``, validating it; ``columns`` reads only those.

    Everything a reader relies on is checked here, so every reader (``SampleState.load``, ``geko-data``)
    refuses the same files: a path that is not a regular file (a FIFO would block the open forever),
    metadata that is not a JSON object (or nested too deep to parse) or has fields of the wrong type, history
    entries that are not partition records, columns missing, of other types or with nulls, Arrow buffers
    inconsistent with their lengths, values out of range (bucket codes outside 0-3, NaN Q, confidence
    outside [0, 1], negative loss variance, ...), no rows, a row count other than the metadata's, and, with
    ``verify`` (the default), a checksum other than the stored one. Format 1 files, written before checksums,
    carry none and load unverified.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise StateFileError(f"{path}: not a regular file ({_file_kind(mode)}); a state file is a regular file")
    try:
        source = pa.memory_map(path, "r") if memory_map else pa.OSFile(path, "rb")
        reader = pa.ipc.open_file(source)
        raw = (reader.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise StateFileError(f"{path}: not a geko_data state file (no {META_KEY.decode()!r} metadata)")
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise StateFileError(f"{path}: not a geko_data state file (its {META_KEY.decode()!r} metadata is a "
                                 f"JSON {type(meta).__name__}, expected an object)")
        version = meta.get("format_version")
        if not _is_int(version) or version > FORMAT_VERSION:
            raise StateFileError(f"{path}: state file format version {version!r} is newer than this geko_data "
                                 f"reads ({FORMAT_VERSION}); upgrade geko_data")
        missing = [n for n in _NAMES if n not in reader.schema.names and n not in OPTIONAL_COLUMNS]
        if missing:
            raise StateFileError(f"{path}: not a geko_data state file (missing columns {missing})")
        _check_meta(path, meta)
        # All columns are checked (memory-mapped, so unread ones cost nothing): a file bad only in a column
        # one reader does not use is refused by every reader.
        table = reader.read_all()
        _validate_buffers(table)
        _check_columns(path, table)
        if table.num_rows != meta.get("num_samples"):
            raise StateFileError(f"{path}: holds {table.num_rows} rows but its metadata says "
                                 f"{meta.get('num_samples')} samples (truncated?)")
        # re-encodes the metadata: inside the RecursionError guard
        _scan(path, table, meta, verify=verify)
    except StateFileError:
        raise
    except RecursionError:  # metadata nested thousands of levels deep (json.loads / json.dumps)
        raise StateFileError(f"{path}: not a geko_data state file (its metadata is nested too deep)") from None
    except (pa.ArrowException, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path}: not a readable geko_data state file "
                             f"(truncated or foreign: {e})") from None
    return (table if columns is None else table.select(columns)), meta


def _validate_buffers(table: pa.Table) -> None:
    """Arrow's full validation: buffers consistent with lengths and null counts, before any value is used."""
    for column in table.columns:
        # A dictionary's full check (every code within the dictionary) costs 15 ms at 10M rows; the
        # structural one suffices, as _check_columns then requires every code in 0-3 itself.
        if pa.types.is_dictionary(column.type):
            column.validate()
            for chunk in column.chunks:  # the names themselves (4 strings) fully: they are printed
                chunk.dictionary.validate(full=True)
        else:
            column.validate(full=True)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


_CHECKSUM_ALGORITHM = "xxh3_64"


def checksum(table: pa.Table, meta: dict[str, Any], *, ids: Any = None) -> str:
    """``xxh3_64:<hex>`` over each known column's name and Arrow data buffer, then the metadata (sans checksum).

    The writer and the reader hash the same Arrow buffers (booleans as their bitmap, unused trailing bits
    masked), so nothing is converted; the metadata goes in as canonical JSON (sorted keys) of its parsed
    form, so both hash the same text whatever the key order or spacing of the stored JSON. ``ids``: the
    ``id`` column's values in steps, hashed in place of the table's (``state_table(ids_later=True)``).
    """
    h = xxhash.xxh3_64()
    for name in table.column_names:
        if name in _TYPES:
            h.update(name.encode() + b"\0")
            for part in ids if name == "id" and ids is not None else _data_bytes(table.column(name)):
                h.update(part)
    body = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(json.loads(json.dumps(body)), sort_keys=True).encode())
    return f"{_CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def _data_bytes(column: pa.ChunkedArray) -> list[Any]:
    """The bytes holding a fixed-width column's values, as zero-copy views (no nulls: checked before)."""
    arr = _chunk(column)
    if pa.types.is_dictionary(arr.type):  # the codes: the dictionary itself is checked to be the bucket names
        arr = arr.indices
    n, data = len(arr), arr.buffers()[1]
    if n == 0 or data is None:
        return []
    if not pa.types.is_boolean(arr.type):
        width = arr.type.bit_width // 8
        return [memoryview(data)[arr.offset * width:(arr.offset + n) * width]]
    if arr.offset % 8:  # not byte-aligned (never in files this writes): repack
        return [np.packbits(arr.to_numpy(zero_copy_only=False), bitorder="little")]
    bits = np.frombuffer(data, np.uint8, (n + 7) // 8, arr.offset // 8)
    if n % 8 == 0:
        return [bits]
    return [bits[:-1], bytes([int(bits[-1]) & ((1 << (n % 8)) - 1)])]


def _stored_checksum(path: str, meta: dict[str, Any]) -> str | None:
    """The metadata's checksum field, checked for form; ``None`` for a format 1 file (written before them)."""
    stored = meta.get("checksum")
    if stored is None:
        if meta["format_version"] >= 2:
            raise StateFileError(f"{path}: metadata lacks its checksum (format {meta['format_version']} files "
                                 f"carry one): the file was changed after writing")
        return None
    if not isinstance(stored, str) or not stored.startswith(_CHECKSUM_ALGORITHM + ":"):
        raise StateFileError(f"{path}: metadata field 'checksum' is {_short(stored)}, expected "
                             f"'{_CHECKSUM_ALGORITHM}:<hex>'")
    return stored


#: Values per step of the reader's scan (1 MB of float32): a step is hashed and range-checked while it is in
#: the CPU cache, so each byte of the file comes from memory once.
_SCAN_STEP = 1 << 18


def _scan(path: str, table: pa.Table, meta: dict[str, Any], *, verify: bool) -> None:
    """The checksum (with ``verify``) and every column's value range (``_RANGES``), in one pass over the file.

    The digest is the one ``checksum`` computes (the same bytes in the same order, fed in steps). A mismatch
    is reported before a value out of range, and among bad columns the first of ``_RANGES``.
    """
    stored = _stored_checksum(path, meta) if verify else None
    h = xxhash.xxh3_64() if stored is not None else None
    bad: set[str] = set()
    for name in table.column_names:
        if name not in _TYPES:
            continue
        limits = _RANGE_OF.get(name)
        if h is not None:
            h.update(name.encode() + b"\0")
        if limits is None:  # no range to check: the column's bytes only, hashed in large steps
            if h is not None:
                for part in _data_bytes(table.column(name)):
                    h.update(part)
            continue
        values = column_values(table, name)  # numeric: a view of the file
        for a in range(0, values.shape[0], _SCAN_STEP):
            step = values[a:a + _SCAN_STEP]
            if h is not None:
                h.update(step)
            if name not in bad and not _in_range(step, *limits):
                bad.add(name)
    if h is not None:
        body = {k: v for k, v in meta.items() if k != "checksum"}
        h.update(json.dumps(json.loads(json.dumps(body)), sort_keys=True).encode())
        got = f"{_CHECKSUM_ALGORITHM}:{h.hexdigest()}"
        if got != stored:
            raise StateFileError(f"{path}: checksum mismatch (stored {stored}, computed {got}): the file is "
                                 f"corrupted or was changed after writing")
    for name, lo, hi, nan_ok, allowed in _RANGES:
        if name in bad:
            _raise_out_of_range(path, name, column_values(table, name), lo, hi, nan_ok, allowed)


def _chunk(column: pa.ChunkedArray) -> pa.Array:
    # combine_chunks copies even a single chunk (10 ms per 40 MB column): a file this writes has one.
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def column_values(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy: zero-copy for numbers (a view of the memory map), one byte per value for booleans.

    A dictionary ``bucket`` gives its int8 codes viewed as uint8 (an older file's column is uint8 already).
    """
    arr = _chunk(table.column(name))
    if pa.types.is_dictionary(arr.type):
        return arr.indices.to_numpy(zero_copy_only=False).view(np.uint8)
    return arr.to_numpy(zero_copy_only=False)


#: Arrow type of every column a state file may hold.
_TYPES: dict[str, pa.DataType] = {name: pa.from_numpy_dtype(np.dtype(dtype))
                                  for name, dtype in [(c[0], c[1]) for c in COLUMNS] + list(PLAN_COLUMNS)}
_TYPES["id"] = pa.int64()
#: ``id`` is uint32 in files of under 2**32 samples (format 4), int64 past that and in format 3 files.
_ID_TYPES = (pa.uint32(), pa.int64())
_HISTORY_KEYS = frozenset(PartitionStats.__dataclass_fields__)
_HISTORY_INTS = ("epoch", "step", "freeze", "light", "focus", "hard", "pruned")


_F32_MAX = float(np.finfo(np.float32).max)
#: (column, lowest, highest, NaN allowed, what is allowed) for every value a reader or the policy relies on.
#: NaN marks an unseen sample's loss, EMA and confidence; nothing else may be NaN, and nothing may be inf.
_RANGES: tuple[tuple[str, float, float, bool, str], ...] = (
    ("loss", -_F32_MAX, _F32_MAX, True, "a finite number or NaN (unseen)"),
    ("loss_ema", -_F32_MAX, _F32_MAX, True, "a finite number or NaN (unseen)"),
    ("loss_var", 0.0, _F32_MAX, False, "a finite number >= 0"),
    ("confidence", 0.0, 1.0, True, "a number in [0, 1] or NaN (unseen)"),
    ("q", 0.0, 1.0, False, "a number in [0, 1]"),
    ("last_step", -1, 2**31 - 1, False, "an integer >= -1"),
    ("plan_count", 0, 1000, False, "an integer in [0, 1000] (max_repeats <= 1000)"),
    ("plan_weight", 0.0, _F32_MAX, False, "a finite number >= 0"),
)
_RANGE_OF = {name: (lo, hi, nan_ok) for name, lo, hi, nan_ok, _ in _RANGES}


def _in_range(v: np.ndarray, lo: float, hi: float, nan_ok: bool) -> bool:
    """Whether every value of ``v`` is within [lo, hi] (NaN too where ``nan_ok``): numpy's min and max
    (NaN-propagating), and the NaN-skipping reductions only where a NaN was found and is allowed."""
    low, high = v.min(), v.max()  # NaN if any is NaN
    if v.dtype.kind == "f" and nan_ok and (np.isnan(low) or np.isnan(high)):
        low, high = np.fmin.reduce(v), np.fmax.reduce(v)  # slower; NaN only when all are NaN
        return bool(np.isnan(low) or (low >= lo and high <= hi))
    return bool(low >= lo and high <= hi)  # False on NaN


def _raise_out_of_range(path: str, name: str, v: np.ndarray, lo: float, hi: float, nan_ok: bool,
                        allowed: str) -> None:
    """The error of a column known to hold a value out of its range, naming the first bad row."""
    bad = (v < lo) | (v > hi)
    if v.dtype.kind == "f" and not nan_ok:
        bad |= np.isnan(v)
    rows = np.flatnonzero(bad)
    raise StateFileError(f"{path}: column {name!r} holds {v[rows[0]].item()!r} at row {int(rows[0])} "
                         f"({rows.size:,} bad row{'s' if rows.size != 1 else ''}), expected {allowed}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(path: str, meta: dict[str, Any]) -> None:
    """The metadata fields readers use, so a hand-edited file fails here, named, and not in a format()."""
    for key, ok, allowed in (("config", lambda v: isinstance(v, dict), "an object"),
                             ("fingerprint", lambda v: isinstance(v, str), "a string"),
                             ("num_samples", _is_int, "an integer"),
                             ("epoch", _is_int, "an integer"), ("step", _is_int, "an integer"),
                             ("num_nonfinite", _is_int, "an integer")):
        v = meta.get(key)
        if v is not None and not ok(v):
            raise StateFileError(f"{path}: metadata field {key!r} is {_short(v)}, expected {allowed} or null")
    history = meta.get("history", [])
    if not isinstance(history, list):
        raise StateFileError(f"{path}: metadata field 'history' is {_short(history)}, expected a list of "
                             f"partitions")
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise StateFileError(f"{path}: history entry {i} is {_short(h)}, expected an object")
        if not _HISTORY_KEYS <= set(h):
            raise StateFileError(f"{path}: history entry {i} is not a partition record (lacks "
                                 f"{sorted(_HISTORY_KEYS - set(h))})")
        for key in _HISTORY_INTS:
            if not _is_int(h.get(key)):
                raise StateFileError(f"{path}: history entry {i} has {key}={_short(h.get(key))}, "
                                     f"expected an integer")
        if not isinstance(h.get("phase"), str):
            raise StateFileError(f"{path}: history entry {i} has phase={_short(h.get('phase'))}, "
                                 f"expected a string")
        loss = h.get("mean_loss")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise StateFileError(f"{path}: history entry {i} has mean_loss={_short(loss)}, "
                                 f"expected a number or null")


def _check_columns(path: str, table: pa.Table) -> None:
    """Types, nulls and bucket codes of every known column; at least one row."""
    if table.num_rows == 0:
        raise StateFileError(f"{path}: holds no samples")
    for name in table.column_names:
        want = _TYPES.get(name)
        if want is None:
            continue
        got = table.schema.field(name).type
        if name == "bucket" and got == BUCKET_TYPE:  # format 3; older files hold uint8 codes
            names = _chunk(table.column(name)).dictionary
            if not names.equals(_BUCKET_DICT):
                raise StateFileError(f"{path}: column 'bucket' has the values {names.to_pylist()}, expected "
                                     f"{list(policy.BUCKET_NAMES)}")
        elif name == "id" and got in _ID_TYPES:
            pass
        elif got != want:
            allowed = {"bucket": f"{want} or {BUCKET_TYPE}", "id": " or ".join(map(str, _ID_TYPES))}.get(name, str(want))
            raise StateFileError(f"{path}: column {name!r} has type {got}, expected {allowed}")
        nulls = table.column(name).null_count
        if nulls:
            raise StateFileError(f"{path}: column {name!r} has {nulls:,} null values, expected none")
    bucket = column_values(table, "bucket")  # a code below 0 in a dictionary column is above 127 here
    if bucket.max() > policy.HARD:
        bad = np.flatnonzero(bucket > policy.HARD)
        codes = ", ".join(f"{i} {n}" for i, n in enumerate(policy.BUCKET_NAMES))
        raise StateFileError(f"{path}: column 'bucket' holds code {int(bucket[bad[0]])} at id {int(bad[0])} "
                             f"({bad.size:,} sample{'s' if bad.size != 1 else ''}), expected 0-3 ({codes})")

"""Keys: the sample keys of a shard index as one Arrow string array, read as Python strings on demand.

An index of 100M samples holds 100M keys. As Python strings they cost about 70 bytes each, and a copy in
every process that holds the index; as an Arrow string array (an offsets buffer and one UTF-8 buffer) they
cost their bytes plus 4 a key, and when the index file is memory-mapped those buffers are the file's own
pages, shared by every process that maps it. A key becomes a ``str`` only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Keys"]

# Keys handed out per Arrow slice when iterating: bounded memory, amortised conversion cost.
_ITER_CHUNK = 1 << 16
#: ``Keys.take`` of at most this many ids slices them in Python rather than through Arrow.
_FEW = 16


class Keys(Sequence[str]):
    """The sample keys of an index, in id order: ``keys[i]`` is a ``str``; ``keys[ids]`` (an int or bool
    array, a list or a slice) is an object array of ``str`` (as a NumPy array of keys gave).

    Args:
        array: an Arrow ``string`` or ``large_string`` array without nulls (a one-chunk ``ChunkedArray`` is
            taken as its chunk, a longer one is combined, which copies). Build from Python strings with
            ``Keys.of``.
    """

    __slots__ = ("_array", "_offsets", "_data", "__weakref__")

    def __init__(self, array: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(array, pa.ChunkedArray):
            array = array.chunk(0) if array.num_chunks == 1 else _combine(array)
        if not isinstance(array, pa.Array) or not (pa.types.is_string(array.type)
                                                     or pa.types.is_large_string(array.type)):
            raise TypeError(f"`array` must be an Arrow string array, got {type(array).__name__} "
                            f"{getattr(array, 'type', '')}")
        if array.null_count:
            raise TypeError(f"`array` must hold no nulls, got {array.null_count}")
        self._array = array
        _validity, offsets, data = array.buffers()
        width = np.dtype(np.int64 if pa.types.is_large_string(array.type) else np.int32)
        # Views of the array's own buffers (the mapped file's pages when read from one): no copy.
        self._offsets = np.frombuffer(offsets, dtype=width, count=len(array) + 1, offset=array.offset * width.itemsize)
        self._data = memoryview(data) if data is not None else memoryview(b"")

    @classmethod
    def of(cls, keys: Iterable[str]) -> Keys:
        """Keys of Python strings (``large_string`` when they hold 2 GB or more)."""
        if isinstance(keys, Keys):
            return keys
        items = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        bad = next((k for k in items if not isinstance(k, str)), None)
        if bad is not None:
            raise TypeError(f"keys must be str, got {type(bad).__name__} {bad!r}")
        # pyarrow splits strings past int32 offsets into chunks; _combine makes them one large_string array.
        return cls(pa.array(items, type=pa.string()))

    @classmethod
    def concat(cls, parts: Sequence[Keys]) -> Keys:
        """The keys of ``parts`` one after another (one copy)."""
        arrays = [p.arrow for p in parts]
        if len({a.type for a in arrays}) > 1:  # a part of 2 GB or more of keys is large_string
            arrays = [a.cast(pa.large_string()) for a in arrays]
        return cls(pa.concat_arrays(arrays))

    @property
    def arrow(self) -> pa.Array:
        """The keys as the Arrow string array itself (zero-copy; for Arrow, DuckDB, ``pyarrow.compute``)."""
        return self._array

    def __len__(self) -> int:
        return len(self._array)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice | Sequence[int] | np.ndarray) -> np.ndarray: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
            n = len(self._array)
            j = int(i) + n if i < 0 else int(i)
            if not 0 <= j < n:
                raise IndexError(f"key index {int(i)} out of range for {n} keys")
            return str(self._data[self._offsets[j]:self._offsets[j + 1]], "utf-8")
        if isinstance(i, slice):
            return self._array[i].to_numpy(zero_copy_only=False)
        return self.take(i, as_list=False)

    def take(self, ids: Sequence[int] | np.ndarray, *, as_list: bool = True) -> Any:
        """The keys of ``ids`` (ints, negatives from the end, or a bool mask of ``len(self)``) as a list of
        ``str`` (or, with ``as_list=False``, an object array); IndexError naming an id out of range."""
        ids = np.asarray(ids)
        n = len(self._array)
        if ids.dtype == np.bool_:
            if ids.shape != (n,):
                raise IndexError(f"a boolean key mask must have shape ({n},), got {ids.shape}")
            ids = np.flatnonzero(ids)
        elif ids.dtype.kind not in "iu":
            if ids.size:
                raise IndexError(f"keys are indexed by ints, got an array of {ids.dtype}")
            ids = ids.astype(np.int64)
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -n or hi >= n:
                raise IndexError(f"key index {lo if lo < -n else hi} out of range for {n} keys")
            if lo < 0:
                ids = np.where(ids < 0, ids + n, ids)
        if as_list and ids.size <= _FEW:  # Arrow's take costs ~30 us a call: a few keys are sliced directly
            flat, data = ids.reshape(-1).astype(np.int64, copy=False), self._data  # flat + 1 must not wrap
            return [str(data[a:b], "utf-8") for a, b in zip(self._offsets[flat].tolist(),
                                                             self._offsets[flat + 1].tolist())]
        got = self._array.take(ids.reshape(-1))
        return got.to_pylist() if as_list else got.to_numpy(zero_copy_only=False).reshape(ids.shape)

    def positions(self, keys: Iterable[str]) -> np.ndarray:
        """The id of each of ``keys`` (int64, -1 for a key not in the index). Builds a hash table of all keys
        per call: look many up at once."""
        query = pa.array(list(keys), type=self._array.type)
        found = pc.index_in(query, value_set=self._array)
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def where(self, key: str) -> np.ndarray:
        """The ids (int64) whose key is ``key``, in order."""
        return np.flatnonzero(self == key)

    def first_duplicate(self) -> str | None:
        """The smallest key held twice, or None when all keys are unique."""
        arr, n = self._array, len(self._array)
        if n < 2:
            return None
        # Writers mostly emit keys in increasing order: one vectorised comparison then proves uniqueness
        # without a hash table of N keys (at 10M keys: 0.2 s instead of 10 s, and no GB-sized table).
        if pc.all(pc.less(arr.slice(0, n - 1), arr.slice(1))).as_py():
            return None
        if len(pc.unique(arr)) == n:
            return None
        counts = pc.value_counts(arr)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        return pc.min(dup).as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._array), _ITER_CHUNK):
            yield from self._array.slice(start, _ITER_CHUNK).to_pylist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._array.to_numpy(zero_copy_only=False)
        return out if dtype is None else out.astype(dtype)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and pc.any(pc.equal(self._array, key)).as_py() is True

    def __eq__(self, other: object) -> Any:
        """Keys == Keys: the same keys in the same order (a bool). Keys == str: a bool array, one per key (as
        a NumPy array of keys compares)."""
        if isinstance(other, str):
            return pc.equal(self._array, other).to_numpy(zero_copy_only=False)
        return isinstance(other, Keys) and self._array.equals(other._array)

    def __ne__(self, other: object) -> Any:
        same = self == other
        return ~same if isinstance(same, np.ndarray) else not same

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        # By value as Arrow buffers (offsets + bytes), never as N Python strings.
        return Keys, (self._array,)

    def __repr__(self) -> str:
        first = f", first {self[0]!r}" if len(self) else ""
        return f"Keys({len(self):,} keys{first})"


def _combine(chunks: pa.ChunkedArray) -> pa.Array:
    """One array of ``chunks`` (a copy); ``large_string`` when the keys hold 2 GB or more."""
    try:
        return chunks.combine_chunks()
    except (pa.ArrowCapacityError, pa.ArrowInvalid, OverflowError):
        return pa.chunked_array([c.cast(pa.large_string()) for c in chunks.chunks]).combine_chunks()

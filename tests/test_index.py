"""The shard index as a memory-mapped file: keys as Arrow strings, zero-copy columns, pickles that name the
file (not its arrays), spawned DataLoader workers that map it, and the row checks on hostile files."""

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
from conftest import SHARD_SIZES, sample_for
from torch.utils.data import DataLoader

from geko_data import shards as sh
from geko_data.config import GEKOConfig
from geko_data.shards import ShardError, index_shards, read_index, write_shards
from geko_data.stream import GEKOStream

N = sum(SHARD_SIZES)
QUIET = GEKOConfig(log_bucket_stats=False)


def _mapped_ranges(path):
    """(start, end) of this process's mappings of the file ``path`` (from /proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _inside(address, ranges):
    return any(lo <= address < hi for lo, hi in ranges)


# ---------------------------------------------------------------------- Keys
def test_keys_read_as_str_by_int_array_mask_and_slice():
    from geko_data.keys import Keys

    k = Keys.of(["a", "bb", "ccc", "ü/x"])
    assert len(k) == 4 and k[0] == "a" and k[-1] == "ü/x" and k[np.int64(2)] == "ccc"
    assert isinstance(k[1], str) and list(k) == ["a", "bb", "ccc", "ü/x"]
    assert k[np.array([3, 0])].tolist() == ["ü/x", "a"] and k[[-1]].tolist() == ["ü/x"]
    assert k[np.array([True, False, True, False])].tolist() == ["a", "ccc"] and k[1:3].tolist() == ["bb", "ccc"]
    assert k.take(np.array([2, 2])) == ["ccc", "ccc"] and k.take([]) == []
    many = Keys.of([f"k{i}/ü" for i in range(40)])  # a few ids are sliced in Python, more go through Arrow
    for ids in ([3, -1, 0], list(range(-20, 20)), np.array([[1, 2], [3, -40]])):
        assert many.take(ids) == [f"k{i % 40}/ü" for i in np.ravel(ids)]
    for dtype in (np.uint8, np.int8):  # the last key's end offset is at id + 1, past the dtype's range
        wide = Keys.of([f"k{i}" for i in range(128)])
        assert wide.take(np.array([127], dtype=dtype)) == ["k127"]
    assert k.positions(["ccc", "nope", "a"]).tolist() == [2, -1, 0]
    assert k.where("bb").tolist() == [1] and (k == "bb").tolist() == [False, True, False, False]
    assert "ccc" in k and "cc" not in k and 3 not in k and (k != "a").tolist() == [False, True, True, True]
    for bad in (4, -5):
        with pytest.raises(IndexError, match=f"key index {bad} out of range for 4 keys"):
            k[bad]
    with pytest.raises(IndexError, match="key index 9 out of range"):
        k.take([0, 9])
    with pytest.raises(IndexError, match="ints, got an array of float64"):
        k[np.array([0.5])]
    with pytest.raises(TypeError, match="keys must be str, got int 3"):
        Keys.of(["a", 3])
    assert pickle.loads(pickle.dumps(k)) == k and k != Keys.of(["a"])


def test_first_duplicate_sorted_unsorted_and_across_parts():
    from geko_data.keys import Keys

    assert Keys.of([f"k{i:04d}" for i in range(1000)]).first_duplicate() is None  # sorted: no hash table
    assert Keys.of(["z", "b", "a"]).first_duplicate() is None
    assert Keys.of(["z", "b", "z", "a", "b"]).first_duplicate() == "b"  # the smallest key held twice
    joined = Keys.concat([Keys.of(["a", "b"]), Keys(pa.array(["c", "a"], pa.large_string()))])
    assert list(joined) == ["a", "b", "c", "a"] and joined.first_duplicate() == "a"


# ---------------------------------------------------------------------- the mapped file
def test_read_index_maps_keys_and_columns_without_copies(shards):
    path = shards / "index.arrow"
    idx = read_index(path)
    maps = _mapped_ranges(path)
    assert maps, "the index file is not memory-mapped"
    for name in ("shard", "offset", "length", "hashes"):
        assert _inside(getattr(idx, name).ctypes.data, maps), f"{name} is a copy, not a view of the file"
    offsets, data = idx.keys.arrow.buffers()[1:]
    assert _inside(offsets.address, maps) and _inside(data.address, maps), "keys are a copy"
    assert idx.keys[5] == "s1_000" and len(idx.keys) == N


def test_pickled_file_backed_index_is_small_and_maps_the_same_file(tmp_path):
    samples = [{"__key__": f"key-{i:06d}", "txt": b"x" * 10} for i in range(20_000)]
    built = write_shards(samples, str(tmp_path / "shard-%03d.tar"), maxcount=5_000)
    idx = read_index(tmp_path)
    by_value = pickle.dumps(built)  # built in memory: by value, its keys as Arrow buffers
    blob = pickle.dumps(idx)
    assert len(by_value) > 20_000 * 30 and len(blob) < 2_000, (len(by_value), len(blob))
    again = pickle.loads(blob)
    assert again.fingerprint == idx.fingerprint and again.shards == idx.shards and again.sizes == idx.sizes
    assert again.keys == idx.keys and again.keys[19_999] == "key-019999"
    for name in ("shard", "offset", "length", "hashes"):
        assert np.array_equal(getattr(again, name), getattr(built, name))
    assert _inside(again.offset.ctypes.data, _mapped_ranges(tmp_path / "index.arrow"))
    assert pickle.loads(pickle.dumps(again)) is again  # one mapping per file and process


def test_in_memory_index_pickles_by_value_and_survives_its_files(tmp_path):
    built = write_shards([{"__key__": f"k{i}", "txt": b"y"} for i in range(30)], str(tmp_path / "s-%03d.tar"),
                         maxcount=7)
    again = pickle.loads(pickle.dumps(built))
    os.remove(tmp_path / "index.arrow")
    again = pickle.loads(pickle.dumps(again))
    assert list(again.keys) == [f"k{i}" for i in range(30)] and again.fingerprint == built.fingerprint
    assert np.array_equal(again.offset, built.offset) and np.array_equal(again.hashes, built.hashes)


@pytest.mark.parametrize("change", ["rewritten", "touched", "removed"])
def test_a_changed_index_file_between_pickle_and_unpickle_is_refused(shards, change):
    path = shards / "index.arrow"
    blob = pickle.dumps(read_index(path))
    if change == "rewritten":  # the same shards indexed again: renamed into place, another inode
        index_shards(sorted(str(p) for p in shards.glob("*.tar")), output=str(path))
    elif change == "touched":
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    else:
        os.remove(path)
    match = "cannot be opened again" if change == "removed" else "changed since it was read"
    with pytest.raises(ShardError, match=match):
        pickle.loads(blob)


def test_read_index_over_a_changing_file_checks_it_again(shards):
    """An index read again after its file changed is checked again (the per-process mapping is by identity)."""
    path = shards / "index.arrow"
    first = read_index(path)
    index_shards(sorted(str(p) for p in shards.glob("*.tar")), output=str(path))
    second = read_index(path)
    assert second.fingerprint == first.fingerprint and second._file != first._file


# ---------------------------------------------------------------------- spawned DataLoader workers
def _assert_mapped_in_worker(worker_id):
    from torch.utils.data import get_worker_info

    index = get_worker_info().dataset.index
    assert index._file is not None, "the worker received the index's arrays, not its file"
    assert _inside(index.offset.ctypes.data, _mapped_ranges(index._file.path)), "the worker copied the offsets"


def _as_list(batch):
    return batch


@pytest.mark.timeout(300)
def test_spawned_workers_map_the_index_and_read_the_same_samples(shards):
    def read(num_workers):
        s = GEKOStream(shards, total_epochs=1, config=QUIET, seed=3, batch_size=4)
        kw = {"multiprocessing_context": "spawn", "worker_init_fn": _assert_mapped_in_worker} if num_workers else {}
        loader = DataLoader(s, batch_size=4, num_workers=num_workers, collate_fn=_as_list, **kw)
        s.set_epoch(0)
        return [(x["__index__"], x["__key__"], x["json"], x["txt"]) for b in loader for x in b]

    alone, spawned = read(0), read(2)
    assert spawned == alone  # the same samples in the same order, read through the workers' mapped index
    assert sorted(i for i, *_ in spawned) == list(range(N))
    written = {s["__key__"]: s for shard, n in enumerate(SHARD_SIZES) for s in (sample_for(shard, i) for i in range(n))}
    for _i, key, js, txt in spawned:
        assert js == written[key]["json"] and txt == written[key]["txt"]


# ---------------------------------------------------------------------- row checks of hostile files
def _rewrite(path, **columns):
    """The index at ``path`` with ``columns`` replaced (metadata and fingerprint kept: they do not cover them)."""
    table = pa.ipc.open_file(str(path)).read_all()
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_a_byte_range_whose_end_overflows_int64_is_refused(shards):
    path = shards / "index.arrow"
    idx = read_index(path)
    offset, length = np.array(idx.offset), np.array(idx.length)
    offset[-1], length[-1] = 1 << 62, 1 << 62  # offset + length wraps to a negative int64
    _rewrite(path, offset=offset, length=length)
    with pytest.raises(ShardError, match=rf"row {N - 1} .*offset={1 << 62} length={1 << 62}, outside shard"):
        read_index(path)


def test_shard_numbers_that_do_not_fit_int32_are_refused(shards):
    path = shards / "index.arrow"
    shard = np.array(read_index(path).shard, dtype=np.int64)
    shard[:5] += 1 << 32  # would wrap to valid shard numbers if cast blindly
    _rewrite(path, shard=shard)
    with pytest.raises(ShardError, match="column 'shard' holds values outside int32"):
        read_index(path)


def test_rows_are_checked_across_check_steps(shards, monkeypatch):
    """The row checks run a step of rows at a time: an overlap across a step boundary is still found."""
    monkeypatch.setattr(sh, "_CHECK_STEP", 4)
    path = shards / "index.arrow"
    read_index(path)
    offset = np.array(read_index(path).offset)
    offset[8] = offset[7]  # rows 7 and 8 (shard 1): row 8 starts where row 7 does
    _rewrite(path, offset=offset)
    with pytest.raises(ShardError, match="rows 7 and 8 .* overlap or are out of file order"):
        read_index(path)


def test_duplicate_keys_in_a_file_are_refused_naming_the_key(shards):
    path = shards / "index.arrow"
    keys = list(read_index(path).keys)
    keys[30] = keys[3]
    _rewrite(path, key=keys)
    with pytest.raises(ShardError, match="duplicate key 's0_003'"):
        read_index(path)


def test_index_of_another_integer_type_is_read_by_value(shards):
    path = shards / "index.arrow"
    want = read_index(path)
    offset, shard = np.array(want.offset), np.array(want.shard)  # copies: `want` maps the file rewritten below
    _rewrite(path, offset=offset.astype(np.uint32), shard=shard.astype(np.int64))
    got = read_index(path)
    assert got.offset.dtype == np.int64 and got.shard.dtype == np.int32
    assert np.array_equal(got.offset, offset) and np.array_equal(got.shard, shard)

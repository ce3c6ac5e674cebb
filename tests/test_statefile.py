"""The state file format (geko_data.statefile): writing, the one validating reader, the checksum."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.state import SampleState
from geko_data.statefile import (COLUMNS, OPTIONAL_COLUMNS, FingerprintError, StateFileError, fingerprint_of,
                                 read_table)

#: The columns a state that was never given answers writes.
WRITTEN = [c[0] for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS]


def _filled(n=300, seed=0):
    rng = np.random.default_rng(seed)
    s = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2),
                    fingerprint="abc")
    for e in range(3):
        ids = rng.integers(0, n, 400)
        s.report(ids, rng.exponential(0.5, 400), step=e * 10)
        s.repartition((e + 0.5) / 3)
    return s


def test_file_opens_with_pyarrow_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    s = _filled()
    path = tmp_path / "state.arrow"
    s.save(path)
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.column_names == ["id"] + WRITTEN
    meta = json.loads(table.schema.metadata[b"geko_data"])
    assert meta["format_version"] == 5 and len(meta["history"]) == 3
    state_table = table  # noqa: F841 - DuckDB finds the pyarrow table by its variable name
    rows = duckdb.sql("SELECT bucket, count(*) AS n FROM state_table GROUP BY bucket ORDER BY bucket").fetchall()
    assert sum(n for _, n in rows) == 300
    assert dict(rows) == {policy.BUCKET_NAMES[b]: int(n) for b, n in zip(*np.unique(s.bucket, return_counts=True))}


def test_bad_files(tmp_path):
    s = _filled(50)
    good = tmp_path / "good.arrow"
    s.save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.arrow").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.arrow").write_bytes(b"hello world" * 10)
    foreign = tmp_path / "foreign.arrow"
    with pa.OSFile(str(foreign), "wb") as f, pa.ipc.new_file(f, pa.schema([("a", pa.int64())])) as w:
        w.write_table(pa.table({"a": [1, 2]}))
    for name in ("trunc.arrow", "text.arrow", "foreign.arrow"):
        with pytest.raises(StateFileError, match=name):
            SampleState.load(tmp_path / name)
    newer = s.to_arrow()
    meta = json.loads(newer.schema.metadata[b"geko_data"])
    meta["format_version"] = 99
    newer = newer.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()})
    with pa.OSFile(str(tmp_path / "newer.arrow"), "wb") as f, pa.ipc.new_file(f, newer.schema) as w:
        w.write_table(newer)
    with pytest.raises(StateFileError, match="newer"):
        SampleState.load(tmp_path / "newer.arrow")
    with pytest.raises(FingerprintError, match="other data"):
        SampleState.load(good, expect_fingerprint="xyz")
    with pytest.raises(FileNotFoundError):
        SampleState.load(tmp_path / "missing.arrow")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    s = _filled(50)
    path = tmp_path / "state.arrow"
    s.save(path)
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def broken_write(self, table):
        raise Boom("disk full")

    monkeypatch.setattr(pa.ipc.RecordBatchFileWriter, "write_table", broken_write)
    with pytest.raises(Boom):
        s.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.arrow"]  # no temp file left behind


def test_read_table_selects_columns(tmp_path):
    s = _filled(20)
    s.save(tmp_path / "s.arrow")
    table, meta = read_table(tmp_path / "s.arrow", columns=["bucket"])
    assert table.column_names == ["bucket"] and meta["num_samples"] == 20


def _write_with(tmp_path, name, table):
    path = tmp_path / name
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def _with_meta(table, **changes):
    meta = json.loads(table.schema.metadata[b"geko_data"])
    meta.update(changes)
    return table.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()})


def test_hostile_metadata_and_columns_are_named_errors(tmp_path):
    table = _filled(50).to_arrow()
    cases = {
        "list_meta.arrow": table.replace_schema_metadata({b"geko_data": b"[1, 2]"}),
        "bad_history.arrow": _with_meta(table, history=[{"epoch": 0}]),
        "history_not_list.arrow": _with_meta(table, history="x"),
        "bad_step.arrow": _with_meta(table, step="three"),
        "bucket9.arrow": table.set_column(table.column_names.index("bucket"), "bucket",
                                          pa.array(np.full(50, 9, np.uint8))),
        "int64_bucket.arrow": table.set_column(table.column_names.index("bucket"), "bucket",
                                               pa.array(np.zeros(50, np.int64))),
        "string_loss.arrow": table.set_column(table.column_names.index("loss"), "loss", pa.array(["x"] * 50)),
    }
    for name, bad in cases.items():
        path = _write_with(tmp_path, name, bad)
        with pytest.raises(StateFileError, match=name):
            SampleState.load(path)
        with pytest.raises(StateFileError, match=name):
            read_table(path)


def test_duckdb_describes_the_documented_columns(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _filled(20).save(tmp_path / "state.arrow")
    state = pa.ipc.open_file(str(tmp_path / "state.arrow")).read_all()  # noqa: F841 - DuckDB reads it by name
    described = duckdb.sql("DESCRIBE SELECT * FROM state").fetchall()
    assert [row[0] for row in described] == ["id"] + WRITTEN
    types = {row[0]: row[1] for row in described}
    assert types["bucket"] == "VARCHAR" and types["id"] == "UINTEGER" and types["loss"] == "FLOAT" and types["pruned"] == "BOOLEAN"


# ---------------------------------------------------------------------- trust of the file's contents
def _arrays(s):
    out = {name: getattr(s, name).copy() for name, _, _ in COLUMNS}
    if s.plan is not None:
        out["plan_count"], out["plan_weight"] = s.plan.counts.copy(), s.plan.loss_weight.copy()
    return out


def _same(a, b):
    assert (a.epoch, a.step, a.num_nonfinite, a.fingerprint, a.history) == (b.epoch, b.step, b.num_nonfinite,
                                                                             b.fingerprint, b.history)
    assert a.config == b.config
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.mark.parametrize("name,value,row", [("q", np.nan, 3), ("confidence", 7.0, 0), ("loss_var", -1.0, 5),
                                            ("loss", np.inf, 2), ("q", 1.5, 9), ("last_step", -7, 4)])
def test_values_out_of_range_are_refused_naming_column_and_row(tmp_path, name, value, row):
    s = _filled(20)
    getattr(s, name)[row] = value  # saved with a valid checksum: only the range check can refuse it
    s.save(tmp_path / "s.arrow")
    with pytest.raises(StateFileError, match=rf"s\.arrow: column '{name}' holds .* at row {row} "):
        SampleState.load(tmp_path / "s.arrow")


def test_plan_count_65535_and_nan_plan_weight_are_refused(tmp_path):
    from geko_data.plan import epoch_plan

    s = _filled(20)
    s.plan = epoch_plan(s, seed=0, epoch=0, total_epochs=2)
    s.plan.counts[4] = 65535
    s.save(tmp_path / "count.arrow")
    with pytest.raises(StateFileError, match=r"column 'plan_count' holds 65535 at row 4"):
        SampleState.load(tmp_path / "count.arrow")
    s.plan.counts[4] = 1
    s.plan.loss_weight[6] = np.nan
    s.save(tmp_path / "weight.arrow")
    with pytest.raises(StateFileError, match=r"column 'plan_weight' holds nan at row 6"):
        SampleState.load(tmp_path / "weight.arrow")


def test_unseen_nan_columns_are_fine(tmp_path):
    s = SampleState(5)  # loss, loss_ema and confidence are NaN until reported
    s.save(tmp_path / "s.arrow")
    assert np.isnan(SampleState.load(tmp_path / "s.arrow").confidence).all()


def test_a_flipped_byte_in_the_columns_is_refused_by_the_checksum(tmp_path):
    s = _filled(50)
    s.save(tmp_path / "s.arrow")
    data = bytearray((tmp_path / "s.arrow").read_bytes())
    # The first float32 of `loss_ema`: a changed value that is still in range, so only the checksum sees it.
    target = np.float32(s.loss_ema[0]).tobytes()
    at = bytes(data).index(target)
    data[at] ^= 0x01
    (tmp_path / "s.arrow").write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        SampleState.load(tmp_path / "s.arrow")
    with pytest.raises(StateFileError, match="checksum mismatch"):
        read_table(tmp_path / "s.arrow", memory_map=False)
    # verify=False (documented: a quick look at a trusted file) skips only the checksum.
    assert SampleState.load(tmp_path / "s.arrow", verify=False).loss_ema[0] != s.loss_ema[0]


def test_edited_metadata_is_refused_by_the_checksum(tmp_path):
    table = _filled(30).to_arrow()
    path = _write_with(tmp_path, "edited.arrow", _with_meta(table, step=12345))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        SampleState.load(path)
    meta = json.loads(table.schema.metadata[b"geko_data"])
    del meta["checksum"]
    path = _write_with(tmp_path, "stripped.arrow", table.replace_schema_metadata(
        {b"geko_data": json.dumps(meta).encode()}))
    with pytest.raises(StateFileError, match="lacks its checksum"):
        SampleState.load(path)


def test_format_1_files_without_checksum_still_load(tmp_path):
    # Files written before checksums (format 1) load unverified, with every other check; the next save
    # writes format 2 with a checksum.
    s = _filled(30)
    table = s.to_arrow()
    meta = json.loads(table.schema.metadata[b"geko_data"])
    del meta["checksum"]
    meta["format_version"] = 1
    path = _write_with(tmp_path, "v1.arrow", table.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()}))
    t = SampleState.load(path)
    _same(s, t)
    t.save(tmp_path / "v2.arrow")
    assert read_table(tmp_path / "v2.arrow")[1]["checksum"].startswith("xxh3_64:")
    # A format 1 file that does carry a checksum has it checked.
    meta["checksum"] = "xxh3_64:0000000000000000"
    path = _write_with(tmp_path, "v1sum.arrow", table.replace_schema_metadata(
        {b"geko_data": json.dumps(meta).encode()}))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        SampleState.load(path)


@pytest.mark.timeout(120)
def test_fuzz_every_small_corruption_is_refused_or_harmless(tmp_path):
    # Seeded: 400 corruptions (1-3 random bytes set to random values, or one bit flipped) of a small state
    # file with a plan. Each must raise StateFileError or load exactly the saved values and metadata.
    from geko_data.plan import epoch_plan

    s = _filled(40)
    s.plan = epoch_plan(s, seed=1, epoch=3, total_epochs=5)
    s.fingerprint = "fp-1"
    s.save(tmp_path / "good.arrow")
    good = (tmp_path / "good.arrow").read_bytes()
    rng = np.random.default_rng(1234)
    path = tmp_path / "bad.arrow"
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(400):
        data = bytearray(good)
        if trial % 2:
            at = int(rng.integers(len(data)))
            data[at] ^= 1 << int(rng.integers(8))
        else:
            for at in rng.integers(len(data), size=int(rng.integers(1, 4))):
                data[int(at)] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        for memory_map in (True, False):
            try:
                t = SampleState.load(path, memory_map=memory_map)
            except StateFileError:
                outcomes["refused"] += 1
                continue
            _same(s, t)
            outcomes["identical"] += 1
    assert outcomes["refused"] > 500  # most bytes matter; the rest (padding, unused flags) change nothing


def test_deeply_nested_metadata_is_a_state_file_error(tmp_path):
    table = _filled(10).to_arrow()
    deep = b'{"format_version": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = _write_with(tmp_path, "deep.arrow", table.replace_schema_metadata({b"geko_data": deep}))
    with pytest.raises(StateFileError, match="deep.arrow.*nested too deep"):
        SampleState.load(path)


def unblock_fifo_later(fifo, seconds=10.0):
    """A timer that opens ``fifo`` for writing, so that a reader blocked in open() (which no signal
    interrupts, so the test timeout cannot either) returns and the test fails instead of hanging."""
    import threading

    def release():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing is blocked
            pass

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_at_once(tmp_path):
    import time

    fifo = tmp_path / "state.arrow"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    timer = unblock_fifo_later(fifo)
    start = time.monotonic()
    try:
        with pytest.raises(StateFileError, match="state.arrow: not a regular file \\(a FIFO\\)"):
            SampleState.load(fifo)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    with pytest.raises(StateFileError, match="a directory"):
        read_table(tmp_path)


def test_fingerprint_of_keys():
    a = fingerprint_of(["x", "y", "z"])
    assert a == fingerprint_of(iter(["x", "y", "z"])) and a.startswith("keys-3-")
    assert a != fingerprint_of(["x", "z", "y"])  # order matters: ids index the state
    assert fingerprint_of(["ab", "c"]) != fingerprint_of(["a", "bc"])
    assert fingerprint_of(range(3)) == fingerprint_of(["0", "1", "2"])
    with pytest.raises(ValueError, match="keys"):
        fingerprint_of([])
    # One string is not a list of keys: it fingerprinted each character as a sample ('keys-3-...').
    for one in ("abc", b"abc"):
        with pytest.raises(TypeError, match=r"`keys` must be one key a sample .*got 'abc'|got b'abc'"):
            fingerprint_of(one)


def test_bucket_is_a_dictionary_of_names_and_older_uint8_files_still_load(tmp_path):
    s = _filled(60)
    s.save(tmp_path / "new.arrow")
    table = pa.ipc.open_file(str(tmp_path / "new.arrow")).read_all()
    assert pa.types.is_dictionary(table.schema.field("bucket").type)
    assert table.column("bucket").to_pylist() == [policy.BUCKET_NAMES[b] for b in s.bucket]
    assert table.column("id").to_pylist() == list(range(60))
    # A format 2 file: bucket as uint8 codes, no id column, its checksum over the same code bytes.
    old = table.drop_columns(["id"]).set_column(
        table.column_names.index("bucket") - 1, "bucket", pa.array(s.bucket.copy()))
    meta = json.loads(table.schema.metadata[b"geko_data"])
    meta["format_version"] = 2
    from geko_data.statefile import checksum
    meta["checksum"] = checksum(old, meta)
    path = _write_with(tmp_path, "old.arrow", old.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()}))
    t = SampleState.load(path)
    assert np.array_equal(t.bucket, s.bucket) and t.bucket.dtype == np.uint8
    # The new file's checksum covers the codes: one flipped code is refused.
    codes = table.column("bucket").combine_chunks().indices.to_numpy().copy()
    codes[3] = (codes[3] + 1) % 4
    forged = table.set_column(table.column_names.index("bucket"), "bucket",
                              pa.DictionaryArray.from_arrays(pa.array(codes), table.column("bucket").chunk(0).dictionary))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        SampleState.load(_write_with(tmp_path, "forged.arrow", forged))
    renamed = table.set_column(table.column_names.index("bucket"), "bucket", pa.DictionaryArray.from_arrays(
        pa.array(codes), pa.array(["A", "B", "C", "D"])))
    with pytest.raises(StateFileError, match="column 'bucket' has the values"):
        SampleState.load(_write_with(tmp_path, "renamed.arrow", renamed))


@pytest.mark.parametrize("code", [7, -1])
def test_dictionary_bucket_code_outside_the_names_is_refused(tmp_path, code):
    table = _filled(40).to_arrow()
    codes = table.column("bucket").combine_chunks().indices.to_numpy().copy()
    codes[9] = code
    bad = table.set_column(table.column_names.index("bucket"), "bucket", pa.DictionaryArray.from_arrays(
        pa.array(codes), table.column("bucket").chunk(0).dictionary, safe=False))
    with pytest.raises(StateFileError, match=r"column 'bucket' holds code \d+ at id 9"):
        SampleState.load(_write_with(tmp_path, "bad.arrow", bad), verify=False)


def test_state_table_and_write_table_round_trip_without_a_sample_state(tmp_path):
    from geko_data.statefile import column_values, state_table, write_table

    cols = {name: np.full(4, init, dtype) for name, dtype, init in COLUMNS}
    table = state_table(cols, {"num_samples": 4, "config": GEKOConfig().to_dict()})
    write_table(tmp_path / "t.arrow", table)
    back, meta = read_table(tmp_path / "t.arrow")
    assert meta["format_version"] == 5 and meta["checksum"].startswith("xxh3_64:")
    assert back.column("bucket").to_pylist() == ["FOCUS"] * 4
    assert column_values(back, "last_step").tolist() == [-1] * 4
    cols["q"] = cols["q"].astype(np.float64)
    with pytest.raises(ValueError, match="column 'q' must be float32, got float64"):
        state_table(cols, {"num_samples": 4})


def test_the_reader_scans_in_steps_and_still_finds_every_bad_value(tmp_path, monkeypatch):
    """The reader hashes and range-checks each column in steps (``_SCAN_STEP``) while they are in cache: a
    bad value in a later step of a column that holds NaN (unseen samples) in every step is still found, named
    at its row, and the digest is the writer's (a file with no bad value loads)."""
    from geko_data import statefile

    monkeypatch.setattr(statefile, "_SCAN_STEP", 16)
    s = SampleState(100)
    s.report(np.arange(0, 100, 2), np.full(50, 0.5, np.float32))  # odd ids unseen: NaN in every step
    s.save(tmp_path / "ok.arrow")
    np.testing.assert_array_equal(SampleState.load(tmp_path / "ok.arrow").loss, s.loss)
    s.confidence[86] = 3.0
    s.loss_var[90] = -1.0
    s.save(tmp_path / "bad.arrow")  # a valid checksum: only the range checks can refuse it
    with pytest.raises(StateFileError, match=r"column 'loss_var' holds -1.0 at row 90 "):
        SampleState.load(tmp_path / "bad.arrow")  # loss_var comes before confidence in the file's order
    s.loss_var[90] = 0.0
    s.save(tmp_path / "bad.arrow")
    with pytest.raises(StateFileError, match=r"column 'confidence' holds 3.0 at row 86 "):
        SampleState.load(tmp_path / "bad.arrow", verify=False)
    SampleState(100).save(tmp_path / "fresh.arrow")
    data = bytearray((tmp_path / "fresh.arrow").read_bytes())
    at = bytes(data).index(np.float32(0.5).tobytes() * 100)  # q: 0.5 everywhere, a flip stays in range
    data[at + 4 * 70] ^= 0x01
    (tmp_path / "fresh.arrow").write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        SampleState.load(tmp_path / "fresh.arrow")


def test_id_is_uint32_and_format_3_files_with_int64_ids_still_load(tmp_path):
    """Format 4 writes ``id`` as uint32 (4 bytes a sample less than int64 under 2**32 samples); DuckDB joins
    it with a user's int64 ids, and a format 3 file (int64 ``id``, checksum over its 8-byte values) loads."""
    duckdb = pytest.importorskip("duckdb")
    s = _filled(60)
    s.save(tmp_path / "new.arrow")
    table = pa.ipc.open_file(str(tmp_path / "new.arrow")).read_all()
    assert table.schema.field("id").type == pa.uint32()
    assert table.column("id").to_pylist() == list(range(60))
    state_table = table  # noqa: F841 - DuckDB finds the tables by their variable names
    users = pa.table({"id": pa.array(np.arange(0, 60, 7, dtype=np.int64)), "text": [f"t{i}" for i in range(0, 60, 7)]})
    rows = duckdb.sql("SELECT u.text, s.times_seen FROM users u JOIN state_table s USING (id) ORDER BY u.id").fetchall()
    assert rows == [(f"t{i}", int(s.times_seen[i])) for i in range(0, 60, 7)]
    old = table.set_column(0, "id", pa.array(np.arange(60, dtype=np.int64)))
    meta = json.loads(table.schema.metadata[b"geko_data"])
    meta["format_version"] = 3
    from geko_data.statefile import checksum
    meta["checksum"] = checksum(old, meta)
    t = SampleState.load(_write_with(tmp_path, "v3.arrow", old.replace_schema_metadata(
        {b"geko_data": json.dumps(meta).encode()})))
    assert np.array_equal(t.loss, s.loss, equal_nan=True) and np.array_equal(t.bucket, s.bucket)
    other = table.set_column(0, "id", pa.array(np.arange(60, dtype=np.int32)))
    with pytest.raises(StateFileError, match="column 'id' has type int32, expected uint32 or int64"):
        SampleState.load(_write_with(tmp_path, "i32.arrow", other), verify=False)


def test_save_makes_no_array_of_ids_and_writes_them_into_the_file(tmp_path):
    """save writes the ``id`` column into the file a step at a time (an (N,) array of ids was 4 bytes a sample
    of fresh memory on every save); the file is to_arrow()'s, checksum included, ids 0..N-1 across steps."""
    import tracemalloc

    from geko_data import statefile
    from geko_data.plan import EpochPlan

    n = 3_000_017
    s = SampleState(n)
    s.loss[::3] = 0.25
    s.plan = EpochPlan(epoch=0, progress=0.1, counts=np.ones(n, np.uint16), loss_weight=np.ones(n, np.float32))
    path = tmp_path / "s.arrow"
    tracemalloc.start()
    try:
        s.save(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6_000_000  # one step of ids (4 MB) and the metadata, not the 12 MB of 3M ids
    table, meta = read_table(path)
    assert np.array_equal(table.column("id").to_numpy(), np.arange(n)) and table.column("id").type == pa.uint32()
    assert meta["checksum"] == statefile.checksum(s.to_arrow(), meta) and SampleState.load(path).loss[3] == 0.25


def test_answers_round_trip_and_format_4_files_without_them_load_with_answer_0(tmp_path):
    s = _filled(50)
    s.report(np.arange(50), np.full(50, 0.3), answer=np.arange(50) % 3 + 2**31)
    s.save(tmp_path / "new.arrow")
    table = pa.ipc.open_file(str(tmp_path / "new.arrow")).read_all()
    assert table.schema.field("answer").type == pa.uint32()
    t = SampleState.load(tmp_path / "new.arrow")
    np.testing.assert_array_equal(t.answer, np.arange(50) % 3 + 2**31)
    old = table.drop_columns(["answer"])
    meta = json.loads(table.schema.metadata[b"geko_data"])
    meta["format_version"] = 4
    from geko_data.statefile import checksum
    meta["checksum"] = checksum(old, meta)
    v4 = _write_with(tmp_path, "v4.arrow", old.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()}))
    u = SampleState.load(v4)
    assert u.answer.dtype == np.uint32 and not u.answer.any()
    np.testing.assert_array_equal(u.loss, s.loss)
    u.report([0], [0.1], answer=[5])  # the filled-in column is writable
    assert u.answer[0] == 5
    # a state that never heard of answers writes no column of them and holds none in memory
    _filled(50).save(tmp_path / "plain.arrow")
    assert "answer" not in pa.ipc.open_file(str(tmp_path / "plain.arrow")).read_all().column_names
    p = SampleState.load(tmp_path / "plain.arrow")
    assert p.nbytes == 32 * 50 and not p.answer.any() and "answer" not in p.mapped_columns

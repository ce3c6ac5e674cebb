import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.state import COLUMNS, FingerprintError, SampleState, StateFileError, fingerprint_of, read_table


def test_memory_is_32_bytes_per_sample():
    assert SampleState(1000).nbytes == 32 * 1000


def test_report_defaults_and_duplicates():
    s = SampleState(5)
    applied = s.report([1, 1, 3], [2.0, 0.1, 0.5])
    assert applied == 3
    assert s.times_seen.tolist() == [0, 2, 0, 1, 0]  # every occurrence is a pass
    assert s.loss[1] == pytest.approx(0.1)  # last occurrence wins
    assert s.confidence[1] == pytest.approx(np.exp(-0.1))  # default confidence exp(-loss)
    assert bool(s.correct[1]) and bool(s.correct[3])  # default correct = confidence >= 0.5
    assert np.isnan(s.loss[0])


def test_report_accepts_tensors_of_any_float_dtype():
    s = SampleState(4)
    s.report(torch.tensor([0, 2]), torch.tensor([0.5, 1.0], dtype=torch.bfloat16, requires_grad=True),
             correct=torch.tensor([True, False]), confidence=torch.tensor([0.9, 0.2]))
    assert s.loss[0] == pytest.approx(0.5) and not s.correct[2] and s.confidence[2] == pytest.approx(0.2)


def test_nonfinite_losses_are_counted_not_applied():
    s = SampleState(3)
    assert s.report([0, 1, 2], [float("nan"), float("inf"), 1.0]) == 1
    assert s.num_nonfinite == 2 and s.times_seen.tolist() == [0, 0, 1]


def test_q_ema_and_var_follow_the_rules():
    cfg = GEKOConfig(q_value_lr=0.5, loss_ema=0.5)
    s = SampleState(1, config=cfg)
    s.report([0], [2.0])
    assert s.q[0] == pytest.approx(0.5 * 0.5 + 0.5 * 0.8)
    assert s.loss_ema[0] == 2.0 and s.loss_var[0] == 0.0
    s.report([0], [0.0])
    assert s.loss_ema[0] == pytest.approx(1.0)
    assert s.loss_var[0] == pytest.approx(0.5 * (0 + 0.5 * 4.0))


def test_forgetting_and_thaw():
    s = SampleState(2, config=GEKOConfig(q_value_lr=1.0, min_q_for_freeze=0.5))
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    st = s.repartition(0.5)
    assert st.freeze == 2
    s.report([0], [3.0], correct=[False], confidence=[0.9])
    assert s.forgets.tolist() == [1, 0]
    assert s.bucket[0] == policy.HARD  # a FREEZE sample that turns wrong leaves FREEZE at once
    assert s.frozen_epochs[0] == 0


def test_repartition_history_and_pruning():
    s = SampleState(4, config=GEKOConfig(q_value_lr=1.0, min_q_for_freeze=0.5, prune_frozen_after=2))
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    s.report([2], [5.0], correct=[False], confidence=[0.1])
    a = s.repartition(0.1)
    assert (a.freeze, a.focus, a.pruned, a.active) == (2, 2, 0, 2)
    b = s.repartition(0.5)
    assert b.pruned == 2 and b.newly_pruned == 2 and s.pruned[:2].all()
    s.report([0], [9.0], correct=[False], confidence=[0.9])  # pruned never comes back
    c = s.repartition(0.9)
    assert s.pruned[0] and c.pruned == 2
    assert [h["epoch"] for h in s.history] == [0, 1, 2]


@pytest.mark.parametrize("kwargs,name", [
    ({"ids": [0.5], "losses": [1.0]}, "ids"), ({"ids": [5], "losses": [1.0]}, "ids"),
    ({"ids": [-1], "losses": [1.0]}, "ids"), ({"ids": [0, 1], "losses": [1.0]}, "losses"),
    ({"ids": [0], "losses": [1.0], "confidence": [1.5]}, "confidence"),
    ({"ids": [0], "losses": [1.0], "confidence": [-0.5]}, "confidence"),
    ({"ids": [0], "losses": [1.0], "correct": [True, False]}, "correct"),
    ({"ids": [[0]], "losses": [[1.0]]}, "ids"), ({"ids": [0], "losses": ["x"]}, "losses")])
def test_bad_reports_name_the_argument(kwargs, name):
    s = SampleState(5)
    with pytest.raises(ValueError, match=name):
        s.report(kwargs["ids"], kwargs["losses"], correct=kwargs.get("correct"), confidence=kwargs.get("confidence"))


def _filled(n=300, seed=0):
    rng = np.random.default_rng(seed)
    s = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2),
                    fingerprint="abc")
    for e in range(3):
        ids = rng.integers(0, n, 400)
        s.report(ids, rng.exponential(0.5, 400), step=e * 10)
        s.repartition((e + 0.5) / 3)
    return s


@pytest.mark.parametrize("memory_map", [True, False])
def test_save_load_round_trip_bit_exact(tmp_path, memory_map):
    s = _filled()
    path = tmp_path / "state.arrow"
    s.save(path)
    t = SampleState.load(path, memory_map=memory_map)
    for name, _, _ in COLUMNS:
        a, b = getattr(s, name), getattr(t, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert t.history == s.history and t.config == s.config and t.step == s.step and t.fingerprint == "abc"
    t.report([0], [1.0])  # mutation after a memory-mapped load copies first
    assert t.times_seen[0] == s.times_seen[0] + 1


def test_file_opens_with_pyarrow_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    s = _filled()
    path = tmp_path / "state.arrow"
    s.save(path)
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.column_names == ["id"] + [c[0] for c in COLUMNS]
    meta = json.loads(table.schema.metadata[b"geko_data"])
    assert meta["format_version"] == 3 and len(meta["history"]) == 3
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


def test_should_stop_at_early_stop_frozen():
    s = SampleState(10, config=GEKOConfig(early_stop_frozen=0.5))
    assert not s.should_stop
    s.repartition(0.1)
    s.bucket[:5] = policy.FREEZE
    assert s.frozen_share == 0.5 and s.should_stop
    never = SampleState(4, config=GEKOConfig(early_stop_frozen=1.0))
    never.repartition(0.1)
    never.bucket[:] = policy.FREEZE
    assert never.frozen_share == 1.0 and not never.should_stop  # 1.0 disables early stopping


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


def test_the_state_file_keeps_the_current_plan(tmp_path):
    from geko_data.plan import epoch_plan

    s = _filled(60)
    s.plan = epoch_plan(s, seed=3, epoch=2, total_epochs=4)
    s.save(tmp_path / "state.arrow")
    table = pa.ipc.open_file(str(tmp_path / "state.arrow")).read_all()
    assert table.column_names == ["id"] + [c[0] for c in COLUMNS] + ["plan_count", "plan_weight"]
    t = SampleState.load(tmp_path / "state.arrow")
    assert t.plan is not None and t.plan.epoch == 2 and t.plan.seed == 3
    np.testing.assert_array_equal(t.plan.counts, s.plan.counts)
    np.testing.assert_array_equal(t.plan.loss_weight, s.plan.loss_weight)
    assert t.nbytes == 32 * 60  # the plan is not per-sample learning state
    np.testing.assert_array_equal(t.loss_weights([0, 5]), s.plan.loss_weight[[0, 5]])


def test_loss_weights_validate_ids_and_default_to_the_last_progress():
    s = _filled(30)
    with pytest.raises(ValueError, match="epoch"):
        s.loss_weights([0, 1])  # no plan yet: which epoch's weights is not for the state to guess
    assert s.loss_weights([0, 1], epoch=2, total_epochs=3).shape == (2,)
    for bad, match in (([-1], r"\[0, 30\)"), ([30], r"\[0, 30\)"), ([0.5], "integers")):
        with pytest.raises(ValueError, match=match):
            s.loss_weights(bad)


def test_negative_loss_gives_a_confidence_of_at_most_one():
    s = SampleState(2)
    s.report([0, 1], [-0.5, 0.2])
    assert s.confidence[0] == 1.0 and s.correct[0]


def test_duckdb_describes_the_documented_columns(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _filled(20).save(tmp_path / "state.arrow")
    state = pa.ipc.open_file(str(tmp_path / "state.arrow")).read_all()  # noqa: F841 - DuckDB reads it by name
    described = duckdb.sql("DESCRIBE SELECT * FROM state").fetchall()
    assert [row[0] for row in described] == ["id"] + [c[0] for c in COLUMNS]
    types = {row[0]: row[1] for row in described}
    assert types["bucket"] == "VARCHAR" and types["id"] == "BIGINT" and types["loss"] == "FLOAT" and types["pruned"] == "BOOLEAN"


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


# ---------------------------------------------------------------------- the file speaks for itself
def test_sampler_counts_reports_as_steps_when_the_loop_passes_none(tmp_path):
    """A loop that never passes step= still gets a step and last_step that order the reports."""
    from geko_data.sampler import GEKOSampler

    sampler = GEKOSampler(12, total_epochs=2, seed=0)
    sampler.set_epoch(0)
    ids = list(sampler)
    for i in range(0, len(ids), 4):
        sampler.report(ids[i:i + 4], np.full(len(ids[i:i + 4]), 0.5, np.float32))
    state = sampler.state
    assert state.step == 3  # three reports
    assert sorted(set(state.last_step[ids].tolist())) == [1, 2, 3]
    state.report([0], [1.0], step=100)  # a loop's own step wins, and counting goes on from it
    state.report([1], [1.0])
    assert state.step == 101 and state.last_step[1] == 101
    state.save(tmp_path / "s.arrow")
    assert SampleState.load(tmp_path / "s.arrow").step == 101


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
    from geko_data.state import _checksum
    meta["checksum"] = _checksum(old, meta)
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

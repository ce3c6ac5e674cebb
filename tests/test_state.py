import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.state import COLUMNS, SampleState, StateFileError, read_table


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
    assert table.column_names == [c[0] for c in COLUMNS]
    meta = json.loads(table.schema.metadata[b"geko_data"])
    assert meta["format_version"] == 1 and len(meta["history"]) == 3
    state_table = table  # noqa: F841 - DuckDB finds the pyarrow table by its variable name
    rows = duckdb.sql("SELECT bucket, count(*) AS n FROM state_table GROUP BY bucket ORDER BY bucket").fetchall()
    assert sum(n for _, n in rows) == 300
    assert dict(rows) == {int(b): int(n) for b, n in zip(*np.unique(s.bucket, return_counts=True))}


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
    with pytest.raises(StateFileError, match="other shards"):
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

"""The README's one-liners that open a state file with other tools, run as written."""

import numpy as np
import pyarrow as pa
import pytest

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.state import SampleState


def _names(s):
    """The bucket names of every sample, as a reader of the file sees them."""
    return [policy.BUCKET_NAMES[b] for b in s.bucket]


def _counts(s):
    return {policy.BUCKET_NAMES[int(k)]: int(v) for k, v in zip(*np.unique(s.bucket, return_counts=True))}


@pytest.fixture
def state_file(tmp_path):
    s = SampleState(100, config=GEKOConfig(q_value_lr=0.9, min_q_for_freeze=0.5))
    s.report(np.arange(100), np.linspace(0.01, 4, 100))  # no step=: the report counts as step 1
    s.repartition(0.5)
    s.save(tmp_path / "state.arrow")
    return tmp_path / "state.arrow", s


def test_pyarrow(state_file):
    path, s = state_file
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.num_rows == 100 and table.column("bucket").to_pylist() == _names(s)
    assert table.column("id").to_pylist() == list(range(100))  # to join with the user's data
    assert set(table.column("last_step").to_pylist()) == {1}  # counted although the loop passed no step


def test_duckdb(state_file):
    duckdb = pytest.importorskip("duckdb")
    path, s = state_file
    state = pa.ipc.open_file(str(path)).read_all()  # noqa: F841 - DuckDB reads the variable by name
    rows = duckdb.sql("SELECT bucket, count(*) FROM state GROUP BY bucket ORDER BY bucket").fetchall()
    assert dict(rows) == _counts(s)
    hard = duckdb.sql("SELECT id FROM state WHERE bucket = 'HARD' ORDER BY id").fetchall()
    assert [r[0] for r in hard] == np.flatnonzero(s.bucket == policy.HARD).tolist()


def test_pandas_and_polars(state_file):
    path, s = state_file
    pd = pytest.importorskip("pandas")
    df = pd.read_feather(path)
    assert len(df) == 100 and df["times_seen"].sum() == 100
    assert df["bucket"].astype(str).tolist() == _names(s) and df["id"].tolist() == list(range(100))
    pl = pytest.importorskip("polars")
    assert pl.read_ipc(path)["bucket"].cast(pl.Utf8).to_list() == _names(s)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_exports_open_in_duckdb_by_file_name(state_file, tmp_path, fmt):
    # DuckDB cannot read Arrow IPC files by name without an extension from the network; the exports it can.
    duckdb = pytest.importorskip("duckdb")
    from geko_data.cli import main

    path, s = state_file
    out = tmp_path / f"state.{fmt}"
    assert main(["export", str(path), "--to", fmt, "-o", str(out)]) == 0
    rows = duckdb.sql(f"SELECT bucket, count(*) FROM '{out}' GROUP BY bucket ORDER BY bucket").fetchall()
    assert dict(rows) == _counts(s)
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{out}')").fetchall())
    assert types["loss"] in ("FLOAT", "DOUBLE") and types["correct"] == "BOOLEAN"
    if fmt != "csv":  # all 0.0 here: the jsonl export writes "0.0", not "0", so it stays a float column
        assert types["loss_var"] in ("FLOAT", "DOUBLE")


def test_jsonl_export_opens_in_pandas(state_file, tmp_path):
    pd = pytest.importorskip("pandas")
    from geko_data.cli import main

    path, s = state_file
    assert main(["export", str(path), "--to", "jsonl", "-o", str(tmp_path / "state.jsonl")]) == 0
    df = pd.read_json(tmp_path / "state.jsonl", lines=True)
    assert len(df) == 100 and df["bucket"].tolist() == _names(s) and df["id"].tolist() == list(range(100))
    assert np.allclose(df["loss"].to_numpy(), s.loss)

"""`geko-data sql`: DuckDB queries on a state file (validated through read_table), with the index as a view."""

import json
import subprocess
import sys

import numpy as np
import pytest

from geko_data import policy
from geko_data.shards import write_shards
from test_cli import assert_one_line_error, make_state, run

duckdb = pytest.importorskip("duckdb")


@pytest.fixture
def state(tmp_path):
    return tmp_path / "s.arrow", make_state(tmp_path / "s.arrow", n=60)


def test_query_by_file_name_with_bucket_names(tmp_path, capsys, state):
    path, s = state
    code, out, err = run(capsys, "sql", path, "SELECT bucket, count(*) AS n FROM state GROUP BY bucket ORDER BY bucket",
                         "--format", "json")
    assert code == 0, err
    want = {policy.BUCKET_NAMES[int(b)]: int(n) for b, n in zip(*np.unique(s.bucket, return_counts=True))}
    assert {r["bucket"]: r["n"] for r in json.loads(out)} == want
    code, out, _ = run(capsys, "sql", path, "SELECT id, times_seen FROM state WHERE id < 3 ORDER BY id", "--format", "csv")
    assert code == 0 and out.splitlines() == ['"id","times_seen"'] + [f"{i},{s.times_seen[i]}" for i in range(3)]
    code, out, _ = run(capsys, "sql", path, "SELECT count(*) AS samples FROM state")
    assert code == 0 and out.splitlines() == ["samples", "60", "(1 row)"]
    # DuckDB's sum of integers is a HUGEINT: it came out as the string "..." in JSON
    code, out, _ = run(capsys, "sql", path, "SELECT sum(times_seen) AS s, avg(loss) > 0 AS a FROM state",
                       "--format", "json")
    assert code == 0 and json.loads(out) == [{"s": int(s.times_seen.sum()), "a": True}]


def test_index_view_joins_on_id(tmp_path, capsys):
    index = write_shards(({"__key__": f"k{i:03d}", "json": b"{}"} for i in range(40)),
                         str(tmp_path / "shard-%03d.tar"), maxcount=16)
    s = make_state(tmp_path / "s.arrow", n=40, fingerprint=index.fingerprint)
    code, out, err = run(capsys, "sql", tmp_path / "s.arrow", "SELECT key, bucket FROM state JOIN index USING (id) "
                         "ORDER BY id", "--index", tmp_path, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["key"] for r in rows] == [f"k{i:03d}" for i in range(40)]
    assert [r["bucket"] for r in rows] == [policy.BUCKET_NAMES[b] for b in s.bucket]


def test_index_view_holds_every_row_of_the_index(tmp_path, capsys):
    """The view's columns and types: id, key (as written, multi-byte UTF-8 too), shard file name, offset, length."""
    from geko_data.shards import read_index

    keys = [f"dir/ключ-{i:02d}" + "x" * (i % 7) for i in range(40)]
    write_shards(({"__key__": k, "json": b"{}"} for k in keys), str(tmp_path / "shard-%03d.tar"), maxcount=16)
    index = read_index(tmp_path)
    make_state(tmp_path / "s.arrow", n=40, fingerprint=index.fingerprint)
    code, out, err = run(capsys, "sql", tmp_path / "s.arrow", "SELECT * FROM index ORDER BY id", "--index", tmp_path,
                         "--format", "csv")
    assert code == 0, err
    want = ['"id","key","shard","offset","length"'] + [
        f'{i},"{keys[i]}","shard-{i // 16:03d}.tar",{index.offset[i]},{index.length[i]}' for i in range(40)]
    assert out.splitlines() == want
    code, out, _ = run(capsys, "sql", tmp_path / "s.arrow", "SELECT typeof(key) AS k, typeof(shard) AS s, "
                       "typeof(\"offset\") AS o FROM index LIMIT 1", "--index", tmp_path, "--format", "json")
    assert json.loads(out) == [{"k": "VARCHAR", "s": "VARCHAR", "o": "BIGINT"}]


def test_bad_query_and_bad_file_are_one_line(tmp_path, capsys, state):
    path, _ = state
    code, out, err = run(capsys, "sql", path, "SELEC 1")
    assert_one_line_error(code, out, err, "query failed", "SELEC")
    corrupt = tmp_path / "bad.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    code, out, err = run(capsys, "sql", corrupt, "SELECT 1")
    assert_one_line_error(code, out, err, "bad.arrow")


def test_missing_duckdb_names_the_extra(tmp_path, state):
    path, _ = state
    # duckdb made unimportable in a fresh interpreter (None in sys.modules makes `import duckdb` raise ImportError).
    code = ("import sys; sys.modules['duckdb'] = None; from geko_data.cli import main; "
            f"sys.exit(main(['sql', {str(path)!r}, 'SELECT 1']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'geko-data[sql]'" in proc.stderr and "Traceback" not in proc.stderr


def test_training_jsonl_as_the_index_view(tmp_path, capsys, state):
    path, s = state
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(60):
            if i == 3:
                f.write("\n")  # a blank line numbers no sample, as in the reference loop
            f.write(json.dumps({"prompt": f"Q{i}", "completion": f" {i}", "meta": {"n": i}}) + "\n")
    code, out, err = run(capsys, "sql", path, "SELECT id, line, prompt, meta, bucket FROM state JOIN index USING (id) "
                         "WHERE id IN (2, 3) ORDER BY id", "--index", tmp_path / "train.jsonl", "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [
        {"id": 2, "line": 3, "prompt": "Q2", "meta": '{"n": 2}', "bucket": policy.BUCKET_NAMES[s.bucket[2]]},
        {"id": 3, "line": 5, "prompt": "Q3", "meta": '{"n": 3}', "bucket": policy.BUCKET_NAMES[s.bucket[3]]}]


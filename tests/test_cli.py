import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from geko_data.cli import main
from geko_data.config import GEKOConfig
from geko_data.state import SampleState


def make_state(path, n=200, epochs=4, seed=0):
    rng = np.random.default_rng(seed)
    s = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2))
    for e in range(epochs):
        ids = rng.integers(0, n, 3 * n)
        s.report(ids, rng.exponential(0.4, ids.shape[0]) * (ids % 3 + 0.1), step=e * 7)
        s.repartition((e + 0.5) / epochs, epoch=e)
    s.save(path)
    return s


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_text_and_json(tmp_path, capsys):
    s = make_state(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "s.arrow"))
    assert code == 0 and "FREEZE" in out and "CONSOLIDATE" in out and "times seen" in out
    code, out, _ = run(capsys, "inspect", str(tmp_path / "s.arrow"), "--json")
    data = json.loads(out)
    assert data["samples"] == 200 and len(data["history"]) == 4
    assert sum(b["count"] for b in data["buckets"].values()) + data["pruned"] == 200
    assert data["buckets"]["HARD"]["count"] == int(((s.bucket == 3) & ~s.pruned).sum())
    assert data["forgetting_events"] == int(s.forgets.sum())


def test_inspect_top_with_keys_from_index(tmp_path, capsys, shards):
    s = SampleState(43)
    s.report(np.arange(43), np.linspace(0.1, 3, 43), correct=np.zeros(43, bool), confidence=np.full(43, 0.9))
    s.repartition(0.5)
    s.save(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "s.arrow"), "--top", "hard", "3", "--index", str(shards),
                       "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [42, 41, 40] and rows[0]["key"] == "s3_011"
    code, out, _ = run(capsys, "inspect", str(tmp_path / "s.arrow"), "--top", "frozen", "2")
    assert code == 0


def test_plot_writes_a_sensible_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    make_state(tmp_path / "s.arrow")
    code, _, _ = run(capsys, "plot", str(tmp_path / "s.arrow"), "-o", str(tmp_path / "p.png"))
    data = (tmp_path / "p.png").read_bytes()
    assert code == 0 and data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 800 <= width <= 4000 and 300 <= height <= 2000 and len(data) > 20_000


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_export(tmp_path, capsys, fmt):
    make_state(tmp_path / "s.arrow", n=50)
    out = tmp_path / f"s.{fmt}"
    code, _, _ = run(capsys, "export", str(tmp_path / "s.arrow"), "--to", fmt, "-o", str(out))
    assert code == 0
    if fmt == "parquet":
        import pyarrow.parquet as pq
        assert pq.read_table(out).num_rows == 50
    elif fmt == "csv":
        assert len(out.read_text().splitlines()) == 51
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 50 and "bucket" in rows[0]


def test_diff(tmp_path, capsys):
    make_state(tmp_path / "a.arrow", epochs=1)
    b = make_state(tmp_path / "b.arrow", epochs=4)
    code, out, _ = run(capsys, "diff", str(tmp_path / "a.arrow"), str(tmp_path / "b.arrow"), "--json")
    d = json.loads(out)
    assert code == 0 and sum(d["transitions"].values()) == 200
    assert d["newly_pruned"] == int(b.pruned.sum())
    code, out, _ = run(capsys, "diff", str(tmp_path / "a.arrow"), str(tmp_path / "b.arrow"))
    assert "from \\ to" in out


def test_index_command(tmp_path, capsys, shards):
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    code, out, _ = run(capsys, "index", *tars, "-o", str(tmp_path / "i.arrow"))
    assert code == 0 and "43 samples" in out


@pytest.mark.parametrize("content", [b"", b"garbage" * 50, None])
def test_bad_files_one_line_exit_2(tmp_path, capsys, content):
    path = tmp_path / "bad.arrow"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "bad.arrow" in err


def test_truncated_state_file(tmp_path, capsys):
    make_state(tmp_path / "s.arrow")
    data = (tmp_path / "s.arrow").read_bytes()
    (tmp_path / "t.arrow").write_bytes(data[:-100])
    code, _, err = run(capsys, "inspect", str(tmp_path / "t.arrow"))
    assert code == 2 and err.count("\n") == 1


def test_console_script(tmp_path):
    make_state(tmp_path / "s.arrow", n=30)
    proc = subprocess.run([sys.executable, "-m", "geko_data.cli", "inspect", str(tmp_path / "s.arrow"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["samples"] == 30
    proc = subprocess.run([sys.executable, "-m", "geko_data.cli", "inspect", str(tmp_path / "nope.arrow")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

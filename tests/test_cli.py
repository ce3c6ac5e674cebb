import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from geko_data import cli
from geko_data.cli import main
from geko_data.config import GEKOConfig
from geko_data.state import SampleState


def make_state(path, n=200, epochs=4, seed=0, fingerprint=None):
    rng = np.random.default_rng(seed)
    s = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2),
                    fingerprint=fingerprint)
    for e in range(epochs):
        ids = rng.integers(0, n, 3 * n)
        s.report(ids, rng.exponential(0.4, ids.shape[0]) * (ids % 3 + 0.1), step=e * 7)
        s.repartition((e + 0.5) / epochs, epoch=e)
    s.save(path)
    return s


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("geko-data: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def installed_script():
    """The `geko-data` console script of this environment (next to the interpreter, else on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "geko-data")
    found = here if os.path.exists(here) else shutil.which("geko-data")
    if found is None:
        pytest.fail("the `geko-data` console script is not installed: pip install -e .")
    return found


# ---------------------------------------------------------------------- inspect
def test_inspect_shows_how_each_answer_fares_when_the_state_has_answers(tmp_path, capsys):
    from geko_data import GEKOSampler

    n = 600
    rng = np.random.default_rng(0)
    answer = np.arange(n) % 3 + 7
    correct = (answer == 7) | (rng.random(n) < 0.15)  # the model favours answer 7: its samples freeze
    s = GEKOSampler(n, total_epochs=3, seed=1, config=GEKOConfig(short_run_keep=None, log_bucket_stats=False))
    s.set_epoch(0)
    s.report(np.arange(n), rng.exponential(1.0, n).astype(np.float32), correct=correct, answer=answer)
    s.set_epoch(1)
    s.state.save(tmp_path / "a.arrow")
    code, out, _ = run(capsys, "inspect", tmp_path / "a.arrow", "--json")
    rows = {r["answer"]: r for r in json.loads(out)["answers"]["rows"]}
    assert code == 0 and sorted(rows) == [7, 8, 9] and all(r["samples"] == 200 for r in rows.values())
    assert rows[7]["right_share"] == 1.0 and rows[7]["freeze_share"] > 3 * rows[8]["freeze_share"]
    for r in rows.values():  # the answers' balance: each answer's trained weight is its data share
        assert r["trained_weight_share"] == pytest.approx(1 / 3, rel=1e-4)
    code, out, _ = run(capsys, "inspect", tmp_path / "a.arrow")
    assert "3 distinct among 600 seen samples" in out and "trained weight" in out
    make_state(tmp_path / "plain.arrow")  # no answers reported: no such section
    code, out, _ = run(capsys, "inspect", tmp_path / "plain.arrow")
    assert code == 0 and "answers" not in out


def test_inspect_text_and_json(tmp_path, capsys):
    s = make_state(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow")
    assert code == 0 and "FREEZE" in out and "CONSOLIDATE" in out and "times seen" in out
    assert "freeze_share=0.5" in out and "answer_weight_cap=4.0" in out  # the default rule's settings shown
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--json")
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
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "hard", "3", "--index", shards, "--json")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [42, 41, 40] and rows[0]["key"] == "s3_011"
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "frozen", "2")
    assert code == 0


def _keyed_shards(tmp_path, n=30):
    """Shards whose keys differ in length and hold multi-byte UTF-8 (read from the index's offsets and bytes)."""
    from geko_data.shards import write_shards

    keys = [f"dir/ключ-{i:02d}" + "x" * (i % 7) for i in range(n)]
    index = write_shards(({"__key__": k, "txt": b"t"} for k in keys), str(tmp_path / "shard-%03d.tar"), maxcount=7)
    return keys, index


def test_top_and_diff_show_the_keys_written(tmp_path, capsys):
    """--top and diff show each listed id's key as written, in the order listed (JSON and text)."""
    keys, index = _keyed_shards(tmp_path)
    s = SampleState(30, fingerprint=index.fingerprint)
    s.report(np.arange(30), np.linspace(0.1, 3, 30), correct=np.zeros(30, bool), confidence=np.full(30, 0.9))
    s.repartition(0.5)
    s.save(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "hard", "4", "--index", tmp_path, "--json")
    assert code == 0 and [(r["id"], r["key"]) for r in json.loads(out)] == [(i, keys[i]) for i in (29, 28, 27, 26)]
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "hard", "4", "--index", tmp_path)
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [[str(i), keys[i]] for i in (29, 28, 27, 26)]
    a = make_state(tmp_path / "a.arrow", n=30, epochs=1, fingerprint=index.fingerprint)
    b = make_state(tmp_path / "b.arrow", n=30, epochs=4, fingerprint=index.fingerprint)
    newly = np.flatnonzero(~a.pruned & b.pruned)
    assert newly.size >= 3
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--index", tmp_path, "--json")
    assert code == 0 and json.loads(out)["newly_pruned_keys"] == [keys[i] for i in newly]
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--index", tmp_path)
    listing = out.split("newly pruned (")[-1].splitlines()[2:]
    assert [line.split() for line in listing] == [[str(i), keys[i]] for i in newly]


def test_inspect_top_forgetful(tmp_path, capsys):
    s = SampleState(10)
    s.report(np.arange(10), np.full(10, 0.1), correct=np.ones(10, bool))
    s.report([3, 7], [2.0, 2.0], correct=[False, False])  # forgets: 3 -> 1, 7 -> 1
    s.report([3], [0.1], correct=[True])
    s.report([3], [2.5], correct=[False])  # forgets: 3 -> 2
    s.save(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "forgetful", "5", "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["id"], r["forgets"]) for r in rows] == [(3, 2), (7, 1)]
    assert rows[0]["loss"] == pytest.approx(2.5) and rows[0]["key"] is None
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "forgetful", "1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[1].split()[0] == "3" and lines[1].split()[-1] == "2"


@pytest.mark.parametrize("top, needle", [(["hard", "-1"], "got -1"), (["hard", "x"], "got 'x'"),
                                         (["easy", "3"], "got 'easy'")])
def test_inspect_top_bad_arguments(tmp_path, capsys, top, needle):
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--top", *top)
    assert_one_line_error(code, out, err, "--top", needle)


# ---------------------------------------------------------------------- --index must match the state
@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--top", "hard", "3"], ["diff"]])
def test_index_of_other_data_is_refused(tmp_path, capsys, shards, command):
    from geko_data.shards import read_index

    def argv(state):
        args = [command[0], state] + (["B"] if command == ["diff"] else []) + command[1:]
        return [state if a == "B" else a for a in args] + ["--index", shards]

    make_state(tmp_path / "small.arrow", n=30, epochs=2)
    code, out, err = run(capsys, *argv(tmp_path / "small.arrow"))
    assert_one_line_error(code, out, err, "43", "30", "small.arrow")

    make_state(tmp_path / "other.arrow", n=43, epochs=2, fingerprint="f" * 32)
    code, out, err = run(capsys, *argv(tmp_path / "other.arrow"))
    real = read_index(shards).fingerprint
    assert_one_line_error(code, out, err, "f" * 32, real)

    make_state(tmp_path / "same.arrow", n=43, epochs=2, fingerprint=real)
    code, out, err = run(capsys, *argv(tmp_path / "same.arrow"))
    assert code == 0 and err == ""
    make_state(tmp_path / "nofp.arrow", n=43, epochs=2)  # no fingerprint stored: the sample count must do
    code, out, err = run(capsys, *argv(tmp_path / "nofp.arrow"))
    assert code == 0 and err == ""


def test_inspect_reports_the_matching_index(tmp_path, capsys, shards):
    make_state(tmp_path / "s.arrow", n=43, epochs=2)
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--index", shards)
    assert code == 0 and "index" in out and "43 samples" in out and "matches" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--index", shards, "--json")
    assert json.loads(out)["index"]["samples"] == 43


def test_unreadable_index_is_one_line(tmp_path, capsys):
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    (tmp_path / "index.arrow").write_bytes(b"not an index")
    for argv in (["inspect", tmp_path / "s.arrow"], ["diff", tmp_path / "s.arrow", tmp_path / "s.arrow"]):
        code, out, err = run(capsys, *argv, "--index", tmp_path / "index.arrow")
        assert_one_line_error(code, out, err, "index.arrow")
        code, out, err = run(capsys, *argv, "--index", tmp_path / "nowhere")
        assert_one_line_error(code, out, err, "nowhere")


# ---------------------------------------------------------------------- plot
def test_plot_writes_a_sensible_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    make_state(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "plot", tmp_path / "s.arrow", "-o", tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert code == 0 and data[:8] == b"\x89PNG\r\n\x1a\n" and "p.png" in out
    width, height = struct.unpack(">II", data[16:24])
    assert 800 <= width <= 4000 and 300 <= height <= 2000 and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_format_follows_the_extension(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    make_state(tmp_path / "s.arrow", n=50)
    code, _, _ = run(capsys, "plot", tmp_path / "s.arrow", "-o", tmp_path / "p.svg")
    assert code == 0 and b"<svg" in (tmp_path / "p.svg").read_bytes()[:2000]
    code, out, err = run(capsys, "plot", tmp_path / "s.arrow", "-o", tmp_path / "p.xyz")
    assert_one_line_error(code, out, err, ".xyz", "png")


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    code = ("import sys; sys.modules['matplotlib'] = None; from geko_data.cli import main; "
            f"sys.exit(main(['plot', {str(tmp_path / 's.arrow')!r}, '-o', {str(tmp_path / 'p.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "matplotlib" in proc.stderr and "geko-data[plot]" in proc.stderr
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------- export
def special_values_state(path, n=50):
    """A state whose columns hold NaN (never seen), denormals, float32 extremes, -0.0 and both booleans."""
    s = SampleState(n, config=GEKOConfig(prune_frozen_after=1))
    s.report(np.arange(10, n), np.linspace(0.01, 5, n - 10), step=3)
    s.repartition(0.5)
    s.loss[:6] = [np.nan, 1e-45, 3.4028235e38, -0.0, 0.1, 1 / 3]
    s.loss_var[6] = 1e30
    s.last_step[7] = 2**31 - 1
    s.save(path)
    return s


def assert_rows_match(rows, table):
    assert len(rows) == table.num_rows
    for name in table.column_names:
        col = table.column(name).to_numpy(zero_copy_only=False)
        got = [r[name] for r in rows]
        if col.dtype.kind == "f":
            # NaN and inf are not JSON: they are written as null. Every other value reads back exactly.
            assert [v is None for v in got] == list(~np.isfinite(col)), name
            finite = np.isfinite(col)
            back = np.array([v for v in got if v is not None], dtype=col.dtype)
            # Floats stay floats ("2.0", not "2"), so readers type the column as float and -0.0 keeps its sign.
            assert np.array_equal(back, col[finite]) and all(type(v) is float for v in got if v is not None), name
            assert np.array_equal(np.signbit(back), np.signbit(col[finite])), name
        elif col.dtype.kind == "b":
            assert got == col.tolist() and all(isinstance(v, bool) for v in got), name
        elif col.dtype.kind == "O":  # the bucket names
            assert got == col.tolist() and set(got) <= {"FREEZE", "LIGHT", "FOCUS", "HARD"}, name
        else:
            assert got == col.tolist() and all(type(v) is int for v in got), name


def test_export_jsonl_round_trips_every_value(tmp_path, capsys):
    s = special_values_state(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "export", tmp_path / "s.arrow", "--to", "jsonl", "-o", tmp_path / "s.jsonl")
    assert code == 0 and "50 rows" in out
    text = (tmp_path / "s.jsonl").read_text()
    assert text.endswith("}\n") and "NaN" not in text and "nan" not in text
    rows = [json.loads(line) for line in text.splitlines()]  # every line is JSON on its own
    table = pa.ipc.open_file(str(tmp_path / "s.arrow")).read_all()
    assert list(rows[0]) == table.column_names
    assert_rows_match(rows, table)
    assert rows[0]["loss"] is None and rows[3]["loss"] == 0 and math.copysign(1, rows[3]["loss"]) == -1
    assert rows[7]["last_step"] == 2**31 - 1 and rows[6]["loss_var"] == pytest.approx(1e30)
    assert [r["pruned"] for r in rows] == s.pruned.tolist()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_export(tmp_path, capsys, fmt):
    make_state(tmp_path / "s.arrow", n=50)
    out = tmp_path / f"s.{fmt}"
    code, _, _ = run(capsys, "export", tmp_path / "s.arrow", "--to", fmt, "-o", out)
    assert code == 0
    table = pa.ipc.open_file(str(tmp_path / "s.arrow")).read_all().replace_schema_metadata(None)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        assert pq.read_table(out).equals(table)
    elif fmt == "csv":
        import pyarrow.csv as pcsv
        back = pcsv.read_csv(out)
        assert back.num_rows == 50 and back.column_names == table.column_names
        assert back.column("bucket").to_pylist() == table.column("bucket").to_pylist()
    else:
        assert_rows_match([json.loads(line) for line in out.read_text().splitlines()], table)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.arrow", out.name])  # no temp file left


REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "export")


@pytest.mark.parametrize("name", ["trained", "special"])
def test_jsonl_export_is_the_reference_bytes(tmp_path, capsys, name):
    # tests/data/export/NAME.jsonl was written from NAME.arrow by the hand-made Arrow formatter jsonl export
    # used before polars writes it: a trained state and one of NaN, denormals, float32 extremes and -0.0.
    code, _, err = run(capsys, "export", os.path.join(REFERENCE, f"{name}.arrow"), "--to", "jsonl",
                       "-o", tmp_path / "out.jsonl")
    assert code == 0, err
    with open(os.path.join(REFERENCE, f"{name}.jsonl"), "rb") as f:
        assert (tmp_path / "out.jsonl").read_bytes() == f.read()


def test_jsonl_export_without_polars_names_the_extra(tmp_path):
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    # None in sys.modules makes `import polars` raise ImportError, as if it were not installed.
    code = ("import sys; sys.modules['polars'] = None; from geko_data.cli import main; "
            f"sys.exit(main(['export', {str(tmp_path / 's.arrow')!r}, '--to', 'jsonl', '-o', "
            f"{str(tmp_path / 's.jsonl')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert "polars" in proc.stderr and "pip install 'geko-data[jsonl]'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.arrow"]


def test_export_failure_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    make_state(tmp_path / "s.arrow", n=50)
    (tmp_path / "s.jsonl").write_text("previous export\n")

    def disk_full(table, path):
        with open(path, "wb") as f:
            f.write(b'{"loss":')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_jsonl", disk_full)
    code, out, err = run(capsys, "export", tmp_path / "s.arrow", "--to", "jsonl", "-o", tmp_path / "s.jsonl")
    assert_one_line_error(code, out, err, "s.jsonl", "No space left on device")
    assert (tmp_path / "s.jsonl").read_text() == "previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.arrow", "s.jsonl"]


# ---------------------------------------------------------------------- unwritable -o
@pytest.mark.parametrize("command", [["plot"], ["export", "--to", "jsonl"], ["export", "--to", "parquet"],
                                     ["export", "--to", "csv"]])
@pytest.mark.parametrize("where", ["missing_folder", "under_a_file", "a_directory", "permission_denied"])
def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch, command, where):
    if command == ["plot"]:
        pytest.importorskip("matplotlib")
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    target = {"missing_folder": tmp_path / "no" / "out.png", "under_a_file": tmp_path / "file" / "out.png",
              "a_directory": tmp_path / "folder", "permission_denied": tmp_path / "folder" / "out.png"}[where]
    if where == "permission_denied":  # tests run as root here, where chmod cannot make a folder read-only
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", kwargs.get("dir"))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, out, err = run(capsys, command[0], tmp_path / "s.arrow", *command[1:], "-o", target)
    assert_one_line_error(code, out, err, "-o", str(target))
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == []


# ---------------------------------------------------------------------- diff
def test_diff(tmp_path, capsys):
    a = make_state(tmp_path / "a.arrow", epochs=1)
    b = make_state(tmp_path / "b.arrow", epochs=4)
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--json")
    d = json.loads(out)
    newly = np.flatnonzero(~a.pruned & b.pruned)
    assert code == 0 and sum(d["transitions"].values()) == 200
    assert d["newly_pruned"] == newly.size == int(b.pruned.sum()) > 20
    assert d["newly_pruned_ids"] == newly[:20].tolist() and "newly_pruned_keys" not in d
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--list", "3")
    assert "from \\ to" in out and f"newly pruned ({newly.size}, first 3):" in out
    listing = out.split("newly pruned")[-1].splitlines()[2:]
    assert [int(line.split()[0]) for line in listing] == newly[:3].tolist()
    code, out, _ = run(capsys, "diff", tmp_path / "b.arrow", tmp_path / "a.arrow")  # nothing newly pruned
    assert code == 0 and "0 newly pruned" in out and "newly pruned (" not in out


def test_diff_lists_keys_of_newly_pruned_with_index(tmp_path, capsys, shards):
    from geko_data.shards import read_index

    a = make_state(tmp_path / "a.arrow", n=43, epochs=1)
    b = make_state(tmp_path / "b.arrow", n=43, epochs=4)
    newly = np.flatnonzero(~a.pruned & b.pruned)
    assert newly.size > 2
    keys = read_index(shards).keys
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--index", shards, "--json",
                       "--list", "2")
    d = json.loads(out)
    assert code == 0 and d["newly_pruned"] == newly.size and d["newly_pruned_ids"] == newly[:2].tolist()
    assert d["newly_pruned_keys"] == [str(keys[i]) for i in newly[:2]]
    code, out, _ = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--index", shards)
    assert f"{newly[0]:>9} {keys[newly[0]]}" in out


def test_diff_of_different_data_is_one_line(tmp_path, capsys):
    make_state(tmp_path / "a.arrow", n=20, epochs=1)
    make_state(tmp_path / "b.arrow", n=30, epochs=1)
    code, out, err = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow")
    assert_one_line_error(code, out, err, "20", "30")


def test_index_command(tmp_path, capsys, shards):
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    code, out, err = run(capsys, "index", *tars, "-o", tmp_path / "i.arrow")
    assert code == 0 and "43 samples" in out
    assert "indexing" not in err  # no progress bar into a log or a pipe (stderr is not a terminal here)
    code, out, err = run(capsys, "index", *tars, "-o", tmp_path / "no" / "i.arrow")
    assert_one_line_error(code, out, err, "-o", "does not exist")


# ---------------------------------------------------------------------- bad and hostile state files
def _write_ipc(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _with_meta(table, **changes):
    meta = json.loads(table.schema.metadata[b"geko_data"])
    meta.update(changes)
    return table.replace_schema_metadata({b"geko_data": json.dumps(meta).encode()})


def _set_column(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


def _bad_state(kind, path, good):
    """Write a bad file of ``kind`` at ``path``, from the good state file ``good``."""
    table = pa.ipc.open_file(str(good)).read_all()
    meta = table.schema.metadata
    n = table.num_rows
    if kind == "missing":
        return
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"garbage" * 50)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif kind == "half":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, str(path))
    elif kind == "arrow_stream":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "no_metadata":
        _write_ipc(path, table.replace_schema_metadata(None))
    elif kind == "meta_not_json":
        _write_ipc(path, table.replace_schema_metadata({b"geko_data": b"{not json"}))
    elif kind == "meta_list":
        _write_ipc(path, table.replace_schema_metadata({b"geko_data": b"[1, 2]"}))
    elif kind == "newer_version":
        _write_ipc(path, _with_meta(table, format_version=99))
    elif kind == "rows_mismatch":
        _write_ipc(path, _with_meta(table, num_samples=n + 1))
    elif kind == "history_malformed":
        _write_ipc(path, _with_meta(table, history=[{"epoch": 0}]))
    elif kind == "history_bad_count":
        h = json.loads(meta[b"geko_data"])["history"]
        h[0]["freeze"] = "many"
        _write_ipc(path, _with_meta(table, history=h))
    elif kind == "history_not_list":
        _write_ipc(path, _with_meta(table, history={"epoch": 0}))
    elif kind == "config_list":
        _write_ipc(path, _with_meta(table, config=[1, 2]))
    elif kind == "fingerprint_number":
        _write_ipc(path, _with_meta(table, fingerprint=12))
    elif kind == "bucket_code_9":
        bucket = table.column("bucket").combine_chunks().indices.to_numpy().astype(np.uint8)  # a format 2 column
        bucket[5] = 9
        _write_ipc(path, _set_column(table, "bucket", pa.array(bucket)))
    elif kind == "bucket_int64":
        _write_ipc(path, _set_column(table, "bucket", pa.array(table.column("bucket").combine_chunks().indices.to_numpy().astype(np.int64))))
    elif kind == "loss_string":
        _write_ipc(path, _set_column(table, "loss", pa.array([str(v) for v in table.column("loss").to_pylist()])))
    elif kind == "missing_column":
        _write_ipc(path, table.drop_columns(["q"]))
    elif kind == "null_loss":
        _write_ipc(path, _set_column(table, "loss", pa.array([None] * n, pa.float32())))
    else:
        raise AssertionError(kind)


BAD_KINDS = ["missing", "directory", "empty", "garbage", "truncated", "half", "parquet", "arrow_stream",
             "no_metadata", "meta_not_json", "meta_list", "newer_version", "rows_mismatch", "history_malformed",
             "history_bad_count", "history_not_list", "config_list", "fingerprint_number", "bucket_code_9",
             "bucket_int64", "loss_string", "missing_column", "null_loss"]
COMMANDS = {
    "inspect": ["inspect", "BAD"],
    "inspect_json": ["inspect", "BAD", "--json"],
    "inspect_top": ["inspect", "BAD", "--top", "hard", "3"],
    "plot": ["plot", "BAD", "-o", "OUT"],
    "export_jsonl": ["export", "BAD", "--to", "jsonl", "-o", "OUT"],
    "export_parquet": ["export", "BAD", "--to", "parquet", "-o", "OUT"],
    "diff_a": ["diff", "BAD", "GOOD"],
    "diff_b": ["diff", "GOOD", "BAD", "--json"],
}


@pytest.fixture(scope="module")
def good_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.arrow"
    make_state(path, n=40, epochs=3)
    return path


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_state_file_is_one_line_exit_2(tmp_path, capsys, good_state, kind, command):
    if command == "plot":
        pytest.importorskip("matplotlib")
    bad = tmp_path / "bad.arrow"
    _bad_state(kind, bad, good_state)
    out_path = tmp_path / ("out.png" if command == "plot" else "out.file")
    argv = [{"BAD": bad, "GOOD": good_state, "OUT": out_path}.get(a, a) for a in COMMANDS[command]]
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, "bad.arrow")
    assert out == "" and not out_path.exists()


def test_console_script(tmp_path):
    script = installed_script()
    make_state(tmp_path / "a.arrow", n=30, epochs=1)
    make_state(tmp_path / "s.arrow", n=30)

    def call(*argv):
        return subprocess.run([script, *map(str, argv)], check=False, capture_output=True, text=True, timeout=120)

    proc = call("inspect", tmp_path / "s.arrow", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["samples"] == 30
    proc = call("diff", tmp_path / "a.arrow", tmp_path / "s.arrow", "--json")
    assert proc.returncode == 0 and sum(json.loads(proc.stdout)["transitions"].values()) == 30
    proc = call("export", tmp_path / "s.arrow", "--to", "jsonl", "-o", tmp_path / "s.jsonl")
    assert proc.returncode == 0 and len((tmp_path / "s.jsonl").read_text().splitlines()) == 30
    proc = call("inspect", tmp_path / "nope.arrow")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    (tmp_path / "junk.arrow").write_bytes(b"junk" * 100)
    proc = call("diff", tmp_path / "s.arrow", tmp_path / "junk.arrow")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- -o naming an input
def _commands_with_output():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sorted(name for name, p in sub.choices.items() if any("-o" in a.option_strings for a in p._actions))


def test_every_command_with_output_is_covered():
    assert _commands_with_output() == ["export", "index", "plot"]  # a new -o command needs a case below


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
@pytest.mark.parametrize("command", [["export", "--to", "csv"], ["export", "--to", "parquet"],
                                     ["export", "--to", "jsonl"], ["plot"], ["index"]])
def test_output_that_is_an_input_is_refused(tmp_path, capsys, monkeypatch, shards, command, how):
    if command == ["plot"]:
        pytest.importorskip("matplotlib")
    if command == ["index"]:
        tars = sorted(str(p) for p in shards.glob("*.tar"))
        victim, inputs = tars[-1], tars
    else:
        make_state(tmp_path / "s.arrow", n=20, epochs=1)
        victim, inputs = str(tmp_path / "s.arrow"), [str(tmp_path / "s.arrow")]
    before = open(victim, "rb").read()
    output = {"same": victim, "symlink": tmp_path / "link", "hardlink": tmp_path / "hard",
              "relative": os.path.relpath(victim, tmp_path)}[how]
    if how == "symlink":
        os.symlink(victim, output)
    elif how == "hardlink":
        os.link(victim, output)
    monkeypatch.chdir(tmp_path)
    if command == ["index"]:
        code, out, err = run(capsys, "index", *inputs, "-o", output)
    else:
        code, out, err = run(capsys, command[0], victim, *command[1:], "-o", output)
    assert_one_line_error(code, out, err, f"-o {output}", "same file as the input", victim)
    assert open(victim, "rb").read() == before  # the input is untouched


def test_output_beside_an_input_is_fine(tmp_path, capsys, shards):
    make_state(tmp_path / "s.arrow", n=20, epochs=1)
    (tmp_path / "copy.arrow").write_bytes((tmp_path / "s.arrow").read_bytes())  # equal bytes, another file
    code, out, _ = run(capsys, "export", tmp_path / "s.arrow", "--to", "csv", "-o", tmp_path / "copy.arrow")
    assert code == 0 and (tmp_path / "copy.arrow").read_text().startswith("\"id\",\"loss\"")


def test_inspect_shows_the_verified_checksum_and_refuses_a_changed_file(tmp_path, capsys):
    make_state(tmp_path / "s.arrow", n=30, epochs=1)
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow")
    assert code == 0 and "checksum     xxh3_64:" in out and "(verified)" in out
    data = bytearray((tmp_path / "s.arrow").read_bytes())
    s = SampleState.load(tmp_path / "s.arrow")
    at = bytes(data).index(np.float32(s.q[0]).tobytes())  # a changed Q still in [0, 1]
    data[at] ^= 0x01
    (tmp_path / "s.arrow").write_bytes(bytes(data))
    for command in (["inspect"], ["export", "--to", "csv", "-o", tmp_path / "out.csv"]):
        code, out, err = run(capsys, command[0], tmp_path / "s.arrow", *command[1:])
        assert_one_line_error(code, out, err, "s.arrow", "checksum mismatch")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.timeout(30)
def test_a_fifo_as_state_is_one_line_at_once(tmp_path, capsys):
    from test_statefile import unblock_fifo_later

    os.mkfifo(tmp_path / "state.arrow")
    timer = unblock_fifo_later(tmp_path / "state.arrow")
    try:
        code, out, err = run(capsys, "inspect", tmp_path / "state.arrow")
    finally:
        timer.cancel()
    assert_one_line_error(code, out, err, "state.arrow", "not a regular file (a FIFO)")


# ---------------------------------------------------------------------- --index DATA.jsonl
def _jsonl(path, n, blank_at=()):
    with open(path, "w") as f:
        for i in range(n):
            if i in blank_at:
                f.write("\n")  # the reference loop skips blank lines: they number no sample
            f.write(json.dumps({"prompt": f"Question {i}?\nAnswer:", "completion": f" {i}"}) + "\n")


def test_index_jsonl_shows_the_prompts(tmp_path, capsys):
    make_state(tmp_path / "s.arrow", n=50)
    _jsonl(tmp_path / "train.jsonl", 50, blank_at=(10,))
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "frozen", "3", "--index",
                         tmp_path / "train.jsonl", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows and all(r["key"] == f"Question {r['id']}?\nAnswer:" for r in rows)
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "frozen", "3", "--index",
                         tmp_path / "train.jsonl")
    assert code == 0 and f"Question {rows[0]['id']}? Answer:" in out  # newlines flattened in the table
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--index", tmp_path / "train.jsonl")
    assert code == 0 and "train.jsonl  (50 samples" in out


def test_index_jsonl_of_another_length_is_refused_naming_both_counts(tmp_path, capsys):
    make_state(tmp_path / "s.arrow", n=50)
    _jsonl(tmp_path / "train.jsonl", 49)
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "hard", "3", "--index",
                         tmp_path / "train.jsonl")
    assert_one_line_error(code, out, err, "train.jsonl", "49", "50")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--index", tmp_path / "bad.jsonl")
    assert_one_line_error(code, out, err, "bad.jsonl:2")


# ---------------------------------------------------------------------- third-party tars
def _index_error(capsys, tar, *needles):
    """`geko-data index TAR` fails with exit 2 and one error line (after the progress bar) holding ``needles``."""
    code, out, err = run(capsys, "index", tar, "-o", tar.parent / "index.arrow")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("geko-data: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, (needle, last)


def _sample_files(folder, n=3):
    folder.mkdir()
    for i in range(n):
        (folder / f"s{i}.json").write_text(json.dumps({"i": i}))
        (folder / f"s{i}.txt").write_text(f"text {i}")


def test_tar_with_split_samples_says_how_to_write_it(tmp_path, capsys):
    _sample_files(tmp_path / "dir")
    # A sample's members apart, as `tar -cf x.tar dir/` does when the directory lists them in that order.
    members = [f"dir/s{i}.json" for i in range(3)] + [f"dir/s{i}.txt" for i in range(3)]
    subprocess.run(["tar", "-cf", "x.tar", *members], cwd=tmp_path, check=True, timeout=60)
    _index_error(capsys, tmp_path / "x.tar", "duplicate key", "must be adjacent", "tar --sort=name -cf x.tar dir/")
    subprocess.run(["tar", "--sort=name", "-cf", "y.tar", "dir/"], cwd=tmp_path, check=True, timeout=60)
    code, out, err = run(capsys, "index", tmp_path / "y.tar", "-o", tmp_path / "index.arrow")
    assert code == 0 and "indexed 3 samples" in out, err


@pytest.mark.parametrize("flag,command", [("-z", "gunzip"), ("-j", "bunzip2")])
def test_compressed_tar_is_refused_saying_what_to_do(tmp_path, capsys, flag, command):
    if flag == "-j" and shutil.which("bzip2") is None:
        pytest.skip("bzip2 is not installed")
    _sample_files(tmp_path / "dir")
    subprocess.run(["tar", "--sort=name", flag, "-cf", "x.tar.gz", "dir/"], cwd=tmp_path, check=True, timeout=60)
    _index_error(capsys, tmp_path / "x.tar.gz", "x.tar.gz", "compressed", f"{command} x.tar.gz")
    # A tar whose first member is named like a bzip2 signature is still a tar.
    (tmp_path / "BZh9.json").write_text("{}")
    subprocess.run(["tar", "-cf", "b.tar", "BZh9.json"], cwd=tmp_path, check=True, timeout=60)
    code, out, err = run(capsys, "index", tmp_path / "b.tar", "-o", tmp_path / "b.arrow")
    assert code == 0, err


def test_index_jsonl_missing_or_not_objects_is_one_line(tmp_path, capsys):
    make_state(tmp_path / "s.arrow", n=2, epochs=1)
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--index", tmp_path / "nowhere.jsonl")
    assert_one_line_error(code, out, err, "--index", "nowhere.jsonl", "no such file")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    code, out, err = run(capsys, "inspect", tmp_path / "s.arrow", "--index", tmp_path / "list.jsonl")
    assert_one_line_error(code, out, err, "list.jsonl:2", "must be a JSON object, got list")


def test_diff_warns_about_different_fingerprints(tmp_path, capsys):
    make_state(tmp_path / "a.arrow", n=20, epochs=1, fingerprint="a" * 32)
    make_state(tmp_path / "b.arrow", n=20, epochs=2, fingerprint="b" * 32)
    code, out, err = run(capsys, "diff", tmp_path / "a.arrow", tmp_path / "b.arrow", "--json")
    assert code == 0 and json.loads(out)["samples"] == 20
    assert err.startswith("warning:") and "a" * 32 in err and "b" * 32 in err


@pytest.mark.timeout(60)
def test_control_characters_from_keys_are_printed_escaped(tmp_path, capsys):
    # Keys of shards someone else wrote reached the terminal raw: an ESC sequence cleared the screen and
    # printed a fake "all samples verified OK" line.
    from geko_data.shards import write_shards

    evil = "k0\x1b[2J\x1b[1;31mFAKE: verified OK\x1b[0m\r"
    index = write_shards([{"__key__": evil, "txt": "a"}, {"__key__": "k1", "txt": "b"}],
                         str(tmp_path / "data" / "s-%02d.tar"))
    state = SampleState(2, fingerprint=index.fingerprint)
    state.report([0, 1], [5.0, 0.1], correct=[False, True], confidence=[0.9, 0.9])
    state.repartition(0.5, epoch=0)
    state.save(tmp_path / "s.arrow")
    code, out, _ = run(capsys, "inspect", tmp_path / "s.arrow", "--top", "hard", "2", "--index", tmp_path / "data")
    assert code == 0 and "\x1b" not in out and "\r" not in out
    assert "k0\\x1b[2J\\x1b[1;31mFAKE" in out

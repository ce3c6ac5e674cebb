"""``geko-data``: look at state files and shards offline.

    geko-data inspect STATE [--index INDEX|DATA.jsonl] [--json] [--top hard|forgetful|frozen N]
    geko-data plot STATE -o FILE.png
    geko-data sql STATE "SELECT ..." [--index INDEX|DATA.jsonl] [--format table|csv|json]
    geko-data export STATE --to parquet|csv|jsonl -o FILE
    geko-data diff A B [--index INDEX|DATA.jsonl] [--list N] [--json]
    geko-data index SHARDS... -o index.arrow

Files are memory-mapped and only the columns a command needs are read, so a
10M-sample state opens in about a second. A bad file (truncated, foreign,
corrupted, wrong column types, values out of range, malformed metadata), an
index of other data, or an output path that cannot be written or is the same
file as an input gives one line on stderr and exit status 2. Exports are
written atomically: a failed export leaves no partial file under the output
name; an output that is a symlink is written through to its target.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geko_data import policy
from geko_data.atomic import atomic_path
from geko_data.state import StateFileError, _values, read_table

__all__ = ["build_parser", "main"]

_PRUNED = len(policy.BUCKET_NAMES)  # the code diff gives a pruned sample, after the four buckets


class _Fail(Exception):
    """A user-facing error: one line, exit status 2."""


# ---------------------------------------------------------------------- reading
def _load(path: str, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """``read_table`` (which validates the whole file) with its errors as one-line failures."""
    if not os.path.exists(path):
        raise _Fail(f"{path}: no such file")
    try:
        return read_table(path, columns=columns)
    except StateFileError as e:
        raise _Fail(str(e)) from None


def _col(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy; ``bucket`` as its codes 0-3 whether the file stores names (format 3) or codes."""
    return _values(table, name)


class _JsonlIndex:
    """The JSONL a state was trained from, as an index: sample id = the id-th non-blank line.

    The reference loop (``geko-train --data x.jsonl``) skips blank lines and numbers the others from 0, so
    this does too. ``keys`` show each sample's prompt (or text); ``table`` is every line's fields for ``sql``.
    """

    fingerprint = None

    def __init__(self, path: str) -> None:
        self.path = path
        lines, keys, fields = [], [], []
        try:
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise _Fail(f"--index {path}:{n}: not a JSON line ({e})") from None
                    if not isinstance(rec, dict):
                        raise _Fail(f"--index {path}:{n}: a line must be a JSON object, got {type(rec).__name__}")
                    lines.append(n)
                    key = rec.get("prompt", rec.get("text"))
                    keys.append(key if isinstance(key, str) else json.dumps(rec)[:200])
                    fields.append({k: v if isinstance(v, str) else json.dumps(v) for k, v in rec.items()})
        except OSError as e:
            raise _Fail(f"--index {path}: cannot read ({e.strerror or e})") from None
        self.num_samples = len(keys)
        self.keys = np.array(keys, dtype=object)
        self._lines, self._fields = lines, fields

    def table(self) -> pa.Table:
        names = list(dict.fromkeys(k for rec in self._fields for k in rec))
        columns = {"id": pa.array(np.arange(self.num_samples, dtype=np.int64)), "line": pa.array(self._lines)}
        columns.update((k, pa.array([rec.get(k) for rec in self._fields], pa.string()))
                       for k in names if k not in columns)
        return pa.table(columns)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".ndjson"))


def _open_index(index_path: str, states: list[tuple[str, int, str | None]]) -> Any:
    """Read the shard index (or the JSONL of the data) and check it describes every ``(path, samples,
    fingerprint)``."""
    from geko_data.shards import read_index

    if _is_jsonl(index_path):
        if not os.path.isfile(index_path):
            raise _Fail(f"--index {index_path}: no such file")
        jl = _JsonlIndex(index_path)
        for path, n, _ in states:
            if jl.num_samples != n:
                raise _Fail(f"--index {index_path} has {jl.num_samples:,} samples (non-blank lines) but {path} "
                            f"has {n:,}: not the data the state was trained on")
        return jl
    try:
        idx = read_index(index_path)
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:
        # read_index checks the footer but not each metadata field, so a hand-made index can fail here.
        raise _Fail(f"{index_path}: not a readable shard index (bad metadata: {type(e).__name__} {e})") from None
    for path, n, fp in states:
        if idx.num_samples != n:
            raise _Fail(f"--index {index_path} has {idx.num_samples:,} samples but {path} has {n:,}: "
                        f"not the same data")
        if fp is not None and idx.fingerprint != fp:
            raise _Fail(f"--index {index_path} has fingerprint {idx.fingerprint} but {path} was written for "
                        f"{fp}: not the same shards")
    return idx


def _check_output(path: str, inputs: list[str]) -> None:
    """Refuse an -o that cannot be written or that is one of the command's ``inputs``.

    Checked before any work, so that a typo in -o does not cost a 10M-row export first. The same file is
    found by inode (``os.path.samefile``), so a symlink or hard link to an input is refused too: the
    atomic write would replace the input (through the link) with the output.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _Fail(f"-o {path} is a directory, expected a file name")
    if not os.path.isdir(folder):
        raise _Fail(f"-o {path}: folder {folder} does not exist")
    if not os.path.exists(path):
        return
    for source in inputs:
        try:
            same = os.path.samefile(path, source)
        except OSError:  # a missing input is reported by the command itself
            continue
        if same:
            raise _Fail(f"-o {path} is the same file as the input {source}: it would be overwritten; "
                        f"choose another output")


def _write_failed(path: str, e: OSError) -> _Fail:
    return _Fail(f"-o {path}: cannot write ({e.strerror or e})")


# ---------------------------------------------------------------------- inspect
def _summary(path: str) -> dict[str, Any]:
    table, meta = _load(path, ["loss", "confidence", "q", "bucket", "times_seen", "forgets", "pruned"])
    bucket, pruned = _col(table, "bucket"), _col(table, "pruned")
    loss, conf, q = _col(table, "loss"), _col(table, "confidence"), _col(table, "q")
    times = _col(table, "times_seen")
    n = int(bucket.shape[0])
    alive = ~pruned
    per_bucket = {}
    for code, name in enumerate(policy.BUCKET_NAMES):
        m = alive & (bucket == code)
        seen = m & np.isfinite(loss)
        per_bucket[name] = {
            "count": int(m.sum()), "share": float(m.sum() / n),
            "mean_loss": float(loss[seen].mean()) if seen.any() else None,
            "mean_confidence": float(conf[seen].mean()) if seen.any() else None,
            "mean_q": float(q[m].mean()) if m.any() else None,
        }
    edges = [0, 1, 2, 3, 5, 10, 20, 50, 100, 1 << 16]
    hist = np.histogram(times, bins=edges)[0]
    return {
        "path": path, "samples": n, "active": int((alive & (bucket != policy.FREEZE)).sum()),
        "pruned": int(pruned.sum()), "seen": int(np.isfinite(loss).sum()),
        "buckets": per_bucket,
        "times_seen": {f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo): int(c)
                       for lo, hi, c in zip(edges[:-1], edges[1:], hist)},
        "sample_passes": int(times.sum(dtype=np.int64)),
        "forgetting_events": int(_col(table, "forgets").sum(dtype=np.int64)),
        "epoch": meta.get("epoch"), "step": meta.get("step"), "num_nonfinite": meta.get("num_nonfinite"),
        "fingerprint": meta.get("fingerprint"), "config": meta.get("config"), "history": meta.get("history", []),
        "format_version": meta.get("format_version"), "checksum": meta.get("checksum"),
    }


def _top(path: str, kind: str, n: int, index: str | None) -> list[dict[str, Any]]:
    table, meta = _load(path, ["loss", "confidence", "q", "bucket", "times_seen", "forgets", "pruned",
                               "frozen_epochs"])
    idx = _open_index(index, [(path, table.num_rows, meta.get("fingerprint"))]) if index else None
    bucket, loss, forgets = _col(table, "bucket"), _col(table, "loss"), _col(table, "forgets")
    pruned = _col(table, "pruned")
    if kind == "hard":  # confidently wrong first, then by loss
        cand = np.flatnonzero((bucket == policy.HARD) & ~pruned)
        order = cand[np.argsort(-np.nan_to_num(loss[cand], nan=-1.0), kind="stable")]
    elif kind == "forgetful":
        cand = np.flatnonzero(forgets > 0)
        order = cand[np.argsort(-forgets[cand].astype(np.int64), kind="stable")]
    else:
        frozen_epochs = _col(table, "frozen_epochs")
        cand = np.flatnonzero((bucket == policy.FREEZE) | pruned)
        order = cand[np.argsort(-frozen_epochs[cand].astype(np.int64), kind="stable")]
    order = order[:n]
    keys = [str(k) for k in idx.keys[order]] if idx is not None else [None] * len(order)
    conf, q, times = _col(table, "confidence"), _col(table, "q"), _col(table, "times_seen")
    return [{"id": int(i), "key": k, "bucket": policy.BUCKET_NAMES[int(bucket[i])], "pruned": bool(pruned[i]),
             "loss": None if np.isnan(loss[i]) else float(loss[i]),
             "confidence": None if np.isnan(conf[i]) else float(conf[i]), "q": float(q[i]),
             "times_seen": int(times[i]), "forgets": int(forgets[i])} for i, k in zip(order, keys)]


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _print_summary(s: dict[str, Any]) -> None:
    cfg = s["config"] or {}
    print(f"state file   {s['path']}")
    print(f"written at   epoch {s['epoch']}, step {s['step']}  (mode {cfg.get('mode')}, preset {cfg.get('name')})")
    # read_table verified the checksum before anything was printed; a format 1 file has none.
    print(f"checksum     {s['checksum'] + ' (verified)' if s['checksum'] else 'none (format 1 file, written before checksums)'}")
    if "index" in s:
        what = (f"fingerprint {s['index']['fingerprint']}: matches" if s["index"]["fingerprint"]
                else "one sample a line: counts match")
        print(f"index        {s['index']['path']}  ({s['index']['samples']:,} samples, {what})")
    print(f"samples      {s['samples']:,}  seen {s['seen']:,}  active {s['active']:,}  pruned {s['pruned']:,}")
    print(f"passes       {s['sample_passes']:,}  forgetting events {s['forgetting_events']:,}  "
          f"non-finite reports {s['num_nonfinite']}")
    print()
    print(f"{'bucket':<8} {'count':>10} {'share':>7} {'loss':>8} {'conf':>7} {'Q':>7}")
    for name, b in s["buckets"].items():
        print(f"{name:<8} {b['count']:>10,} {100 * b['share']:>6.1f}% {_fmt(b['mean_loss']):>8} "
              f"{_fmt(b['mean_confidence']):>7} {_fmt(b['mean_q']):>7}")
    print(f"{'PRUNED':<8} {s['pruned']:>10,} {100 * s['pruned'] / max(s['samples'], 1):>6.1f}%")
    print()
    print("times seen   " + "  ".join(f"{k}: {v:,}" for k, v in s["times_seen"].items() if v))
    if s["history"]:
        print()
        print(f"{'epoch':>5} {'phase':<12} {'step':>7} {'FREEZE':>8} {'LIGHT':>8} {'FOCUS':>8} {'HARD':>8} "
              f"{'PRUNED':>8} {'loss':>7}")
        for h in s["history"]:
            print(f"{h['epoch']:>5} {h['phase']:<12} {h['step']:>7} {h['freeze']:>8,} {h['light']:>8,} "
                  f"{h['focus']:>8,} {h['hard']:>8,} {h['pruned']:>8,} {_fmt(h.get('mean_loss')):>7}")
    print()
    keys = ("freeze_confidence", "freeze_quality", "focus_confidence", "q_value_lr", "min_q_for_freeze",
            "prune_frozen_after", "recheck_frozen", "keep_frozen")
    print("config       " + ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg))


def cmd_inspect(ns: argparse.Namespace) -> int:
    if ns.top:
        kind, n = ns.top
        if kind not in ("hard", "forgetful", "frozen"):
            raise _Fail(f"--top KIND must be hard, forgetful or frozen, got {kind!r}")
        try:
            count = int(n)
        except ValueError:
            raise _Fail(f"--top N must be an integer >= 0, got {n!r}") from None
        if count < 0:
            raise _Fail(f"--top N must be an integer >= 0, got {count}")
        rows = _top(ns.state, kind, count, ns.index)
        if ns.json:
            print(json.dumps(rows, indent=1))
            return 0
        width = max([24] + [min(len(r["key"] or ""), 60) for r in rows])
        print(f"{'id':>9} {'key':<{width}} {'bucket':<7} {'loss':>8} {'conf':>6} {'Q':>6} {'seen':>5} {'forgets':>7}")
        for r in rows:
            key = " ".join((r["key"] or "-").split())  # a prompt's newlines would break the table
            key = key if len(key) <= 60 else key[:57] + "..."
            print(f"{r['id']:>9} {key:<{width}} {r['bucket']:<7} {_fmt(r['loss']):>8} "
                  f"{_fmt(r['confidence'], '.2f'):>6} {r['q']:>6.2f} {r['times_seen']:>5} {r['forgets']:>7}")
        return 0
    summary = _summary(ns.state)
    if ns.index:
        idx = _open_index(ns.index, [(ns.state, summary["samples"], summary["fingerprint"])])
        summary["index"] = {"path": ns.index, "samples": idx.num_samples, "fingerprint": idx.fingerprint}
    if ns.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
    return 0


# ---------------------------------------------------------------------- plot
def cmd_plot(ns: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise _Fail("plotting needs matplotlib: pip install 'geko-data[plot]'") from None
    _check_output(ns.output, [ns.state])
    # The figure is saved under a temporary name first, so the format comes from -o, not from that name.
    fmt = os.path.splitext(ns.output)[1][1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise _Fail(f"-o {ns.output}: cannot draw .{fmt}, expected one of {', '.join(sorted(formats))}")
    from geko_data import plot

    table, meta = _load(ns.state, plot.COLUMNS)
    fig = plot.draw(table, meta, name=os.path.basename(ns.state))
    try:
        with atomic_path(ns.output) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    except OSError as e:
        raise _write_failed(ns.output, e) from None
    finally:
        plt.close(fig)
    print(f"wrote {ns.output}")
    return 0


# ---------------------------------------------------------------------- export
def _json_values(col: pa.Array) -> list[pa.Array]:
    """Arrays whose concatenation spells each value of ``col`` as JSON; a null element stands for ``null``.

    Arrow writes booleans as true/false, integers as digits, and a float as the shortest string that
    reads back as the same float32 ("0.1", "1e-7", "3.4e+38"), all JSON. But NaN and inf are not JSON
    (they become null), and an integral float comes out as "2" or "-0", which JSON readers take for an
    integer (and -0 loses its sign), so it gets a ".0" suffix.
    """
    if pa.types.is_dictionary(col.type):  # bucket names: plain ASCII words, quoted as JSON strings
        return [pa.scalar('"'), pc.cast(col, pa.string()), pa.scalar('"')]
    if not pa.types.is_floating(col.type):
        return [pc.cast(col, pa.string())]
    finite = pc.is_finite(col)
    if not pc.all(finite).as_py():
        col = pc.if_else(finite, col, pa.scalar(None, col.type))  # on floats: far cheaper than on strings
    text = pc.cast(col, pa.string())
    integral = pc.fill_null(pc.equal(col, pc.floor(col)), False)
    if not pc.any(integral).as_py():
        return [text]
    if pc.any(pc.and_(integral, pc.greater_equal(pc.abs(col), 1e7))).as_py():
        # Large integral floats may be written "1e+15", which needs no suffix; smaller ones never use e.
        integral = pc.and_(integral, pc.invert(pc.fill_null(pc.match_substring(text, "e"), True)))
    return [text, pc.if_else(integral, pa.scalar(".0"), pa.scalar(""))]


def _repeat(text: str, n: int) -> pa.Array:
    """A string array of ``n`` copies of ``text``, built from buffers (``pa.array([text] * n)`` is slow)."""
    data = text.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n))


_JSONL_BATCH = 1 << 18  # rows formatted at a time: ~50 MB of text


def _jsonl_chunk(batch: pa.RecordBatch, consts: list[pa.Array]) -> memoryview:
    """One JSON object per row of ``batch``, newline-terminated, as one contiguous buffer.

    ``consts`` are the key prefixes (``{"loss":``, ``,"loss_ema":``, ...) and the closing ``}\n`` as
    arrays of the batch's length: the join kernel is about twice as fast with arrays as with scalars.
    """
    parts: list[pa.Array] = []
    for head, col in zip(consts, batch.columns):
        parts += [head, *_json_values(col)]
    parts.append(consts[-1])
    lines = pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="null")
    # A string array keeps its values back to back: write them whole instead of line by line.
    _, offsets_buf, data = lines.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, len(lines) + 1, 4 * lines.offset)
    return memoryview(data)[offsets[0]:offsets[-1]]


def _write_jsonl(table: pa.Table, path: str) -> None:
    texts = [("{" if i == 0 else ",") + json.dumps(name) + ":" for i, name in enumerate(table.column_names)]
    texts.append("}\n")
    consts: dict[int, list[pa.Array]] = {}  # by batch length: all batches but the last have the same
    workers = min(2, os.cpu_count() or 1)
    # Arrow's kernels release the GIL: the next batches are formatted on other threads while one is
    # written. At most workers + 1 batches are in memory at a time.
    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for batch in table.to_batches(max_chunksize=_JSONL_BATCH):
            n = batch.num_rows
            if n not in consts:
                consts[n] = [_repeat(t, n) for t in texts]
            pending.append(pool.submit(_jsonl_chunk, batch, consts[n]))
            if len(pending) > workers:
                f.write(pending.popleft().result())
        while pending:
            f.write(pending.popleft().result())


def cmd_export(ns: argparse.Namespace) -> int:
    _check_output(ns.output, [ns.state])
    # Every column, also those a newer writer adds (e.g. the current epoch's plan).
    table, _ = _load(ns.state)
    table = table.replace_schema_metadata(None)
    if ns.to == "jsonl":
        for field in table.schema:
            t = field.type
            if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
                    or field.name == "bucket"):
                raise _Fail(f"{ns.state}: column {field.name!r} has type {t}; jsonl export writes boolean, "
                            f"integer and float columns")
    try:
        with atomic_path(ns.output) as tmp:
            if ns.to == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(table, tmp)
            elif ns.to == "csv":
                import pyarrow.csv as pcsv

                # Larger batches than the default 1024 rows: 15-20% faster at 10M rows.
                pcsv.write_csv(table, tmp, pcsv.WriteOptions(batch_size=1 << 16))
            else:
                _write_jsonl(table, tmp)
    except OSError as e:
        raise _write_failed(ns.output, e) from None
    print(f"wrote {table.num_rows:,} rows to {ns.output}")
    return 0


# ---------------------------------------------------------------------- sql
def _index_table(idx: Any) -> pa.Table:
    """The ``index`` view of ``sql``: one row per sample id, its key (and shard position, or the JSONL's fields)."""
    if isinstance(idx, _JsonlIndex):
        return idx.table()
    return pa.table({"id": pa.array(np.arange(idx.num_samples, dtype=np.int64)),
                     "key": pa.array(idx.keys.tolist(), pa.string()),
                     "shard": pa.array([os.path.basename(idx.shards[i]) for i in idx.shard.tolist()], pa.string()),
                     "offset": pa.array(idx.offset), "length": pa.array(idx.length)})


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, ".6g")
    return " ".join(str(v).split())  # a prompt's newlines would break the table


def cmd_sql(ns: argparse.Namespace) -> int:
    try:
        import duckdb
    except ImportError:
        raise _Fail("sql needs duckdb: pip install 'geko-data[sql]'") from None
    table, meta = _load(ns.state)  # validated and checksummed like every other reader
    con = duckdb.connect()
    con.register("state", table.replace_schema_metadata(None))
    if ns.index:
        idx = _open_index(ns.index, [(ns.state, table.num_rows, meta.get("fingerprint"))])
        con.register("index", _index_table(idx))
    try:
        rel = con.sql(ns.query)
        result = rel.arrow() if rel is not None else None
    except duckdb.Error as e:
        raise _Fail(f"query failed: {' '.join(str(e).split())}") from None
    if result is None:  # a statement without a result (CREATE, SET...)
        return 0
    if hasattr(result, "read_all"):  # duckdb >= 1.4 returns a RecordBatchReader
        result = result.read_all()
    if ns.format == "csv":
        import pyarrow.csv as pcsv

        sink = pa.BufferOutputStream()
        pcsv.write_csv(result, sink)
        sys.stdout.write(sink.getvalue().to_pybytes().decode())
    elif ns.format == "json":
        print(json.dumps(result.to_pylist(), indent=1, default=str))
    else:
        rows = [[_cell(v) for v in row.values()] for row in result.to_pylist()]
        widths = [max([len(name)] + [min(len(r[j]), 60) for r in rows]) for j, name in enumerate(result.column_names)]
        print("  ".join(f"{name:<{w}}" for name, w in zip(result.column_names, widths)).rstrip())
        for r in rows:
            print("  ".join(f"{(c if len(c) <= 60 else c[:57] + '...'):<{w}}" for c, w in zip(r, widths)).rstrip())
        print(f"({result.num_rows:,} row{'s' if result.num_rows != 1 else ''})")
    return 0


# ---------------------------------------------------------------------- diff
def cmd_diff(ns: argparse.Namespace) -> int:
    ta, ma = _load(ns.a, ["bucket", "pruned"])
    tb, mb = _load(ns.b, ["bucket", "pruned"])
    n = ta.num_rows
    if n != tb.num_rows:
        raise _Fail(f"{ns.a} has {n:,} samples, {ns.b} has {tb.num_rows:,}: not the same data")
    if ma.get("fingerprint") != mb.get("fingerprint"):
        print(f"warning: the files have different shard fingerprints ({ma.get('fingerprint')} vs "
              f"{mb.get('fingerprint')})", file=sys.stderr)
    idx = None
    if ns.index:
        idx = _open_index(ns.index, [(ns.a, n, ma.get("fingerprint")), (ns.b, n, mb.get("fingerprint"))])
    names = list(policy.BUCKET_NAMES) + ["PRUNED"]
    # Bucket codes are 0-3 (checked in _load) and pruned is 4, so a * 5 + b indexes the 5 x 5 matrix.
    a = np.where(_col(ta, "pruned"), _PRUNED, _col(ta, "bucket")).astype(np.int64)
    b = np.where(_col(tb, "pruned"), _PRUNED, _col(tb, "bucket")).astype(np.int64)
    matrix = np.bincount(a * 5 + b, minlength=25).reshape(5, 5)
    newly = np.flatnonzero((a != _PRUNED) & (b == _PRUNED))
    listed = newly[:ns.list]
    keys = [str(k) for k in idx.keys[listed]] if idx is not None else None
    moved = int((a != b).sum())
    if ns.json:
        out: dict[str, Any] = {
            "samples": n, "moved": moved, "newly_pruned": int(newly.size),
            "transitions": {f"{names[i]}->{names[j]}": int(matrix[i, j])
                            for i in range(5) for j in range(5) if matrix[i, j]},
            "newly_pruned_ids": listed.tolist()}
        if keys is not None:
            out["newly_pruned_keys"] = keys
        print(json.dumps(out, indent=1))
        return 0
    print(f"{ns.a} (epoch {ma.get('epoch')}) -> {ns.b} (epoch {mb.get('epoch')})")
    print(f"{moved:,} of {n:,} samples changed bucket; {newly.size:,} newly pruned\n")
    print("from \\ to " + "".join(f"{name:>9}" for name in names))
    for i, name in enumerate(names):
        print(f"{name:<10}" + "".join(f"{matrix[i, j]:>9,}" for j in range(5)))
    if listed.size:
        more = f", first {listed.size:,}" if listed.size < newly.size else ""
        print(f"\nnewly pruned ({newly.size:,}{more}):")
        print(f"{'id':>9}" + (" key" if keys is not None else ""))
        for j, i in enumerate(listed):
            print(f"{int(i):>9}" + (f" {keys[j]}" if keys is not None else ""))
    return 0


# ---------------------------------------------------------------------- index
def cmd_index(ns: argparse.Namespace) -> int:
    from geko_data.shards import ShardError, index_shards

    from geko_data.remote import is_url

    if any(is_url(x) for x in [*ns.shards, ns.output]):  # object stores and HTTP: read by byte ranges
        return _index_remote(ns)
    _check_output(ns.output, ns.shards)
    try:
        idx = index_shards(ns.shards, output=ns.output, progress=True)
    except (ShardError, ValueError) as e:
        raise _Fail(str(e)) from None
    print(f"indexed {idx.num_samples:,} samples in {len(idx.shards)} shard(s) -> {ns.output} "
          f"(fingerprint {idx.fingerprint})")
    return 0


def _index_remote(ns: argparse.Namespace) -> int:
    """``geko-data index s3://bucket/shards/ -o s3://bucket/shards/index.arrow``: credentials come from the
    filesystem library's usual places (environment, config files), never from the command line."""
    from geko_data.remote import RemoteError, index_remote
    from geko_data.shards import ShardError

    try:
        options = json.loads(ns.storage_options) if ns.storage_options else None
    except json.JSONDecodeError as e:
        raise _Fail(f"--storage-options must be a JSON object, got {ns.storage_options!r} ({e})") from None
    if options is not None and not isinstance(options, dict):
        raise _Fail(f"--storage-options must be a JSON object, got {ns.storage_options!r}")
    try:
        idx = index_remote(ns.shards, output=ns.output, storage_options=options, progress=True)
    except (ShardError, RemoteError, ValueError) as e:
        raise _Fail(str(e)) from None
    print(f"indexed {idx.num_samples:,} samples in {len(idx.shards)} shard(s) -> {ns.output} "
          f"(fingerprint {idx.fingerprint})")
    return 0


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geko-data", description="Inspect GEKO state files and index shards.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="summary of a state file")
    s.add_argument("state")
    s.add_argument("--index", help="shard index (index.arrow or its folder) of the same data, or the JSONL the "
                                   "state was trained from (sample id = non-blank line), to show keys or prompts")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--top", nargs=2, metavar=("KIND", "N"), help="list N samples: hard, forgetful or frozen")
    s.set_defaults(func=cmd_inspect)
    s = sub.add_parser("plot", help="bucket shares, loss per bucket, Q vs confidence as a PNG")
    s.add_argument("state")
    s.add_argument("-o", "--output", required=True, help="image file; the format follows its extension")
    s.set_defaults(func=cmd_plot)
    s = sub.add_parser("sql", help="answer a SQL query on the state (DuckDB; the view is named state)")
    s.add_argument("state")
    s.add_argument("query", help="e.g. \"SELECT bucket, count(*) FROM state GROUP BY bucket\"")
    s.add_argument("--index", help="shard index or training JSONL of the same data, as the view index (join on id)")
    s.add_argument("--format", choices=("table", "csv", "json"), default="table", help="Defaults to table")
    s.set_defaults(func=cmd_sql)
    s = sub.add_parser("export", help="write the per-sample table as parquet, csv or jsonl")
    s.add_argument("state")
    s.add_argument("--to", choices=("parquet", "csv", "jsonl"), required=True)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("diff", help="bucket transitions and newly pruned samples between two state files")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--index", help="shard index of the same data, to show the keys of newly pruned samples")
    s.add_argument("--list", type=_count, default=20, metavar="N",
                   help="list at most N newly pruned samples. Defaults to 20")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diff)
    s = sub.add_parser("index", help="index WebDataset tars written by anyone")
    s.add_argument("shards", nargs="+", help="tar files; or URLs (s3://, gs://, az://, http(s)://...) of tars, "
                                             "of folders (ending in /) or globs")
    s.add_argument("-o", "--output", required=True, help="the index; for remote shards a URL in their folder")
    s.add_argument("--storage-options", metavar="JSON",
                   help='remote shards: filesystem options as JSON, e.g. \'{"anon": true}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://..."}}\' (credentials: use the environment)')
    s.set_defaults(func=cmd_index)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except _Fail as e:
        print(f"geko-data: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `geko-data inspect ... | head`
        return 0
    except OSError as e:  # an I/O error the commands do not word themselves (a disk failing mid-read)
        print(f"geko-data: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

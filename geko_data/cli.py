"""``geko-data``: look at state files and shards offline.

    geko-data inspect STATE [--index INDEX|DATA.jsonl] [--json] [--top hard|forgetful|frozen N]
    geko-data plot STATE -o FILE.png
    geko-data sql STATE "SELECT ..." [--index INDEX|DATA.jsonl] [--format table|csv|json]
    geko-data export STATE --to parquet|csv|jsonl -o FILE      (jsonl: the jsonl extra, polars)
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
import builtins
import json
import os
import re
import sys
from typing import Any

import numpy as np
import pyarrow as pa

from geko_data import summary
from geko_data.atomic import atomic_path
from geko_data.efficiency import format_history
from geko_data.statefile import StateFileError, column_values, read_table

__all__ = ["build_parser", "main"]


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


def _load_columns(path: str, columns: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``columns`` of the state at ``path`` as numpy (``bucket`` as codes 0-3), and its metadata."""
    table, meta = _load(path, columns)
    return {name: column_values(table, name) for name in columns}, meta


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
        from geko_data.keys import Keys  # pyarrow.compute: imported by the commands that need it

        self.keys = Keys.of(keys)
        self._lines, self._fields = lines, fields

    def table(self) -> pa.Table:
        names = list(dict.fromkeys(k for rec in self._fields for k in rec))
        columns = {"id": pa.array(np.arange(self.num_samples, dtype=np.int64)), "line": pa.array(self._lines)}
        columns.update((k, pa.array([rec.get(k) for rec in self._fields], pa.string()))
                       for k in names if k not in columns)
        return pa.table(columns)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".ndjson"))


def _open_index(index_path: str, states: list[tuple[str, int, str | None]],
                storage_options: dict[str, Any] | None = None) -> Any:
    """Read the shard index (or the JSONL of the data; a URL with ``storage_options``) and check it describes
    every ``(path, samples, fingerprint)``."""
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
        idx = read_index(index_path, storage_options=storage_options)
    except (ValueError, OSError) as e:  # ShardError and RemoteError are ValueErrors
        raise _Fail(str(e)) from None
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
_SUMMARY_COLUMNS = ["loss", "confidence", "q", "bucket", "times_seen", "forgets", "pruned"]
# freeze_share first: the default rule's one setting (freeze_confidence overrides it when set)
_CONFIG_SHOWN = ("freeze_share", "freeze_confidence", "freeze_quality", "focus_confidence", "q_value_lr",
                 "min_q_for_freeze", "prune_frozen_after", "recheck_frozen", "keep_frozen", "answer_weight_cap")
_CELL_MAX = 60  # characters of a key or value in a table; longer ones end in "..."


def _summary(path: str) -> dict[str, Any]:
    table, meta = _load(path)  # every column (memory-mapped): the optional ones are read when the file has them
    cols = {name: column_values(table, name) for name in _SUMMARY_COLUMNS}
    out = {"path": path, **summary.summarize(cols),
           **{k: meta.get(k) for k in ("epoch", "step", "num_nonfinite", "fingerprint", "config")},
           "history": meta.get("history", []), "format_version": meta.get("format_version"),
           "checksum": meta.get("checksum")}
    if "answer" in table.column_names:
        plan = {n: column_values(table, n) for n in ("plan_count", "plan_weight") if n in table.column_names}
        out["answers"] = summary.answers(
            column_values(table, "answer"), seen=np.isfinite(cols["loss"]), bucket=cols["bucket"],
            pruned=cols["pruned"], correct=column_values(table, "correct"), counts=plan.get("plan_count"),
            weight=plan.get("plan_weight"))
    return out


def _top(path: str, kind: str, n: int, index: str | None, storage_options: dict[str, Any] | None = None
         ) -> list[dict[str, Any]]:
    cols, meta = _load_columns(path, _SUMMARY_COLUMNS + ["frozen_epochs"])
    rows = int(cols["bucket"].shape[0])
    idx = _open_index(index, [(path, rows, meta.get("fingerprint"))], storage_options) if index else None
    order = summary.top(kind, cols, n)
    # Only the keys shown become Python strings (a 100M-sample index keeps the rest in its mapped file).
    keys = idx.keys.take(order) if idx is not None else [None] * len(order)
    loss, conf = cols["loss"], cols["confidence"]
    return [{"id": int(i), "key": k, "bucket": summary.GROUPS[int(cols["bucket"][i])],
             "pruned": bool(cols["pruned"][i]), "loss": None if np.isnan(loss[i]) else float(loss[i]),
             "confidence": None if np.isnan(conf[i]) else float(conf[i]), "q": float(cols["q"][i]),
             "times_seen": int(cols["times_seen"][i]), "forgets": int(cols["forgets"][i])}
            for i, k in zip(order, keys)]


# Keys, names and phases come from files someone else may have written; printed raw, their control
# characters (ESC, CR, bidi overrides) could clear the screen, move the cursor or forge lines. Everything
# this command prints for people shows them escaped; tabs and newlines are kept.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def print(*args: Any, sep: str = " ", end: str = "\n", file: Any = None, flush: bool = False) -> None:  # noqa: A001
    builtins.print(_printable(sep.join(map(str, args))), end=end, file=file, flush=flush)


def _json_value(x: Any) -> Any:
    """What json cannot write itself: DuckDB's HUGEINT sums and decimals arrive as ``Decimal`` (a whole one
    is written as a number, not a string), anything else as its text."""
    import decimal

    if isinstance(x, decimal.Decimal):
        return int(x) if x == x.to_integral_value() else float(x)
    return str(x)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _clip(text: str) -> str:
    """``text`` on one line (a prompt's newlines would break a table), at most ``_CELL_MAX`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= _CELL_MAX else text[:_CELL_MAX - 3] + "..."


def _print_summary(s: dict[str, Any]) -> None:
    cfg = s["config"] or {}
    print(f"state file   {s['path']}")
    print(f"written at   epoch {s['epoch']}, step {s['step']}  (mode {cfg.get('mode')}, preset {cfg.get('name')})")
    # read_table verified the checksum before anything was printed; a format 1 file has none.
    checked = s["checksum"] + " (verified)" if s["checksum"] else "none (format 1 file, written before checksums)"
    print(f"checksum     {checked}")
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
    if "answers" in s:
        a = s["answers"]
        print()
        print(f"answers      {a['distinct']:,} distinct among {a['seen']:,} seen samples; the most common:")
        print(f"  {'answer':<12} {'samples':>9} {'data':>7} {'FREEZE':>7} {'right':>7} {'trained weight':>15}")
        for r in a["rows"]:
            w = "-" if r["trained_weight_share"] is None else f"{100 * r['trained_weight_share']:.1f}%"
            print(f"  {r['answer']:<12} {r['samples']:>9,} {100 * r['data_share']:>6.1f}% "
                  f"{100 * r['freeze_share']:>6.1f}% {100 * r['right_share']:>6.1f}% {w:>15}")
    if s["history"]:
        print()
        print("\n".join(format_history(s["history"], detail=True)))
    print()
    print("config       " + ", ".join(f"{k}={cfg.get(k)}" for k in _CONFIG_SHOWN if k in cfg))


def _print_top(rows: list[dict[str, Any]]) -> None:
    width = max([24] + [min(len(r["key"] or ""), _CELL_MAX) for r in rows])
    print(f"{'id':>9} {'key':<{width}} {'bucket':<7} {'loss':>8} {'conf':>6} {'Q':>6} {'seen':>5} {'forgets':>7}")
    for r in rows:
        print(f"{r['id']:>9} {_clip(r['key'] or '-'):<{width}} {r['bucket']:<7} {_fmt(r['loss']):>8} "
              f"{_fmt(r['confidence'], '.2f'):>6} {r['q']:>6.2f} {r['times_seen']:>5} {r['forgets']:>7}")


def cmd_inspect(ns: argparse.Namespace) -> int:
    if ns.top:
        kind, text = ns.top
        try:
            n = _count(text)
        except argparse.ArgumentTypeError as e:
            raise _Fail(f"--top N {e}") from None
        try:
            rows = _top(ns.state, kind, n, ns.index, _storage_options(ns))
        except ValueError as e:  # the kind (the file's errors are _Fail already)
            raise _Fail(f"--top {e}") from None
        if ns.json:
            print(json.dumps(rows, indent=1))
        else:
            _print_top(rows)
        return 0
    s = _summary(ns.state)
    if ns.index:
        idx = _open_index(ns.index, [(ns.state, s["samples"], s["fingerprint"])], _storage_options(ns))
        s["index"] = {"path": ns.index, "samples": idx.num_samples, "fingerprint": idx.fingerprint}
    if ns.json:
        print(json.dumps(s, indent=1))
    else:
        _print_summary(s)
    return 0


# ---------------------------------------------------------------------- plot
def cmd_plot(ns: argparse.Namespace) -> int:
    from geko_data import plot

    try:
        formats = plot.file_formats()
    except ImportError:
        raise _Fail("plotting needs matplotlib: pip install 'geko-data[plot]'") from None
    _check_output(ns.output, [ns.state])
    fmt = plot.file_format(ns.output)
    if fmt not in formats:
        raise _Fail(f"-o {ns.output}: cannot draw .{fmt}, expected one of {', '.join(sorted(formats))}")
    table, meta = _load(ns.state, plot.COLUMNS)
    try:
        plot.save(table, meta, ns.output, name=os.path.basename(ns.state))
    except OSError as e:
        raise _write_failed(ns.output, e) from None
    print(f"wrote {ns.output}")
    return 0


# ---------------------------------------------------------------------- export
def _write_jsonl(table: pa.Table, path: str) -> None:
    """One JSON object per row, keys in column order. polars writes what the hand-made writer did: a float32 as
    the shortest text that reads back as the same float32 ("0.1"), NaN and inf (not JSON) as null, an integral
    float as "2.0" (so readers keep the column a float and -0.0 its sign), bucket names as strings."""
    import polars as pl

    pl.from_arrow(table).write_ndjson(path)


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.to == "jsonl":
        try:
            import polars  # noqa: F401 - checked before any work, like -o
        except ImportError:
            raise _Fail("jsonl export needs polars: pip install 'geko-data[jsonl]'") from None
    _check_output(ns.output, [ns.state])
    # Every column, also those a newer writer adds (e.g. the current epoch's plan).
    table, _ = _load(ns.state)
    table = table.replace_schema_metadata(None)
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
    # Arrow arrays of the mapped index (keys, offsets, lengths: zero-copy), shard names gathered by Arrow:
    # no Python object per sample.
    names = pa.array([os.path.basename(p) for p in idx.shards], pa.string())
    return pa.table({"id": pa.array(np.arange(idx.num_samples, dtype=np.int64)), "key": idx.keys.arrow,
                     "shard": names.take(pa.array(idx.shard)), "offset": pa.array(idx.offset),
                     "length": pa.array(idx.length)})


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return format(v, ".6g") if isinstance(v, float) else _clip(str(v))


def _print_rows(result: pa.Table) -> None:
    """A query's result as an aligned text table, then its row count."""
    rows = [[_cell(v) for v in row.values()] for row in result.to_pylist()]
    names = result.column_names
    widths = [max([len(name)] + [len(r[j]) for r in rows]) for j, name in enumerate(names)]
    print("  ".join(f"{name:<{w}}" for name, w in zip(names, widths)).rstrip())
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip())
    print(f"({result.num_rows:,} row{'s' if result.num_rows != 1 else ''})")


def cmd_sql(ns: argparse.Namespace) -> int:
    try:
        import duckdb
    except ImportError:
        raise _Fail("sql needs duckdb: pip install 'geko-data[sql]'") from None
    table, meta = _load(ns.state)  # validated and checksummed like every other reader
    con = duckdb.connect()
    con.register("state", table.replace_schema_metadata(None))
    if ns.index:
        idx = _open_index(ns.index, [(ns.state, table.num_rows, meta.get("fingerprint"))], _storage_options(ns))
        con.register("index", _index_table(idx))
    try:
        rel = con.sql(ns.query)
        result = rel.arrow() if rel is not None else None
    except duckdb.Error as e:
        raise _Fail(f"query failed: {' '.join(str(e).split())}") from None
    if result is None:  # older duckdb: a statement without a result (CREATE, SET...)
        return 0
    if hasattr(result, "read_all"):  # duckdb >= 1.4 returns a RecordBatchReader
        result = result.read_all()
    if ns.format == "csv":
        import pyarrow.csv as pcsv

        sink = pa.BufferOutputStream()
        pcsv.write_csv(result, sink)
        text = sink.getvalue().to_pybytes().decode()
        sys.stdout.write(_printable(text) if sys.stdout.isatty() else text)  # a file or pipe gets the data
    elif ns.format == "json":
        print(json.dumps(result.to_pylist(), indent=1, default=_json_value))
    else:
        _print_rows(result)
    return 0


# ---------------------------------------------------------------------- diff
def _print_diff(ns: argparse.Namespace, ma: dict[str, Any], mb: dict[str, Any], matrix: np.ndarray,
                newly: np.ndarray, keys: list[str] | None) -> None:
    moved, n = int(matrix.sum() - np.trace(matrix)), int(matrix.sum())
    listed = newly[:ns.list]
    print(f"{ns.a} (epoch {ma.get('epoch')}) -> {ns.b} (epoch {mb.get('epoch')})")
    print(f"{moved:,} of {n:,} samples changed bucket; {newly.size:,} newly pruned\n")
    print("from \\ to " + "".join(f"{name:>9}" for name in summary.GROUPS))
    for i, name in enumerate(summary.GROUPS):
        print(f"{name:<10}" + "".join(f"{c:>9,}" for c in matrix[i]))
    if listed.size:
        more = f", first {listed.size:,}" if listed.size < newly.size else ""
        print(f"\nnewly pruned ({newly.size:,}{more}):")
        print(f"{'id':>9}" + (" key" if keys is not None else ""))
        for j, i in enumerate(listed):
            print(f"{int(i):>9}" + (f" {keys[j]}" if keys is not None else ""))


def cmd_diff(ns: argparse.Namespace) -> int:
    a, ma = _load_columns(ns.a, ["bucket", "pruned"])
    b, mb = _load_columns(ns.b, ["bucket", "pruned"])
    n, nb = a["bucket"].shape[0], b["bucket"].shape[0]
    if n != nb:
        raise _Fail(f"{ns.a} has {n:,} samples, {ns.b} has {nb:,}: not the same data")
    if ma.get("fingerprint") != mb.get("fingerprint"):
        print(f"warning: the files have different shard fingerprints ({ma.get('fingerprint')} vs "
              f"{mb.get('fingerprint')})", file=sys.stderr)
    idx = None
    if ns.index:
        idx = _open_index(ns.index, [(ns.a, n, ma.get("fingerprint")), (ns.b, n, mb.get("fingerprint"))],
                          _storage_options(ns))
    matrix, newly = summary.transitions(summary.groups(a["bucket"], a["pruned"]),
                                        summary.groups(b["bucket"], b["pruned"]))
    listed = newly[:ns.list]
    keys = idx.keys.take(listed) if idx is not None else None
    if not ns.json:
        _print_diff(ns, ma, mb, matrix, newly, keys)
        return 0
    names = summary.GROUPS
    out: dict[str, Any] = {
        "samples": n, "moved": int(matrix.sum() - np.trace(matrix)), "newly_pruned": int(newly.size),
        "transitions": {f"{names[i]}->{names[j]}": int(c) for (i, j), c in np.ndenumerate(matrix) if c},
        "newly_pruned_ids": listed.tolist()}
    if keys is not None:
        out["newly_pruned_keys"] = keys
    print(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------------- index
def _progress() -> bool:
    """Progress bars on a terminal; not into a log or a pipe, where each redraw is another line."""
    return sys.stderr.isatty()


def cmd_index(ns: argparse.Namespace) -> int:
    from geko_data.shards import ShardError, index_shards

    from geko_data.remote import is_url

    if any(is_url(x) for x in [*ns.shards, ns.output]):  # object stores and HTTP: read by byte ranges
        return _index_remote(ns)
    _check_output(ns.output, ns.shards)
    try:
        idx = index_shards(ns.shards, output=ns.output, progress=_progress())
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

    options = _storage_options(ns)
    try:
        idx = index_remote(ns.shards, output=ns.output, storage_options=options, progress=_progress())
    except (ShardError, RemoteError, ValueError) as e:
        raise _Fail(str(e)) from None
    print(f"indexed {idx.num_samples:,} samples in {len(idx.shards)} shard(s) -> {ns.output} "
          f"(fingerprint {idx.fingerprint})")
    return 0


def _storage_options(ns: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-options`` parsed: a JSON object, or None when not given."""
    try:
        options = json.loads(ns.storage_options) if ns.storage_options else None
    except json.JSONDecodeError as e:
        raise _Fail(f"--storage-options must be a JSON object, got {ns.storage_options!r} ({e})") from None
    if options is not None and not isinstance(options, dict):
        raise _Fail(f"--storage-options must be a JSON object, got {ns.storage_options!r}")
    return options


def _add_storage_options(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--storage-options", metavar="JSON",
                   help=f'{what}: filesystem options as JSON, e.g. \'{{"anon": true}}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://..."}}\' (or set AWS_ENDPOINT_URL; '
                        'credentials: use the environment)')


def _count(text: str) -> int:
    """An integer >= 0 given on the command line (``--list``, ``--top``'s N)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {n}")
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
    _add_storage_options(s, "an --index URL")
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
    _add_storage_options(s, "an --index URL")
    s.set_defaults(func=cmd_sql)
    s = sub.add_parser("export", help="write the per-sample table as parquet, csv or jsonl")
    s.add_argument("state")
    s.add_argument("--to", choices=("parquet", "csv", "jsonl"), required=True,
                   help="jsonl is written by polars: pip install 'geko-data[jsonl]'")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("diff", help="bucket transitions and newly pruned samples between two state files")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--index", help="shard index or training JSONL of the same data, to show the keys of newly "
                                   "pruned samples")
    s.add_argument("--list", type=_count, default=20, metavar="N",
                   help="list at most N newly pruned samples. Defaults to 20")
    s.add_argument("--json", action="store_true")
    _add_storage_options(s, "an --index URL")
    s.set_defaults(func=cmd_diff)
    s = sub.add_parser("index", help="index WebDataset tars written by anyone")
    s.add_argument("shards", nargs="+", help="tar files; or URLs (s3://, gs://, az://, http(s)://...) of tars, "
                                             "of folders (ending in /) or globs")
    s.add_argument("-o", "--output", required=True,
                   help="the index: a local file (for remote shards too: read it with shard_url=ShardsAt(...)), "
                        "or for remote shards a URL in their folder")
    _add_storage_options(s, "remote shards")
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

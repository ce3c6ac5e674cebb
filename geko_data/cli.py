"""``geko-data``: look at state files and shards offline.

    geko-data inspect STATE [--index INDEX] [--json] [--top hard|forgetful|frozen N]
    geko-data plot STATE -o FILE.png
    geko-data export STATE --to parquet|csv|jsonl -o FILE
    geko-data diff A B
    geko-data index SHARDS... -o index.arrow

Files are memory-mapped and only the columns a command needs are read, so a
10M-sample state opens in about a second. A bad file gives one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from geko_data import policy
from geko_data.state import StateFileError, read_table

__all__ = ["main"]


class _Fail(Exception):
    """A user-facing error: one line, exit status 2."""


def _load(path: str, columns: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    if not os.path.exists(path):
        raise _Fail(f"{path}: no such file")
    try:
        return read_table(path, columns=columns)
    except StateFileError as e:
        raise _Fail(str(e)) from None


def _col(table: Any, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


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
    }


def _keys(index_path: str | None, ids: np.ndarray) -> list[str | None]:
    if index_path is None:
        return [None] * len(ids)
    from geko_data.shards import read_index

    try:
        idx = read_index(index_path)
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None
    return [str(idx.keys[i]) if i < idx.num_samples else None for i in ids]


def _top(path: str, kind: str, n: int, index: str | None) -> list[dict[str, Any]]:
    table, _ = _load(path, ["loss", "confidence", "q", "bucket", "times_seen", "forgets", "pruned", "frozen_epochs"])
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
    keys = _keys(index, order)
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
            raise _Fail(f"--top kind must be hard, forgetful or frozen, got {kind!r}")
        try:
            count = int(n)
        except ValueError:
            raise _Fail(f"--top N must be an integer, got {n!r}") from None
        rows = _top(ns.state, kind, count, ns.index)
        if ns.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'id':>9} {'key':<24} {'bucket':<7} {'loss':>8} {'conf':>6} {'Q':>6} {'seen':>5} {'forgets':>7}")
        for r in rows:
            print(f"{r['id']:>9} {str(r['key'] or '-'):<24} {r['bucket']:<7} {_fmt(r['loss']):>8} "
                  f"{_fmt(r['confidence'], '.2f'):>6} {r['q']:>6.2f} {r['times_seen']:>5} {r['forgets']:>7}")
        return 0
    summary = _summary(ns.state)
    if ns.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _Fail("plotting needs matplotlib: pip install 'geko-data[plot]'") from None
    table, meta = _load(ns.state, ["loss", "confidence", "q", "bucket", "pruned"])
    bucket, pruned = _col(table, "bucket"), _col(table, "pruned")
    loss, conf, q = _col(table, "loss"), _col(table, "confidence"), _col(table, "q")
    colors = {"FREEZE": "#4C72B0", "LIGHT": "#55A868", "FOCUS": "#DD8452", "HARD": "#C44E52", "PRUNED": "#8C8C8C"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    hist = meta.get("history", [])
    ax = axes[0]
    if hist:
        epochs = [h["epoch"] for h in hist]
        total = np.array([h["freeze"] + h["light"] + h["focus"] + h["hard"] + h["pruned"] for h in hist], float)
        layers = [np.array([h[k] for h in hist], float) / np.maximum(total, 1)
                  for k in ("pruned", "freeze", "light", "focus", "hard")]
        ax.stackplot(epochs, *layers, labels=["PRUNED", "FREEZE", "LIGHT", "FOCUS", "HARD"],
                     colors=[colors[k] for k in ("PRUNED", "FREEZE", "LIGHT", "FOCUS", "HARD")], alpha=0.9)
        ax.set_xlim(min(epochs), max(max(epochs), min(epochs) + 1))
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no repartition yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Bucket shares per epoch", xlabel="epoch", ylabel="share of samples", ylim=(0, 1))
    ax = axes[1]
    seen = np.isfinite(loss)
    hi = float(np.nanpercentile(loss[seen], 99)) if seen.any() else 1.0
    bins = np.linspace(0, max(hi, 1e-3), 40)
    for code, name in enumerate(policy.BUCKET_NAMES):
        m = seen & (bucket == code) & ~pruned
        if m.any():
            ax.hist(np.clip(loss[m], 0, hi), bins=bins, alpha=0.6, color=colors[name], label=f"{name} ({m.sum():,})")
    ax.set(title="Last loss per bucket", xlabel="loss", ylabel="samples")
    if seen.any():
        ax.legend(fontsize=8)
    ax = axes[2]
    idx = np.flatnonzero(seen)
    if idx.size > 20_000:  # a scatter of millions of points says nothing more and takes minutes
        idx = np.sort(np.random.default_rng(0).choice(idx, 20_000, replace=False))
    for code, name in enumerate(policy.BUCKET_NAMES):
        m = idx[bucket[idx] == code]
        if m.size:
            ax.scatter(conf[m], q[m], s=6, alpha=0.5, color=colors[name], label=name)
    ax.set(title=f"Q vs confidence ({idx.size:,} samples)", xlabel="confidence", ylabel="Q", xlim=(0, 1),
           ylim=(0, 1))
    if idx.size:
        ax.legend(fontsize=8, markerscale=2)
    fig.suptitle(f"{os.path.basename(ns.state)}: {bucket.shape[0]:,} samples, epoch {meta.get('epoch')}, "
                 f"step {meta.get('step')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(ns.output, dpi=110)
    plt.close(fig)
    print(f"wrote {ns.output}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    table, _ = _load(ns.state)
    table = table.replace_schema_metadata(None)
    if ns.to == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, ns.output)
    elif ns.to == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, ns.output)
    else:
        with open(ns.output, "w") as f:
            for batch in table.to_batches(max_chunksize=65536):
                for row in batch.to_pylist():
                    f.write(json.dumps({k: (None if isinstance(v, float) and v != v else v)
                                        for k, v in row.items()}) + "\n")
    print(f"wrote {table.num_rows:,} rows to {ns.output}")
    return 0


def cmd_diff(ns: argparse.Namespace) -> int:
    ta, ma = _load(ns.a, ["bucket", "pruned"])
    tb, mb = _load(ns.b, ["bucket", "pruned"])
    if ta.num_rows != tb.num_rows:
        raise _Fail(f"{ns.a} has {ta.num_rows} samples, {ns.b} has {tb.num_rows}: not the same data")
    if ma.get("fingerprint") != mb.get("fingerprint"):
        print(f"warning: the files have different shard fingerprints ({ma.get('fingerprint')} vs "
              f"{mb.get('fingerprint')})", file=sys.stderr)
    names = list(policy.BUCKET_NAMES) + ["PRUNED"]
    a = np.where(_col(ta, "pruned"), 4, _col(ta, "bucket"))
    b = np.where(_col(tb, "pruned"), 4, _col(tb, "bucket"))
    matrix = np.bincount(a.astype(np.int64) * 5 + b, minlength=25).reshape(5, 5)
    newly_pruned = int(((a != 4) & (b == 4)).sum())
    moved = int((a != b).sum())
    if ns.json:
        print(json.dumps({"samples": int(a.shape[0]), "moved": moved, "newly_pruned": newly_pruned,
                          "transitions": {f"{names[i]}->{names[j]}": int(matrix[i, j])
                                          for i in range(5) for j in range(5) if matrix[i, j]}}, indent=1))
        return 0
    print(f"{ns.a} (epoch {ma.get('epoch')}) -> {ns.b} (epoch {mb.get('epoch')})")
    print(f"{moved:,} of {a.shape[0]:,} samples changed bucket; {newly_pruned:,} newly pruned\n")
    print("from \\ to " + "".join(f"{n:>9}" for n in names))
    for i, n in enumerate(names):
        print(f"{n:<10}" + "".join(f"{matrix[i, j]:>9,}" for j in range(5)))
    return 0


def cmd_index(ns: argparse.Namespace) -> int:
    from geko_data.shards import ShardError, index_shards

    try:
        idx = index_shards(ns.shards, output=ns.output, progress=True)
    except (ShardError, ValueError) as e:
        raise _Fail(str(e)) from None
    print(f"indexed {idx.num_samples:,} samples in {len(idx.shards)} shard(s) -> {ns.output} "
          f"(fingerprint {idx.fingerprint})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geko-data", description="Inspect GEKO state files and index shards.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="summary of a state file")
    s.add_argument("state")
    s.add_argument("--index", help="shard index (index.arrow or its folder) to show sample keys")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--top", nargs=2, metavar=("KIND", "N"), help="list N samples: hard, forgetful or frozen")
    s.set_defaults(func=cmd_inspect)
    s = sub.add_parser("plot", help="bucket shares, loss per bucket, Q vs confidence as a PNG")
    s.add_argument("state")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_plot)
    s = sub.add_parser("export", help="write the per-sample table as parquet, csv or jsonl")
    s.add_argument("state")
    s.add_argument("--to", choices=("parquet", "csv", "jsonl"), required=True)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("diff", help="bucket transitions between two state files of the same data")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diff)
    s = sub.add_parser("index", help="index WebDataset tars written by anyone")
    s.add_argument("shards", nargs="+")
    s.add_argument("-o", "--output", required=True)
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


if __name__ == "__main__":
    sys.exit(main())

"""What a state says, computed from its columns: the group of each sample, per-bucket figures, the samples
worth a look, and how samples moved between two states.

Pure numpy over column arrays (as ``statefile.column_values`` gives them); no I/O and no printing, so the
``geko-data`` commands, the plot and the efficiency report count the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from geko_data import policy
from geko_data.validate import check_int

__all__ = ["GROUPS", "PRUNED", "TOP_KINDS", "answers", "groups", "summarize", "top", "transitions"]

#: The code of a pruned sample in ``groups``, after the four bucket codes.
PRUNED = len(policy.BUCKET_NAMES)
#: The five groups a sample is counted in, by code: FREEZE, LIGHT, FOCUS, HARD, PRUNED.
GROUPS = (*policy.BUCKET_NAMES, "PRUNED")
#: What ``top`` lists.
TOP_KINDS = ("hard", "forgetful", "frozen")
# The times_seen histogram's bin edges: one bin per count up to 3, then wider (uint16 ends below 1 << 16).
_SEEN_EDGES = (0, 1, 2, 3, 5, 10, 20, 50, 100, 1 << 16)


def groups(bucket: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Each sample's group code: its bucket code 0-3, or ``PRUNED`` (4).

    A pruned sample keeps a bucket code in the state (FREEZE) but is never drawn again, so every count and
    picture shows it as its own group, never under its old bucket.
    """
    return np.where(pruned, PRUNED, bucket).astype(np.int8)


def summarize(cols: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Counts and means of a state from its columns loss, confidence, q, bucket, times_seen, forgets, pruned.

    ``buckets`` has, per bucket, the count and share of its unpruned samples, their mean last loss and
    confidence (of those seen) and mean Q; ``times_seen`` is a histogram keyed by ranges like ``"3-4"``.
    """
    code = groups(cols["bucket"], cols["pruned"])
    loss, times = cols["loss"], cols["times_seen"]
    n = int(code.shape[0])
    seen = np.isfinite(loss)
    per_bucket = {}
    for c, name in enumerate(policy.BUCKET_NAMES):
        m = code == c
        ms = m & seen
        per_bucket[name] = {
            "count": int(m.sum()), "share": float(m.sum() / n),
            "mean_loss": float(loss[ms].mean()) if ms.any() else None,
            "mean_confidence": float(cols["confidence"][ms].mean()) if ms.any() else None,
            "mean_q": float(cols["q"][m].mean()) if m.any() else None,
        }
    hist = np.histogram(times, bins=_SEEN_EDGES)[0]
    return {
        "samples": n, "active": int(((code != PRUNED) & (code != policy.FREEZE)).sum()),
        "pruned": int((code == PRUNED).sum()), "seen": int(seen.sum()), "buckets": per_bucket,
        "times_seen": {f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo): int(c)
                       for lo, hi, c in zip(_SEEN_EDGES[:-1], _SEEN_EDGES[1:], hist)},
        "sample_passes": int(times.sum(dtype=np.int64)),
        "forgetting_events": int(cols["forgets"].sum(dtype=np.int64)),
    }


def top(kind: str, cols: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The ids of at most ``n`` samples of ``kind`` (one of ``TOP_KINDS``), most notable first.

    hard: unpruned HARD samples by last loss (unseen last); forgetful: samples that forgot by forgetting
    events; frozen: FREEZE and pruned samples by epochs frozen. Ties keep id order.
    """
    if kind not in TOP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TOP_KINDS)}, got {kind!r}")
    check_int("n", n, 0)
    code = groups(cols["bucket"], cols["pruned"])
    if kind == "hard":  # confidently wrong, the largest loss first
        cand = np.flatnonzero(code == policy.HARD)
        key = -np.nan_to_num(cols["loss"][cand], nan=-1.0)
    elif kind == "forgetful":
        cand = np.flatnonzero(cols["forgets"] > 0)
        key = -cols["forgets"][cand].astype(np.int64)
    else:
        cand = np.flatnonzero((code == policy.FREEZE) | (code == PRUNED))
        key = -cols["frozen_epochs"][cand].astype(np.int64)
    return cand[np.argsort(key, kind="stable")][:n]


def transitions(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How samples moved between two states, from their ``groups`` codes ``a`` (before) and ``b`` (after).

    Returns the 5 x 5 matrix of counts (row: group in ``a``, column: group in ``b``) and the ids of the
    samples pruned in ``b`` but not in ``a``, in id order.
    """
    k = len(GROUPS)
    matrix = np.bincount(a.astype(np.int64) * k + b, minlength=k * k).reshape(k, k)
    return matrix, np.flatnonzero((a != PRUNED) & (b == PRUNED))


def answers(answer: np.ndarray, *, seen: np.ndarray, bucket: np.ndarray, pruned: np.ndarray, correct: np.ndarray,
            counts: np.ndarray | None = None, weight: np.ndarray | None = None, top: int = 8) -> dict[str, Any]:
    """How the reported answers fare (a state with an ``answer`` column): the number of distinct answers among
    the ``seen`` samples and, for the ``top`` most common, their samples, share FREEZE, share right and, with
    the plan's ``counts`` and loss ``weight``, their share of the epoch's trained weight (what the answers'
    balance keeps at their data share; a model near chance freezes mostly the answer it favours)."""
    check_int("top", top, 1)
    seen = np.asarray(seen, dtype=bool)
    values, tally = np.unique(np.asarray(answer)[seen], return_counts=True)
    trained = None if counts is None or weight is None else np.asarray(counts) * np.asarray(weight, np.float64)
    total = float(trained[seen].sum()) if trained is not None else 0.0
    frozen = (np.asarray(bucket) == policy.FREEZE) & ~np.asarray(pruned, dtype=bool)
    rows = []
    for i in np.argsort(-tally, kind="stable")[:top]:
        m = seen & (answer == values[i])
        rows.append({"answer": int(values[i]), "samples": int(tally[i]), "data_share": float(tally[i] / seen.sum()),
                     "freeze_share": float(frozen[m].mean()), "right_share": float(np.asarray(correct)[m].mean()),
                     "trained_weight_share": float(trained[m].sum() / total) if total > 0 else None})
    return {"distinct": int(values.shape[0]), "seen": int(seen.sum()), "rows": rows}

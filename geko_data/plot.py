"""The picture of a state file that ``geko-data plot`` draws (matplotlib, imported by the caller's choice).

Three panels share one legend below them (colours are the same in all three, so no legend sits on
data): bucket shares per epoch, the last loss of every sample per bucket, and Q against confidence.
The loss histogram has a log count axis and outlined bars, so FOCUS and HARD (often a few percent) show
beside LIGHT and FREEZE; losses past the 99.5th percentile, when far out, are counted in one last bin that
the plot labels (how many, up to which loss). The Q axis spans the Q values present.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from geko_data.atomic import atomic_path
from geko_data.statefile import column_values
from geko_data.summary import GROUPS, groups

__all__ = ["COLUMNS", "COLORS", "draw", "file_format", "file_formats", "save"]

#: The state columns ``draw`` reads.
COLUMNS = ["loss", "confidence", "q", "bucket", "pruned"]
COLORS = {"FREEZE": "#4C72B0", "LIGHT": "#55A868", "FOCUS": "#DD8452", "HARD": "#C44E52", "PRUNED": "#8C8C8C"}
_ORDER = ("PRUNED", "FREEZE", "LIGHT", "FOCUS", "HARD")
_SCATTER_MAX = 20_000  # a scatter of millions of points says nothing more and takes minutes
_BINS = 50


def file_formats() -> list[str]:
    """The image formats matplotlib writes (png, svg, pdf, ...); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    from matplotlib.backend_bases import FigureCanvasBase

    return list(FigureCanvasBase.get_supported_filetypes())


def file_format(path: str) -> str:
    """The format a figure saved at ``path`` gets: its extension (png without one)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


def save(table: pa.Table, meta: dict[str, Any], path: str, *, name: str) -> None:
    """Draw the state (see ``draw``) and write it to ``path`` atomically, in the format of its extension."""
    import matplotlib.pyplot as plt

    fig = draw(table, meta, name=name)
    try:
        # Saved under a temporary name first, so the format comes from ``path``, not from that name.
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=file_format(path))
    finally:
        plt.close(fig)


def draw(table: pa.Table, meta: dict[str, Any], *, name: str) -> Any:
    """The three-panel figure of a state (``table`` holding at least ``COLUMNS``; ``meta`` its metadata).

    ``name`` titles it (the file's name). Returns a matplotlib Figure; the caller saves and closes it.
    """
    import matplotlib.pyplot as plt

    bucket, pruned = column_values(table, "bucket"), column_values(table, "pruned")
    loss, conf, q = column_values(table, "loss"), column_values(table, "confidence"), column_values(table, "q")
    # A pruned sample keeps bucket code FREEZE in the file; every panel draws it as its own grey PRUNED
    # group, never as FREEZE.
    code = groups(bucket, pruned)
    members = {g: code == c for c, g in enumerate(GROUPS)}
    counts = {g: int(m.sum()) for g, m in members.items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    _shares(axes[0], meta.get("history", []))
    seen = np.isfinite(loss)
    _losses(axes[1], loss, seen, members)
    _q_vs_confidence(axes[2], conf, q, seen, members)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[n]) for n in _ORDER]
    fig.legend(handles, [f"{n} ({counts[n]:,})" for n in _ORDER], loc="lower center", ncol=5, fontsize=9,
               frameon=False)
    step, epoch = meta.get("step"), meta.get("epoch")
    when = "no repartition yet" if epoch is None or epoch < 0 else f"after epoch {epoch}"
    if step:  # 0 means no report yet: saying "step 0" under a trained state would mislead
        when += f", step {step:,}"
    fig.suptitle(f"{name}: {bucket.shape[0]:,} samples ({int(seen.sum()):,} seen), {when}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _shares(ax: Any, hist: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    if hist:
        epochs = [h["epoch"] for h in hist]
        total = np.array([sum(h[k.lower()] for k in _ORDER) for h in hist], float)
        layers = [np.array([h[k.lower()] for h in hist], float) / np.maximum(total, 1) for k in _ORDER]
        if len(epochs) == 1:  # a stack over one x is invisible: draw it as one bar
            bottom = 0.0
            for k, layer in zip(_ORDER, layers):
                ax.bar(epochs, layer, bottom=bottom, color=COLORS[k], width=0.6)
                bottom += layer
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        else:
            ax.stackplot(epochs, *layers, colors=[COLORS[k] for k in _ORDER], alpha=0.9)
            ax.set_xlim(min(epochs), max(epochs))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no repartition yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Bucket shares per epoch", xlabel="epoch", ylabel="share of samples", ylim=(0, 1))


def _losses(ax: Any, loss: np.ndarray, seen: np.ndarray, members: dict[str, np.ndarray]) -> None:
    from matplotlib.ticker import FuncFormatter

    if not seen.any():
        ax.text(0.5, 0.5, "no loss reported yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="Last loss per bucket", xlabel="loss", ylabel="samples")
        return
    values = loss[seen]
    lo, top = float(values.min()), float(values.max())
    hi = float(np.percentile(values, 99.5))
    # A few outliers would squeeze every other loss into the first bins: past the 99.5th percentile they go
    # into one last bin, and the plot says so (how many, up to which loss).
    tail = top > lo + 1.5 * (hi - lo) and hi > lo
    hi = hi if tail else (top if top > lo else lo + 1e-3)
    width = (hi - lo) / _BINS
    bins = np.linspace(lo, hi + (width if tail else 0.0), _BINS + 1 + int(tail))
    for n in _ORDER:
        m = seen & members[n]
        if m.any():  # outlines, not filled bars: a small bucket stays visible over a large one
            x = np.minimum(loss[m], hi + width / 2) if tail else loss[m]
            ax.hist(x, bins=bins, histtype="step", linewidth=1.6, color=COLORS[n], label=n)
    if tail:
        over = int((values > hi).sum())
        ax.axvline(hi, color="black", linewidth=0.8, linestyle=":")
        ax.text(0.98, 0.97, f"last bin: {over:,} losses > {hi:.3g}\n(up to {top:.3g})", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_yscale("log")
    # 1, 10, 100 reads quicker than 10^0, 10^1, 10^2.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.set(title=f"Last loss per bucket (all {int(seen.sum()):,} seen, log count)", xlabel="loss",
           ylabel="samples")


def _q_vs_confidence(ax: Any, conf: np.ndarray, q: np.ndarray, seen: np.ndarray,
                     members: dict[str, np.ndarray]) -> None:
    idx = np.flatnonzero(seen)
    if idx.size > _SCATTER_MAX:
        idx = np.sort(np.random.default_rng(0).choice(idx, _SCATTER_MAX, replace=False))
    # The smallest groups last, so that a few HARD points are not buried under thousands of FREEZE ones.
    for n in sorted(_ORDER, key=lambda n: -int(members[n][idx].sum())):
        m = idx[members[n][idx]]
        if m.size:
            ax.scatter(conf[m], q[m], s=8, alpha=0.6, color=COLORS[n], linewidths=0, label=n)
    ax.set(title=f"Q vs confidence ({idx.size:,} samples)", xlabel="confidence", ylabel="Q", xlim=(0, 1))
    if idx.size:  # Q climbs towards 1 for most samples: span what is there, not [0, 1]
        low = float(q[idx].min())
        ax.set_ylim(max(0.0, low - 0.05 * max(1.0 - low, 0.02)), 1.0 + 0.02 * max(1.0 - low, 0.02))
    else:
        ax.set_ylim(0, 1)


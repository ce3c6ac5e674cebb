"""The picture `geko-data plot` draws (geko_data.plot), judged on the rendered figure."""

import contextlib
import numpy as np
import pytest

from geko_data.config import GEKOConfig
from geko_data.state import SampleState, read_table
from test_cli import make_state

plt = pytest.importorskip("matplotlib.pyplot")


@contextlib.contextmanager
def _drawn(path):
    """The figure of the state file at ``path``, laid out (extents final), closed afterwards."""
    from geko_data import plot

    table, meta = read_table(path, columns=plot.COLUMNS)
    fig = plot.draw(table, meta, name=path.name)
    try:
        fig.canvas.draw()
        yield fig
    finally:
        plt.close(fig)


def _realistic(path, n=4000):
    """Mostly LIGHT and FREEZE, a few percent FOCUS and HARD, a long loss tail, Q near 1 for most."""
    rng = np.random.default_rng(1)
    s = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2,
                                         freeze_confidence=0.85))
    hard = rng.random(n) < 0.05
    for epoch in range(4):
        ids = rng.permutation(n)
        loss = rng.exponential(0.3, n) * np.where(hard[ids], 8.0, 1.0) / (1 + epoch)
        loss[:3] = [30.0, 45.0, 60.0]  # outliers far beyond the 99th percentile
        conf = np.clip(np.exp(-loss) + rng.normal(0, 0.05, n), 0, 1)
        correct = (conf > 0.5) & (rng.random(n) > 0.05)  # some confidently wrong: HARD
        for lo in range(0, n, 256):  # no step=: the state counts reports
            part = slice(lo, lo + 256)
            s.report(ids[part], loss[part], correct=correct[part], confidence=conf[part])
        s.repartition((epoch + 0.5) / 4, epoch=epoch)
    s.save(path)
    return s


def test_pruned_samples_are_drawn_as_pruned_not_freeze(tmp_path):
    s = make_state(tmp_path / "s.arrow")
    seen = np.isfinite(s.loss)
    assert (s.pruned & seen).any() and (~s.pruned & (s.bucket == 0) & seen).any()  # the case is exercised
    assert (s.bucket[s.pruned] == 0).all()  # why it matters: pruned samples keep the FREEZE code
    with _drawn(tmp_path / "s.arrow") as fig:
        points = {c.get_label(): len(c.get_offsets()) for c in fig.axes[2].collections}
    assert points["PRUNED"] == int((s.pruned & seen).sum())
    assert points["FREEZE"] == int((~s.pruned & (s.bucket == 0) & seen).sum())
    assert sum(points.values()) == int(seen.sum())


def test_no_legend_covers_data(tmp_path):
    _realistic(tmp_path / "s.arrow")
    with _drawn(tmp_path / "s.arrow") as fig:
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
        assert legends, "the figure names its colours"
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), "a legend sits on a panel"


def test_loss_histogram_shows_small_buckets_and_every_loss(tmp_path):
    s = _realistic(tmp_path / "s.arrow")
    with _drawn(tmp_path / "s.arrow") as fig:
        ax = fig.axes[1]
        assert ax.get_yscale() == "log"  # FOCUS and HARD (a few percent) stay visible beside LIGHT
        drawn = {p.get_label() for p in ax.patches}
        assert {"FOCUS", "HARD"} <= drawn
        # The outliers (up to 60) are counted in a last bin that the plot labels, not silently clipped.
        heights = sum(p.get_path().vertices[:, 1].max() > 0 for p in ax.patches)
        assert heights and ax.get_xlim()[1] < 30
        notes = [t.get_text() for t in ax.texts]
        over = int((s.loss > np.percentile(s.loss, 99.5)).sum())
        assert any(f"{over:,} losses >" in t and "60" in t for t in notes), notes


def test_q_axis_spans_the_q_values_and_the_title_has_no_step_0(tmp_path):
    s = _realistic(tmp_path / "s.arrow")
    with _drawn(tmp_path / "s.arrow") as fig:
        low, high = fig.axes[2].get_ylim()
        q_min = float(s.q[np.isfinite(s.loss)].min())
        assert 0 < low <= q_min and q_min - low <= 0.05 and high >= 1.0  # the axis starts at the lowest Q, not 0
        assert f"step {s.step:,}" in fig._suptitle.get_text() and s.step == 4 * 16
    SampleState(10).save(tmp_path / "new.arrow")
    with _drawn(tmp_path / "new.arrow") as fig:
        assert "step" not in fig._suptitle.get_text()  # nothing reported yet: no "step 0"

"""What a state says, computed from its columns (geko_data.summary): groups, summary, top samples, transitions."""

import numpy as np
import pytest

from geko_data import policy, summary


def _cols(n=12):
    """Columns of ``n`` samples: buckets cycling 0-3, every third sample pruned, two never seen."""
    ids = np.arange(n)
    loss = np.linspace(0.1, 2.0, n).astype(np.float32)
    loss[[2, 4]] = np.nan
    return {"bucket": (ids % 4).astype(np.uint8), "pruned": ids % 3 == 0, "loss": loss,
            "confidence": np.full(n, 0.5, np.float32), "q": np.linspace(0, 1, n).astype(np.float32),
            "times_seen": (ids % 6).astype(np.uint16), "forgets": (ids % 5).astype(np.uint16),
            "frozen_epochs": (ids % 7).astype(np.uint8)}


def test_a_pruned_sample_is_its_own_group_whatever_its_bucket():
    c = _cols()
    g = summary.groups(c["bucket"], c["pruned"])
    assert summary.GROUPS == ("FREEZE", "LIGHT", "FOCUS", "HARD", "PRUNED") and summary.PRUNED == 4
    assert (g[c["pruned"]] == summary.PRUNED).all() and (g[~c["pruned"]] == c["bucket"][~c["pruned"]]).all()


def test_summarize_counts_every_sample_once():
    c = _cols()
    s = summary.summarize(c)
    assert s["samples"] == 12 and s["pruned"] == 4 and s["seen"] == 10
    assert sum(b["count"] for b in s["buckets"].values()) + s["pruned"] == 12
    alive = ~c["pruned"]
    assert s["active"] == int((alive & (c["bucket"] != policy.FREEZE)).sum())
    light = alive & (c["bucket"] == policy.LIGHT)
    seen = light & np.isfinite(c["loss"])
    assert s["buckets"]["LIGHT"]["mean_loss"] == pytest.approx(float(c["loss"][seen].mean()))
    assert s["buckets"]["LIGHT"]["mean_q"] == pytest.approx(float(c["q"][light].mean()))
    assert s["times_seen"]["0"] == 2 and s["times_seen"]["3-4"] == 4 and sum(s["times_seen"].values()) == 12
    assert s["sample_passes"] == int(c["times_seen"].sum()) and s["forgetting_events"] == int(c["forgets"].sum())


def test_summarize_of_an_empty_bucket_has_no_means():
    c = _cols()
    c["bucket"][:] = policy.LIGHT
    s = summary.summarize(c)
    assert s["buckets"]["HARD"] == {"count": 0, "share": 0.0, "mean_loss": None, "mean_confidence": None,
                                    "mean_q": None}


def test_top_kinds():
    c = _cols()
    c["bucket"][:] = policy.HARD
    c["pruned"][:] = False
    c["pruned"][11] = True
    hard = summary.top("hard", c, 20)
    assert hard.tolist() == [10, 9, 8, 7, 6, 5, 3, 1, 0, 2, 4]  # by loss, unseen last (in id order), no pruned
    assert summary.top("hard", c, 3).tolist() == [10, 9, 8]
    assert summary.top("forgetful", c, 3).tolist() == [4, 9, 3]  # 4 forgets, then 4 again (id order), then 3
    c = _cols()
    frozen = summary.top("frozen", c, 100)
    expected = np.flatnonzero((c["bucket"] == policy.FREEZE) | c["pruned"])
    assert sorted(frozen.tolist()) == expected.tolist()
    assert (np.diff(c["frozen_epochs"][frozen].astype(int)) <= 0).all()


@pytest.mark.parametrize("kind, n, needle", [("easy", 3, "got 'easy'"), ("hard", -1, "got -1")])
def test_top_refuses_bad_arguments(kind, n, needle):
    with pytest.raises(ValueError, match=needle):
        summary.top(kind, _cols(), n)


def test_transitions():
    a = np.array([0, 1, 2, 3, 4, 1, 1], np.int8)
    b = np.array([0, 4, 2, 4, 4, 2, 1], np.int8)
    matrix, newly = summary.transitions(a, b)
    assert matrix.shape == (5, 5) and matrix.sum() == 7 and np.trace(matrix) == 4
    assert matrix[1, 4] == 1 and matrix[3, 4] == 1 and matrix[1, 2] == 1 and matrix[4, 4] == 1
    assert newly.tolist() == [1, 3]


def test_answers_counts_the_seen_samples_most_common_first():
    from geko_data import summary as sm

    answer = np.array([4, 4, 4, 9, 9, 1, 0, 0], np.uint32)
    seen = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)  # the two unseen carry the column's 0
    bucket = np.array([policy.FREEZE, policy.FREEZE, policy.LIGHT, policy.FOCUS, policy.FREEZE, policy.LIGHT,
                       policy.FOCUS, policy.FOCUS], np.uint8)
    pruned = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
    got = sm.answers(answer, seen=seen, bucket=bucket, pruned=pruned, correct=correct, top=2)
    assert got["distinct"] == 3 and got["seen"] == 6 and [r["answer"] for r in got["rows"]] == [4, 9]
    four = got["rows"][0]
    assert four["samples"] == 3 and four["freeze_share"] == pytest.approx(1 / 3)  # the pruned one is not FREEZE
    assert four["right_share"] == 1.0 and four["trained_weight_share"] is None  # no plan given
    counts = np.array([0, 0, 1, 2, 0, 1, 1, 1], np.uint16)
    weight = np.array([0, 0, 2, 1, 0, 1, 1, 1], np.float32)
    got = sm.answers(answer, seen=seen, bucket=bucket, pruned=pruned, correct=correct, counts=counts,
                     weight=weight)
    assert [r["trained_weight_share"] for r in got["rows"]] == pytest.approx([0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match="top"):
        sm.answers(answer, seen=seen, bucket=bucket, pruned=pruned, correct=correct, top=0)

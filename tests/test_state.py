import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.state import COLUMNS, SampleState
from geko_data.statefile import OPTIONAL_COLUMNS

#: The columns a state that was never given answers writes.
WRITTEN = [c[0] for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS]

from test_statefile import _filled, unblock_fifo_later  # noqa: F401 (test_cli imports the FIFO helper from here)


def test_memory_is_32_bytes_per_sample_and_36_once_answers_are_reported():
    s = SampleState(1000)
    assert s.nbytes == 32 * 1000  # the answer column, never set, holds no memory
    s.report([0], [0.5], answer=[3])
    assert s.nbytes == 36 * 1000 and s.answer[0] == 3 and not s.answer[1:].any()


def test_report_answer_last_occurrence_wins_and_a_report_without_it_keeps_the_column():
    s = SampleState(6)
    s.report([1, 2, 1], [0.5, 0.5, 0.5], answer=torch.tensor([7, 8, 9]))
    assert s.answer.dtype == np.uint32 and s.answer.tolist() == [0, 9, 8, 0, 0, 0]
    s.report([2, 5], [0.5, 0.5])
    assert s.answer.tolist() == [0, 9, 8, 0, 0, 0]
    s.report([3, 4], [0.5, float("nan")], answer=np.array([2**32 - 1, 3], dtype=np.uint64))
    assert s.answer.tolist() == [0, 9, 8, 2**32 - 1, 0, 0]  # a NaN loss applies nothing, its answer neither


@pytest.mark.parametrize("answer,message", [
    ([-1, 0], r"`answer` must be integers in \[0, 2\*\*32\), got -1"),
    ([0, 2**32], r"`answer` must be integers in \[0, 2\*\*32\), got 4294967296"),
    (np.array([2**63, 1], dtype=np.uint64), r"got 9223372036854775808"),
    ([0.0, 1.0], r"`answer` must be integers \(labels as floats: pass `\.long\(\)` / `\.astype\(int\)`\), "
                 r"got dtype float64"),
    ([1, 2, 3], r"`answer` must have the length of `ids` \(2\), got 3"),
])
def test_bad_answers_are_refused_naming_the_argument_and_value(answer, message):
    s = SampleState(4)
    with pytest.raises(ValueError, match=message):
        s.report([0, 1], [0.1, 0.2], answer=answer)
    assert not s.seen.any()  # nothing applied


def test_report_defaults_and_duplicates():
    s = SampleState(5)
    applied = s.report([1, 1, 3], [2.0, 0.1, 0.5])
    assert applied == 3
    assert s.times_seen.tolist() == [0, 2, 0, 1, 0]  # every occurrence is a pass
    assert s.loss[1] == pytest.approx(0.1)  # last occurrence wins
    assert s.confidence[1] == pytest.approx(np.exp(-0.1))  # default confidence exp(-loss)
    assert bool(s.correct[1]) and bool(s.correct[3])  # default correct = confidence >= 0.5
    assert np.isnan(s.loss[0])


def test_report_accepts_tensors_of_any_float_dtype():
    s = SampleState(4)
    s.report(torch.tensor([0, 2]), torch.tensor([0.5, 1.0], dtype=torch.bfloat16, requires_grad=True),
             correct=torch.tensor([True, False]), confidence=torch.tensor([0.9, 0.2]))
    assert s.loss[0] == pytest.approx(0.5) and not s.correct[2] and s.confidence[2] == pytest.approx(0.2)


def test_nonfinite_losses_are_counted_not_applied():
    s = SampleState(3)
    assert s.report([0, 1, 2], [float("nan"), float("inf"), 1.0]) == 1
    assert s.num_nonfinite == 2 and s.times_seen.tolist() == [0, 0, 1]


def test_q_ema_and_var_follow_the_rules():
    cfg = GEKOConfig(q_value_lr=0.5, loss_ema=0.5)
    s = SampleState(1, config=cfg)
    s.report([0], [2.0])
    assert s.q[0] == pytest.approx(0.5 * 0.5 + 0.5 * 0.8)
    assert s.loss_ema[0] == 2.0 and s.loss_var[0] == 0.0
    s.report([0], [0.0])
    assert s.loss_ema[0] == pytest.approx(1.0)
    assert s.loss_var[0] == pytest.approx(0.5 * (0 + 0.5 * 4.0))


def test_forgetting_and_thaw():
    s = SampleState(2, config=GEKOConfig(q_value_lr=1.0, min_q_for_freeze=0.5))
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    st = s.repartition(0.5)
    assert st.freeze == 2
    s.report([0], [3.0], correct=[False], confidence=[0.9])
    assert s.forgets.tolist() == [1, 0]
    assert s.bucket[0] == policy.HARD  # a FREEZE sample that turns wrong leaves FREEZE at once
    assert s.frozen_epochs[0] == 0


def test_repartition_history_and_pruning():
    s = SampleState(4, config=GEKOConfig(q_value_lr=1.0, min_q_for_freeze=0.5, prune_frozen_after=2))
    s.report([0, 1], [0.01, 0.01], correct=[True, True], confidence=[0.99, 0.99])
    s.report([2], [5.0], correct=[False], confidence=[0.1])
    a = s.repartition(0.1)
    assert (a.freeze, a.focus, a.pruned, a.active) == (2, 2, 0, 2)
    b = s.repartition(0.5)
    assert b.pruned == 2 and b.newly_pruned == 2 and s.pruned[:2].all()
    s.report([0], [9.0], correct=[False], confidence=[0.9])  # pruned never comes back
    c = s.repartition(0.9)
    assert s.pruned[0] and c.pruned == 2
    assert [h["epoch"] for h in s.history] == [0, 1, 2]


@pytest.mark.parametrize("kwargs,name", [
    ({"ids": [0.5], "losses": [1.0]}, "ids"), ({"ids": [5], "losses": [1.0]}, "ids"),
    ({"ids": [-1], "losses": [1.0]}, "ids"), ({"ids": [0, 1], "losses": [1.0]}, "losses"),
    ({"ids": [0], "losses": [1.0], "confidence": [1.5]}, "confidence"),
    ({"ids": [0], "losses": [1.0], "confidence": [-0.5]}, "confidence"),
    ({"ids": [0], "losses": [1.0], "correct": [True, False]}, "correct"),
    ({"ids": [[0]], "losses": [[1.0]]}, "ids"), ({"ids": [0], "losses": ["x"]}, "losses")])
def test_bad_reports_name_the_argument(kwargs, name):
    s = SampleState(5)
    with pytest.raises(ValueError, match=name):
        s.report(kwargs["ids"], kwargs["losses"], correct=kwargs.get("correct"), confidence=kwargs.get("confidence"))


@pytest.mark.parametrize("memory_map", [True, False])
def test_save_load_round_trip_bit_exact(tmp_path, memory_map):
    s = _filled()
    path = tmp_path / "state.arrow"
    s.save(path)
    t = SampleState.load(path, memory_map=memory_map)
    for name, _, _ in COLUMNS:
        a, b = getattr(s, name), getattr(t, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert t.history == s.history and t.config == s.config and t.step == s.step and t.fingerprint == "abc"
    t.report([0], [1.0])  # mutation after a memory-mapped load copies first
    assert t.times_seen[0] == s.times_seen[0] + 1


def test_should_stop_at_early_stop_frozen():
    s = SampleState(10, config=GEKOConfig(early_stop_frozen=0.5))
    assert not s.should_stop
    s.repartition(0.1)
    s.bucket[:5] = policy.FREEZE
    assert s.frozen_share == 0.5 and s.should_stop
    never = SampleState(4, config=GEKOConfig(early_stop_frozen=1.0))
    never.repartition(0.1)
    never.bucket[:] = policy.FREEZE
    assert never.frozen_share == 1.0 and not never.should_stop  # 1.0 disables early stopping


def test_the_state_file_keeps_the_current_plan(tmp_path):
    from geko_data.plan import epoch_plan

    s = _filled(60)
    s.plan = epoch_plan(s, seed=3, epoch=2, total_epochs=4)
    s.save(tmp_path / "state.arrow")
    table = pa.ipc.open_file(str(tmp_path / "state.arrow")).read_all()
    assert table.column_names == ["id"] + WRITTEN + ["plan_count", "plan_weight"]
    t = SampleState.load(tmp_path / "state.arrow")
    assert t.plan is not None and t.plan.epoch == 2 and t.plan.seed == 3
    np.testing.assert_array_equal(t.plan.counts, s.plan.counts)
    np.testing.assert_array_equal(t.plan.loss_weight, s.plan.loss_weight)
    assert t.nbytes == 32 * 60  # the plan is not per-sample learning state
    np.testing.assert_array_equal(t.loss_weights([0, 5]), s.plan.loss_weight[[0, 5]])


def test_loss_weights_validate_ids_and_default_to_the_last_progress():
    s = _filled(30)
    with pytest.raises(ValueError, match="epoch"):
        s.loss_weights([0, 1])  # no plan yet: which epoch's weights is not for the state to guess
    assert s.loss_weights([0, 1], epoch=2, total_epochs=3).shape == (2,)
    for bad, match in (([-1], r"\[0, 30\)"), ([30], r"\[0, 30\)"), ([0.5], "integers")):
        with pytest.raises(ValueError, match=match):
            s.loss_weights(bad)


def test_negative_loss_gives_a_confidence_of_at_most_one():
    s = SampleState(2)
    s.report([0, 1], [-0.5, 0.2])
    assert s.confidence[0] == 1.0 and s.correct[0]


# ---------------------------------------------------------------------- the file speaks for itself
def test_sampler_counts_reports_as_steps_when_the_loop_passes_none(tmp_path):
    """A loop that never passes step= still gets a step and last_step that order the reports."""
    from geko_data.sampler import GEKOSampler

    sampler = GEKOSampler(12, total_epochs=2, seed=0)
    sampler.set_epoch(0)
    ids = list(sampler)
    for i in range(0, len(ids), 4):
        sampler.report(ids[i:i + 4], np.full(len(ids[i:i + 4]), 0.5, np.float32))
    state = sampler.state
    assert state.step == 3  # three reports
    assert sorted(set(state.last_step[ids].tolist())) == [1, 2, 3]
    state.report([0], [1.0], step=100)  # a loop's own step wins, and counting goes on from it
    state.report([1], [1.0])
    assert state.step == 101 and state.last_step[1] == 101
    state.save(tmp_path / "s.arrow")
    assert SampleState.load(tmp_path / "s.arrow").step == 101


def _mapped_from(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (from /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _in_file(arr, ranges) -> bool:
    start = arr.__array_interface__["data"][0]
    return any(lo <= start and start + arr.nbytes <= hi for lo, hi in ranges)


NUMERIC = [name for name, dtype, _ in COLUMNS if dtype != "bool" and name not in OPTIONAL_COLUMNS]


def test_a_loaded_state_is_a_view_of_its_file_until_a_column_is_written(tmp_path):
    s = _filled(1000)
    s.save(tmp_path / "s.arrow")
    t = SampleState.load(tmp_path / "s.arrow")
    ranges = _mapped_from(tmp_path / "s.arrow")
    assert ranges, "the file is not memory-mapped"
    assert {n for n in NUMERIC if _in_file(getattr(t, n), ranges)} == set(NUMERIC)
    # A report of samples that neither forget nor thaw writes neither forgets, bucket nor frozen_epochs:
    # those stay views of the file, the written ones are now private copies.
    seen = np.flatnonzero(t.correct & (t.bucket != policy.FREEZE))[:5]
    t.report(seen, np.full(5, 0.01, np.float32), correct=np.ones(5, bool), confidence=np.full(5, 0.99, np.float32))
    untouched = {"bucket", "frozen_epochs", "forgets"}
    assert {n for n in NUMERIC if _in_file(getattr(t, n), ranges)} == untouched
    assert set(t.mapped_columns) == untouched  # booleans are unpacked from Arrow's bitmaps: never mapped
    # Writing copied the columns; the file and the original state are unchanged.
    assert np.array_equal(SampleState.load(tmp_path / "s.arrow").loss, s.loss, equal_nan=True)
    assert t.loss[seen] == pytest.approx(0.01)


def test_a_loaded_state_unpacks_its_booleans_when_read_and_keeps_its_plan_counts_mapped(tmp_path):
    """Booleans are bits in the file: a loaded state holds them packed until a column is read (1 byte a
    sample each after), and a saved plan's counts stay the file's uint16 (they were widened to int32, 4 bytes
    a sample, on every load)."""
    from geko_data.plan import epoch_plan

    s = _filled(1000)
    s.plan = epoch_plan(s, seed=0, epoch=1, total_epochs=3)
    s.save(tmp_path / "s.arrow")
    t = SampleState.load(tmp_path / "s.arrow")
    assert "correct" not in vars(t) and "pruned" not in vars(t)
    assert {"correct", "pruned"} <= set(t.mapped_columns)
    ranges = _mapped_from(tmp_path / "s.arrow")
    assert _in_file(t.plan.counts, ranges) and t.plan.counts.dtype == np.uint16
    np.testing.assert_array_equal(t.plan.counts, s.plan.counts)
    np.testing.assert_array_equal(t.correct, s.correct)  # read: unpacked once, then an ordinary column
    assert "correct" in vars(t) and "correct" not in t.mapped_columns and "pruned" in t.mapped_columns
    np.testing.assert_array_equal(t.pruned, s.pruned)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        t.nothing


@pytest.mark.parametrize("step", [1 << 20, 97])
def test_ranking_within_report_windows_matches_a_sort_of_every_step(monkeypatch, step):
    """``policy.easiest_in_windows`` finds each sample's span from a few order statistics of the steps (a
    histogram, or a selection when the steps spread wide); the spans and the freezes are those of the plain
    definition: a sort of every step, each sample's span from its rank. It goes over the samples in steps
    (``policy._STEP``): the result does not depend on where they fall."""
    monkeypatch.setattr(policy, "_STEP", step)
    rng = np.random.default_rng(8)
    for trial in range(120):
        n = int(rng.integers(1, 4000))
        seen = rng.random(n) < rng.random()
        loss = (rng.choice(np.float32([0.1, 0.5, 2.0]), n) if trial % 3 == 0
                else rng.exponential(1, n).astype(np.float32))
        loss[~seen] = np.nan
        steps = rng.integers(-1, 2**31 - 1 if trial % 2 else int(rng.integers(1, 60)), n).astype(np.int32)
        share = float(rng.choice([0.1, 0.5, 1.0]))
        idx = np.flatnonzero(seen)
        want = np.zeros(n, bool)
        if idx.size:
            windows = max(1, min(policy.RANK_WINDOWS, idx.size // policy.MIN_WINDOW))
            span_of = np.searchsorted(np.sort(steps[idx]), steps[idx], side="left") * windows // idx.size
            for w in np.unique(span_of):
                span = idx[span_of == w]
                cut = np.quantile(loss[span].astype(np.float64), share, method="lower") if share < 1 else np.inf
                want[span[loss[span] <= cut]] = True
        got = policy.easiest_in_windows(seen=seen, loss=loss, last_step=steps, share=share)
        assert np.array_equal(got, want), trial


def _straightforward_easiest(seen, loss, steps, share):
    """``easiest_in_windows`` by its definition: spans from a sort of every seen step, each span's cut its
    "lower" quantile by np.quantile in float64."""
    seen = seen & np.isfinite(np.asarray(loss, dtype=np.float64))
    idx = np.flatnonzero(seen)
    want = np.zeros(seen.shape[0], bool)
    if idx.size:
        windows = max(1, min(policy.RANK_WINDOWS, idx.size // policy.MIN_WINDOW))
        span_of = np.searchsorted(np.sort(steps[idx]), steps[idx], side="left") * windows // idx.size
        for w in np.unique(span_of):
            span = idx[span_of == w]
            values = np.asarray(loss[span], dtype=np.float64)
            cut = np.quantile(values, share, method="lower") if share < 1 else np.inf
            want[span[values <= cut]] = True
    return want


@pytest.mark.parametrize("step", [1 << 20, 97])
def test_radix_select_of_the_cuts_matches_the_quantile_of_every_span(monkeypatch, step):
    """The cuts come from a radix select over the losses' order-preserving bits (``policy._radix_cuts``) and
    each sample's span through a table of step values: the freezes are those of a sort and a quantile, over
    negative losses, -0.0 next to 0.0, float16/float64/integer losses, infinite ones (not ranked), many ties
    in one radix bin, one window, no seen sample, share 0, steps spread too wide for the table (and past
    int32, where the packed steps widen), and the mask written into ``out=``."""
    monkeypatch.setattr(policy, "_STEP", step)
    rng = np.random.default_rng(21)
    for trial in range(90):
        n = int(rng.integers(1, 3000))
        seen = rng.random(n) < (rng.random() if trial % 10 else 0.0)
        kind = trial % 6
        if kind == 0:
            loss = rng.normal(0, 1, n).astype(np.float32)
            loss[rng.random(n) < 0.2] = -0.0
            loss[rng.random(n) < 0.2] = 0.0
        elif kind == 1:
            loss = rng.exponential(1, n).astype(np.float64)
        elif kind == 2:
            loss = rng.exponential(1, n).astype(np.float16)
        elif kind == 3:
            loss = rng.integers(-5, 5, n)
        elif kind == 4:  # ties in one radix bin: values 1 + k * 2**-20 share their top bits
            loss = (1 + rng.integers(0, 4, n) * np.float32(2**-20)).astype(np.float32)
        else:
            loss = rng.exponential(1, n).astype(np.float32)
            loss[rng.random(n) < 0.05] = np.inf
        wide = trial % 4 == 1
        steps = rng.integers(-3, 2**40 if wide else int(rng.integers(1, 40)), n).astype(np.int64)
        share = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
        got = policy.easiest_in_windows(seen=seen, loss=loss, last_step=steps, share=share)
        assert np.array_equal(got, _straightforward_easiest(seen, loss, steps, share)), trial
        into = np.ones(n, bool)  # written whole into out=, whatever it held
        assert policy.easiest_in_windows(seen=seen, loss=loss, last_step=steps, share=share, out=into) is into
        assert np.array_equal(into, got), trial


def test_update_rules_live_in_policy():
    cfg = GEKOConfig(loss_ema=0.5, focus_confidence=0.6)
    ema, var = policy.loss_ema_update(np.float32([2.0, np.nan]), np.float32([0.0, 0.0]), np.float32([0.0, 3.0]),
                                      prev_seen=np.array([True, False]), beta=cfg.loss_ema)
    assert ema.tolist() == [1.0, 3.0] and var.tolist() == [pytest.approx(1.0), 0.0]
    which, codes = policy.thaw(np.uint8([policy.FREEZE, policy.FREEZE, policy.FREEZE, policy.LIGHT]),
                               correct=np.array([False, False, True, False]), confidence=np.float32([0.9, 0.1, 0.9, 0.9]),
                               pruned=np.zeros(4, bool), config=cfg)
    assert which.tolist() == [True, True, False, False] and codes.tolist() == [policy.HARD, policy.FOCUS]
    assert policy.thaw(np.uint8([policy.LIGHT]), correct=np.array([False]), confidence=np.float32([0.9]),
                       pruned=np.zeros(1, bool), config=cfg) is None


def test_last_occurrences_agree_with_numpy_unique():
    from geko_data.state import _last_occurrences

    rng = np.random.default_rng(4)
    for m, n in ((0, 5), (1, 5), (50, 10), (1000, 100_000), (3000, 200)):
        ids = rng.integers(0, n, m)
        uniq, first_in_reversed, passes = np.unique(ids[::-1], return_index=True, return_counts=True)
        got = _last_occurrences(ids, n)
        assert [a.tolist() for a in got] == [uniq.tolist(), (m - 1 - first_in_reversed).tolist(), passes.tolist()]


def _repartition_peak(s):
    """Peak bytes Python-traced allocations reach during one repartition."""
    import tracemalloc

    tracemalloc.start()
    try:
        s.repartition(0.5)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_repartition_makes_no_whole_column_int64_or_float_copies():
    n = 1_000_000
    s = SampleState(n, config=GEKOConfig(freeze_confidence=0.9))
    s.report(np.arange(0, n, 2), np.random.default_rng(0).exponential(0.5, n // 2).astype(np.float32))
    peak = _repartition_peak(s)
    # a few boolean and uint8 temporaries; bincount's int64 codes and nanmean's copy made it 14 bytes a sample
    assert peak < 10 * n
    assert s.history[-1]["mean_loss"] == pytest.approx(float(np.nanmean(s.loss)), rel=1e-6)


def test_repartition_with_the_default_share_rule_keeps_report_steps_in_their_int32():
    n = 1_000_000
    s = SampleState(n)  # default policy: the easiest share within report windows
    for part in range(4):
        ids = np.arange(part, n, 4)
        s.report(ids, np.random.default_rng(part).exponential(0.5, ids.shape[0]).astype(np.float32), step=part)
    peak = _repartition_peak(s)
    # 28 bytes a sample here; int64 copies of the steps (and of their ranks) made it 36
    assert peak < 32 * n


def _run_digest(seed_cases=24):
    """A digest of what a few epochs of reports, repartitions, plans and orders produce, on small states."""
    import hashlib
    import json

    from geko_data import plan

    h = hashlib.sha256()
    for case in range(seed_cases):
        rng = np.random.default_rng(case)
        n = int(rng.integers(1, 3000))
        cfg = dict(freeze_share=0.5, freeze_confidence=None, bucket_weights=(3.0, 2.0, 1.0), curriculum_min_epochs=5,
                   short_run_keep=None, max_times_seen=50, recheck_frozen=0.05, max_repeats=5, prune_frozen_after=0)
        if case % 4 == 1:
            cfg["prune_frozen_after"] = 1
        if case % 5 == 2:
            cfg.update(freeze_share=None, freeze_confidence=0.7)
        if case % 6 == 3:
            cfg["freeze_share"] = 1.0
        s = SampleState(n, config=GEKOConfig(**cfg))
        for epoch in range(3):
            ids = rng.permutation(n)[: int(rng.integers(0, n + 1))]
            if ids.size:
                s.report(ids, rng.exponential(0.7, ids.size).astype(np.float32),
                         step=epoch * 10 + int(rng.integers(0, 9)))
            stats = s.repartition(0.3 * epoch, epoch=epoch, phase="")
            p = plan.epoch_plan(s, seed=case, epoch=epoch, total_epochs=3)
            for column in (s.bucket, s.frozen_epochs, s.pruned, p.counts, p.loss_weight,
                           plan.global_order(p.counts, seed=case, epoch=epoch)):
                h.update(np.ascontiguousarray(column).tobytes())
            h.update(json.dumps(stats.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:32]


@pytest.mark.parametrize("step", [1 << 20, 300])
def test_repartition_plan_and_order_are_those_of_the_whole_array_implementation(monkeypatch, step):
    """Repartition, classification, the plan and the order go over the samples in steps of a million (their
    temporaries stay in cache) instead of whole-array passes: the buckets, frozen epochs, pruned samples,
    partition counts, plans and orders are bit for bit those of the whole-array implementation they
    replaced, whose digest this is, wherever the steps fall. (The digest holds the policy's rules too: a
    change of a rule changes it; a change of how the same rules are computed must not.)"""
    from geko_data import plan

    import geko_data.state as state_module

    for module in (state_module, policy):
        monkeypatch.setattr(module, "_STEP", step)
    monkeypatch.setattr(plan, "_CHUNK", step)
    assert _run_digest() == "5c499bfd3a77bb7476027f3fe8eae15a"


def test_large_report_by_blocks_of_ids_is_the_report_in_one_go(monkeypatch):
    """A report of many ids is applied by blocks of ids (rows that stay in cache between gather and scatter):
    every column ends as when the report is applied in one go, repeats, thaws and forgets included."""
    import geko_data.state as state_module

    def run(blocked):
        monkeypatch.setattr(state_module, "_BLOCKED_REPORT", 1 if blocked else 1 << 40)
        monkeypatch.setattr(state_module, "_ROWS", 37)
        rng = np.random.default_rng(5)
        s = SampleState(1000, config=GEKOConfig(freeze_confidence=0.5))
        for e in range(4):
            ids = rng.integers(0, 1000, 1500)  # repeats
            s.report(ids, rng.exponential(0.7, 1500).astype(np.float32), step=e)
            s.repartition(0.5)
        return {name: getattr(s, name).copy() for name in state_module._NAMES}

    one_go, blocked = run(False), run(True)
    assert one_go["forgets"].any() and one_go["times_seen"].max() > 4
    for name in one_go:
        np.testing.assert_array_equal(blocked[name], one_go[name], err_msg=name)


def test_a_one_sample_state_holds_no_answer_column_until_one_is_reported(tmp_path):
    s = SampleState(1)
    assert s.nbytes == 32 and s.mapped_columns == ()
    s.save(tmp_path / "one.arrow")
    assert "answer" not in pa.ipc.open_file(str(tmp_path / "one.arrow")).read_all().column_names

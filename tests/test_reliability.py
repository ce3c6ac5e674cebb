"""Hostile inputs and invariants under random use (hypothesis): nothing is lost, nothing unexpected is read."""

import errno
import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from geko_data import plan, policy
from geko_data.config import GEKOConfig
from geko_data.shards import index_shards
from geko_data.state import SampleState
from geko_data.stream import GEKOStream, stream_order


def test_disk_full_while_saving_keeps_the_previous_state(tmp_path, monkeypatch):
    s = SampleState(1000)
    s.report(np.arange(10), np.ones(10))
    path = tmp_path / "state.arrow"
    s.save(path)
    before = path.read_bytes()
    real = pa.OSFile

    class FullDisk:
        def __init__(self, name, mode="rb"):
            self.f = real(name, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(pa, "OSFile", FullDisk)
    s.report(np.arange(10), np.zeros(10))
    with pytest.raises(OSError):
        s.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.arrow"]
    assert SampleState.load(path).loss[0] == 1.0


def test_member_names_are_never_used_as_paths(tmp_path, monkeypatch):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name in ("../../escape.txt", "/abs/olute.txt", "ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    idx = index_shards([path], output=tmp_path / "index.arrow")
    assert list(idx.keys) == ["../../escape", "/abs/olute", "ok"]
    monkeypatch.chdir(tmp_path)
    got = [s["__key__"] for s in GEKOStream(tmp_path, total_epochs=1, shuffle=False,
                                             config=GEKOConfig(log_bucket_stats=False))]
    assert got == ["../../escape", "/abs/olute", "ok"]
    assert sorted(os.listdir(tmp_path)) == ["evil.tar", "index.arrow"]  # nothing written anywhere
    assert not os.path.exists(tmp_path.parent.parent / "escape.txt")


finite_or_not = st.one_of(st.floats(0, 12, width=32), st.sampled_from([float("nan"), float("inf"), 1e19]))
report_st = st.lists(st.tuples(st.integers(0, 39), finite_or_not, st.booleans()), min_size=0, max_size=80)
FROZEN_DRAWN = []  # (re-checks seen, frozen-and-drawn) per example: the companion test asserts they happen


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(report_st, min_size=1, max_size=6), st.sampled_from(["geko", "unbiased"]), st.integers(1, 4),
       st.integers(0, 3))
def test_state_and_plan_invariants(reports, mode, world, seed):
    # Per-sample losses and correctness, so samples spread over all buckets; prune after 2 FREEZE
    # repartitions, so FREEZE samples exist and are drawn (as re-checks) before they are pruned.
    cfg = GEKOConfig(mode=mode, q_value_lr=0.9, min_q_for_freeze=0.5, prune_frozen_after=2, recheck_frozen=0.5,
                     anneal=0.0, log_bucket_stats=False)
    s = SampleState(40, config=cfg)
    pruned_before = np.zeros(40, bool)
    for epoch, rows in enumerate(reports):
        ids = [r[0] for r in rows]
        losses = [r[1] for r in rows]
        correct = [r[2] and np.isfinite(r[1]) and r[1] < 1 for r in rows]
        s.report(ids, losses, correct=correct)
        s.repartition(min(1.0, (epoch + 0.5) / len(reports)), epoch=epoch)
        assert (s.pruned >= pruned_before).all()  # pruned never comes back
        pruned_before = s.pruned.copy()
        seen = s.seen
        assert np.isfinite(s.loss[seen]).all() and np.isfinite(s.q).all() and np.isfinite(s.loss_var).all()
        p = plan.epoch_plan(s, seed=seed, epoch=epoch, total_epochs=len(reports))
        assert (p.counts[s.pruned] == 0).all()
        frozen = s.bucket == policy.FREEZE
        if mode == "geko":  # FREEZE is only ever drawn as a forward-only re-check
            assert (p.loss_weight[frozen & (p.counts > 0)] == 0).all()
            FROZEN_DRAWN.append(int((frozen & ~s.pruned & (p.counts > 0)).sum()))
        order = plan.global_order(p.counts, seed=seed, epoch=epoch)
        parts = [plan.rank_slice(order, rank=r, world_size=world) for r in range(world)]
        assert len({len(x) for x in parts}) == 1
        got = np.bincount(np.concatenate(parts).astype(np.int64), minlength=40)
        assert (got >= p.counts).all() and (got - p.counts).sum() < world


def test_the_invariant_test_draws_frozen_samples():
    # The invariants above only mean something if FREEZE samples were really drawn in some example.
    if not FROZEN_DRAWN:
        test_state_and_plan_invariants()
    assert sum(FROZEN_DRAWN) > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 5), st.integers(0, 5))
def test_stream_order_covers_every_rank_and_worker(counts_list, world, workers, batch, seed):
    n = len(counts_list)
    counts = np.array(counts_list, dtype=np.int32)
    index = _fake_index(n)
    p = plan.EpochPlan(epoch=1, progress=0.5, counts=counts, loss_weight=np.ones(n, np.float32))
    everything = []
    lengths = set()
    for rank in range(world):
        order = stream_order(index, p, seed=seed, rank=rank, world_size=world, shuffle_buffer=7)
        lengths.add(len(order))
        # what each DataLoader worker reads: batch j goes to worker j % workers
        for w in range(workers):
            everything += order[(np.arange(len(order)) // batch) % workers == w].tolist()
    assert len(lengths) == 1
    got = np.bincount(np.array(everything, dtype=np.int64), minlength=n)
    assert (got >= counts).all() and (got - counts).sum() < world


def _fake_index(n):
    from geko_data.shards import ShardIndex

    shard = (np.arange(n) * 3 // max(n, 1)).astype(np.int32)
    return ShardIndex(shards=("a", "b", "c"), sizes=(0, 0, 0), keys=np.array([f"k{i}" for i in range(n)], object),
                      shard=shard, offset=np.arange(n, dtype=np.int64) * 512,
                      length=np.full(n, 512, np.int64), fingerprint="x")

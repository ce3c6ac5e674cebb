import warnings
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from geko_data import policy
from geko_data.config import MOUNTAIN, GEKOConfig
from geko_data.sampler import GEKOSampler
from resume_check import check_resume

# GEKO's rule of skipping every FREEZE sample (short runs keep half of them by default: tested in test_policy)
QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None)


class Squares(Dataset):
    """Module-level so spawn workers can pickle it; ``tuples=True`` gives (x, y) items, as TensorDataset's."""

    def __init__(self, n, tuples=False):
        self.n, self.tuples = n, tuples

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x, y = torch.tensor([float(i)]), i * i
        return (x, y) if self.tuples else {"x": x, "y": y}


class Plain(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return (i, "text")


def test_validation_names_arguments():
    with pytest.raises(ValueError, match="total_epochs"):
        GEKOSampler(10, total_epochs=0)
    with pytest.raises(ValueError, match="seed"):
        GEKOSampler(10, total_epochs=1, seed=-1)
    with pytest.raises(ValueError, match="rank"):
        GEKOSampler(10, total_epochs=1, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="data_source"):
        GEKOSampler(object(), total_epochs=1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_the_plan_exactly_once_up_to_padding(world):
    samplers = [GEKOSampler(37, total_epochs=3, config=QUIET, seed=4, num_replicas=world, rank=r)
                for r in range(world)]
    for s in samplers:
        s.state.bucket[:9] = policy.FREEZE
        s.state.bucket[9:15] = policy.HARD
        s.state.epoch = 1  # buckets set by hand: skip the repartition of epoch 1
        s.set_epoch(1)
    parts = [list(s) for s in samplers]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(samplers[0])
    counts = samplers[0].plan.counts
    joined = np.concatenate(parts)
    pad = len(joined) - counts.sum()
    assert 0 <= pad < world
    got = np.bincount(joined, minlength=37)
    assert (got - counts).sum() == pad and (got >= counts).all()
    assert got[:9].sum() == 0  # FREEZE never yielded in geko mode


def test_hard_yielded_more_than_focus_by_weight_ratio():
    # curriculum_min_epochs=1: a 3-epoch run's epoch 1 in the Mountain curriculum's PEAK
    s = GEKOSampler(2000, total_epochs=3, config=QUIET.replace(curriculum_min_epochs=1, phase_weights=MOUNTAIN),
                    seed=1)
    s.state.bucket[:1000] = policy.HARD
    s.state.bucket[1000:] = policy.FOCUS
    s.state.epoch = 1
    s.set_epoch(1)  # PEAK: HARD 5, FOCUS 2
    got = np.bincount(list(s), minlength=2000)
    ratio = got[:1000].sum() / got[1000:].sum()
    assert ratio == pytest.approx(2.5, rel=0.1)


def test_wrap_adds_index_and_weight():
    s = GEKOSampler(4, total_epochs=1, config=QUIET)
    wrapped = s.wrap(Plain())
    s.set_epoch(0)
    assert wrapped[2] == (2, "text", 2, 1.0)  # tuple items get index and weight appended
    d = s.wrap(Squares(4))[3]
    assert d["y"] == 9 and d["__index__"] == 3


@pytest.mark.parametrize("ctx,persistent", [("fork", False), ("fork", True), ("spawn", True), ("spawn", False)])
def test_workers_see_current_epoch_weights(ctx, persistent):
    ds = Squares(24)
    s = GEKOSampler(ds, total_epochs=4, config=GEKOConfig(mode="unbiased", log_bucket_stats=False, anneal=0.0,
                                                          keep_frozen=0.5), seed=3)
    loader = DataLoader(s.wrap(ds), batch_size=6, sampler=s, num_workers=2, multiprocessing_context=ctx,
                        persistent_workers=persistent)
    s.set_epoch(0)
    first = [w for b in loader for w in b["__weight__"].tolist()]
    assert set(first) == {1.0}
    s.state.bucket[:12] = policy.FREEZE  # as if feedback froze half of them
    s.state.epoch = 1
    s.set_epoch(1)
    seen = {}
    for b in loader:
        for i, w in zip(b["__index__"].tolist(), b["__weight__"].tolist()):
            seen[i] = w
    expected = s.plan.loss_weight
    assert seen and all(w == pytest.approx(expected[i]) for i, w in seen.items())
    # kept FREEZE samples are up-weighted (c / keep_frozen = 0.75 / 0.5), the others down-weighted
    assert any(w == pytest.approx(1.5) for i, w in seen.items() if i < 12)
    assert all(w == pytest.approx(0.75) for i, w in seen.items() if i >= 12)


def test_report_and_efficiency_report():
    s = GEKOSampler(10, total_epochs=2, config=QUIET.replace(q_value_lr=1.0, min_q_for_freeze=0.5))
    s.set_epoch(0)
    ids = list(s)
    s.report(torch.tensor(ids), torch.full((len(ids),), 0.01), correct=torch.ones(len(ids), dtype=torch.bool),
             confidence=torch.full((len(ids),), 0.99))
    s.set_epoch(1)
    assert s.state.history[-1]["freeze"] == 10 and len(s) == 0  # everything mastered: nothing to train
    rep = s.efficiency_report()
    assert rep["sample_passes"] == 10 and rep["uniform_passes"] == 20 and rep["compute_saved"] == 0.5
    assert "Compute saved" in s.format_efficiency_report()
    json.dumps(rep)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers,persistent,context", [(0, False, None), (2, False, "fork"), (2, True, "fork"),
                                                         (2, True, "spawn")])
def test_resume_check(num_workers, persistent, context):
    def make():
        ds = Squares(29)
        s = GEKOSampler(ds, total_epochs=3, config=QUIET, seed=11)
        kw = {"multiprocessing_context": context, "persistent_workers": persistent} if num_workers else {}
        return s, DataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=num_workers, **kw)
    check_resume(make, epochs=2, batch_size=4)


@pytest.mark.parametrize("mode", ["geko", "infobatch", "unbiased"])
def test_resume_check_with_feedback_mid_epoch(tmp_path, mode):
    # Stops in epoch 1, after frozen samples were re-checked and forgotten: the state moved mid-epoch.
    cfg = QUIET.replace(mode=mode, recheck_frozen=0.5, max_times_seen=3)

    def make():
        ds = Squares(31)
        s = GEKOSampler(ds, total_epochs=3, config=cfg, seed=3)
        return s, DataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=2,
                             multiprocessing_context="fork", persistent_workers=True)
    check_resume(make, epochs=3, batch_size=4, state_dir=tmp_path, stop_epoch=1)


def test_state_dict_validation():
    s = GEKOSampler(10, total_epochs=2, config=QUIET, seed=1)
    s.set_epoch(0)
    sd = json.loads(json.dumps(s.state_dict(consumed=3)))
    assert sd["version"] == 1 and sd["position"] == 3
    with pytest.raises(ValueError, match="seed"):
        GEKOSampler(10, total_epochs=2, config=QUIET, seed=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="num_samples"):
        GEKOSampler(11, total_epochs=2, config=QUIET, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="world_size"):
        GEKOSampler(10, total_epochs=2, config=QUIET, seed=1, num_replicas=2, rank=0).load_state_dict(sd)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_through_stateful_dataloader(num_workers):
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = Squares(30)

    def make():
        s = GEKOSampler(ds, total_epochs=2, config=QUIET, seed=5)
        s.set_epoch(0)
        kw = {"multiprocessing_context": "fork"} if num_workers else {}
        return s, tdl.StatefulDataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=num_workers, **kw)

    s, loader = make()
    full = [i for b in loader for i in b["__index__"].tolist()]
    s, loader = make()
    it = iter(loader)
    head = [i for _ in range(3) for i in next(it)["__index__"].tolist()]
    sd = loader.state_dict()
    s2, loader2 = make()
    loader2.load_state_dict(sd)
    tail = [i for b in loader2 for i in b["__index__"].tolist()]
    assert head + tail == full


def test_mid_epoch_resume_after_the_state_moved_uses_the_saved_plan(tmp_path):
    from geko_data.state import SampleState

    cfg = QUIET.replace(recheck_frozen=1.0, bucket_weights=(3, 2, 1))  # thawed samples then draw more than 1
    s = GEKOSampler(40, total_epochs=3, config=cfg, seed=2)
    s.state.bucket[:10] = policy.FREEZE
    s.state.epoch = 1
    s.set_epoch(1)
    order = list(s)
    # mid-epoch, the re-checked frozen samples turn out forgotten: they leave FREEZE at once
    s.report(list(range(10)), [5.0] * 10, correct=[False] * 10, confidence=[0.9] * 10)
    assert (s.state.bucket[:10] != policy.FREEZE).all()
    sd = json.loads(json.dumps(s.state_dict(consumed=12)))
    s.state.save(tmp_path / "state.arrow")  # the state file keeps the epoch's plan: nothing else to save
    s2 = GEKOSampler(40, total_epochs=3, config=cfg, seed=2)
    s2.use_state(SampleState.load(tmp_path / "state.arrow"))
    s2.load_state_dict(sd)
    s2.set_epoch(1)
    assert list(s2) == order[12:]  # the plan the epoch started with, not one recomputed from moved state
    recomputed = GEKOSampler(40, total_epochs=3, config=cfg, seed=2, state=SampleState.load(tmp_path / "state.arrow"))
    recomputed.state.plan = None
    recomputed.set_epoch(1)
    assert list(recomputed) != order  # (the check above could fail: a recomputed plan differs)
    s2.set_epoch(2)
    assert s2.plan.epoch == 2  # the saved plan only holds for its own epoch


def test_load_state_dict_rejects_another_plan_setting():
    s = GEKOSampler(20, total_epochs=3, config=QUIET, seed=1)
    s.set_epoch(0)
    sd = s.state_dict(consumed=4)
    for kw, field in (({"total_epochs": 4}, "total_epochs"), ({"epoch_length": 10}, "epoch_length"),
                      ({"config": QUIET.replace(mode="uniform")}, "mode"), ({"seed": 2}, "seed")):
        args = {"total_epochs": 3, "config": QUIET, "seed": 1, **kw}
        with pytest.raises(ValueError, match=field):
            GEKOSampler(20, **args).load_state_dict(sd)
    # A longer run is the likely wish behind another total_epochs: the error says it cannot be, and what can.
    with pytest.raises(ValueError, match=r"planned for 3 epochs, and a run cannot change its length on resume; resume "
                                         r"with total_epochs=3, or start a new sampler with `use_state"):
        GEKOSampler(20, total_epochs=4, config=QUIET, seed=1).load_state_dict(sd)
    # Another process count said only "world_size 1 does not match this sampler's world_size 2".
    with pytest.raises(ValueError, match=r"the saved run had 1 process\(es\) and this one has 2; .*resume with 1 "
                                         r"process\(es\)"):
        GEKOSampler(20, total_epochs=3, config=QUIET, seed=1, num_replicas=2, rank=0).load_state_dict(sd)


def test_use_state_checks_size():
    from geko_data.state import SampleState

    s = GEKOSampler(20, total_epochs=2, config=QUIET)
    with pytest.raises(ValueError, match="21 samples"):
        s.use_state(SampleState(21))
    with pytest.raises(TypeError, match="SampleState"):
        s.use_state("state.arrow")


def test_batched_weights_are_float32_so_losses_keep_their_dtype():
    ds = Squares(12)
    s = GEKOSampler(ds, total_epochs=1, config=QUIET)
    s.set_epoch(0)
    batch = next(iter(DataLoader(s.wrap(ds), batch_size=4, sampler=s)))
    assert batch["__weight__"].dtype == torch.float32 and batch["__index__"].dtype == torch.int64
    assert (torch.ones(4) * batch["__weight__"]).dtype == torch.float32


# ---------------------------------------------------------------------- fingerprints of map-style data
def test_a_state_of_other_data_of_the_same_length_is_refused_everywhere(tmp_path, shards):
    # Every place a fingerprint is compared raises the one FingerprintError (a StateFileError).
    from geko_data import FingerprintError, StateFileError, fingerprint_of
    from geko_data.state import SampleState
    from geko_data.stream import GEKOStream

    mine, theirs = fingerprint_of(f"img{i}.jpg" for i in range(30)), fingerprint_of(f"doc{i}" for i in range(30))
    a = GEKOSampler(30, total_epochs=2, config=QUIET, fingerprint=theirs)
    a.set_epoch(0)
    a.report(list(range(10)), [0.5] * 10)
    a.state.save(tmp_path / "state.arrow")
    sd = json.loads(json.dumps(a.state_dict(consumed=5)))
    assert sd["fingerprint"] == theirs and SampleState.load(tmp_path / "state.arrow").fingerprint == theirs

    b = GEKOSampler(30, total_epochs=2, config=QUIET, fingerprint=mine)
    assert issubclass(FingerprintError, StateFileError)
    with pytest.raises(FingerprintError, match=f"{theirs}.*{mine}"):
        b.use_state(SampleState.load(tmp_path / "state.arrow"))
    with pytest.raises(FingerprintError, match="state.arrow"):
        SampleState.load(tmp_path / "state.arrow", expect_fingerprint=mine)
    with pytest.raises(FingerprintError, match="`state`"):
        GEKOSampler(30, total_epochs=2, config=QUIET, fingerprint=mine,
                    state=SampleState.load(tmp_path / "state.arrow"))
    with pytest.raises(FingerprintError, match="state_dict"):
        b.load_state_dict(sd)
    with pytest.raises(FingerprintError, match="other shards"):
        GEKOStream(shards, total_epochs=2, config=QUIET, state=SampleState(43, fingerprint=theirs))
    # The same data resumes, and a sampler without a fingerprint adopts the state's.
    same = GEKOSampler(30, total_epochs=2, config=QUIET, fingerprint=theirs)
    same.use_state(SampleState.load(tmp_path / "state.arrow"))
    same.load_state_dict(sd)
    assert len(same) == len(a) - 5
    plain = GEKOSampler(30, total_epochs=2, config=QUIET)
    plain.use_state(SampleState.load(tmp_path / "state.arrow"))
    assert plain.state.fingerprint == theirs
    with pytest.raises(ValueError, match="`fingerprint` must be a non-empty str"):
        GEKOSampler(30, total_epochs=2, fingerprint=b"bytes")


# ------------------------------------------------------------------ memory at scale (numpy allocations traced)
def _traced(fn):
    """(bytes held after, peak bytes) of the Python and numpy allocations ``fn`` makes."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(120)
def test_an_epoch_holds_its_order_in_4_bytes_a_draw_and_its_plan_once():
    from geko_data.config import GEKOConfig

    n = 1_000_000
    s = GEKOSampler(n, total_epochs=3, config=GEKOConfig(log_bucket_stats=False))
    s.set_epoch(0)
    held, _ = _traced(lambda: s.set_epoch(1))
    # The order as int32 (every sample is drawn once: all unseen) and the plan's arrays as views of the
    # shared memory the DataLoader workers read (not traced); int64 order plus a private plan was 16 bytes.
    assert held < 5 * n
    assert s.state.plan is s.plan and not s.plan.counts.flags.writeable
    assert s.plan.counts.sum() == n and len(s) == n


@pytest.mark.timeout(120)
def test_set_epoch_writes_its_plan_into_the_shared_memory_and_its_order_over_the_last(monkeypatch):
    """No array of the samples is made by a set_epoch that plans and orders: the plan is written straight into
    the shared memory the workers read (uint16 counts, float32 weights) and the order over the last epoch's
    array; what is left is the order's block labels, 2 bytes a draw. (A private plan copied into the shared
    memory, and a fresh order, were 13.6 bytes a sample.)"""
    from geko_data import plan

    monkeypatch.setattr(plan, "_CHUNK", 1 << 14)  # the planning loops' steps, small next to the samples
    n = 1_000_000
    s = GEKOSampler(n, total_epochs=3, config=GEKOConfig(log_bucket_stats=False))
    s.set_epoch(0)
    s.report(np.arange(0, n, 2), np.random.default_rng(0).exponential(0.5, n // 2).astype(np.float32))
    s.state.repartition(0.5, epoch=1)  # set_epoch(1) then plans and orders only
    held, peak = _traced(lambda: s.set_epoch(1))
    assert peak < 3 * n and held < n // 10
    counts, weight = s._shared._arrays()
    assert s.plan.counts.dtype == np.uint16 and np.shares_memory(s.plan.counts, counts)
    assert np.shares_memory(s.plan.loss_weight, weight) and s.state.plan is s.plan
    assert len(s) == s.plan.total < n


@pytest.mark.timeout(120)
def test_iterating_does_not_turn_the_whole_epoch_into_a_python_list():
    from geko_data.config import GEKOConfig

    n = 1_000_000
    s = GEKOSampler(n, total_epochs=1, config=GEKOConfig(log_bucket_stats=False))
    s.set_epoch(0)
    it = iter(s)
    _, peak = _traced(lambda: next(it))
    assert peak < 8 * n  # a list of every index costs about 36 bytes an index
    assert sorted(it) == sorted(set(range(n)) - {int(s._order.order[0])})  # the rest of the epoch, once each


@pytest.mark.filterwarnings("ignore:GEKO epoch")
@pytest.mark.parametrize("world", [1, 3])
def test_the_order_is_shuffled_as_it_is_reached_into_the_last_epochs_memory(monkeypatch, world):
    """set_epoch deals the draws into blocks and the iterator shuffles each block as it reaches it: the
    order is the whole shuffle's (global_order, strided and padded as DistributedSampler) bit for bit, a
    resume mid-epoch sees it too, the next epoch is written into the same array, and an iterator whose
    order was replaced stops with an error instead of yielding the next epoch's ids."""
    from geko_data import plan, sampler as sampler_module

    monkeypatch.setattr(plan, "_BLOCK", 64)  # 30-odd blocks of the ~2,000 draws
    monkeypatch.setattr(plan, "_CHUNK", 256)
    monkeypatch.setattr(sampler_module, "_ITER_CHUNK", 50)
    n = 2000

    def whole(s):
        order = plan.global_order(s.plan.counts, seed=s.seed, epoch=s.epoch)
        return plan.rank_slice(order, rank=s.world.rank, world_size=world).tolist()

    samplers = [GEKOSampler(n, total_epochs=3, config=QUIET, seed=7, num_replicas=world, rank=r) for r in range(world)]
    for s in samplers:
        s.set_epoch(0)
        assert s._order._dealt._next < 3  # dealt; at most the first block(s) shuffled (the padding's)
        assert list(s) == whole(s)
        s.report(np.arange(0, n, 2), np.full(n // 2, 0.01, np.float32))  # half mastered: a shorter epoch 1
        buffer = s._order_buffer
        s.set_epoch(1)
        assert s._order_buffer is buffer and len(s) < n // world  # written over epoch 0's
        it = iter(s)
        head = [next(it) for _ in range(120)]
        assert head + list(it) == whole(s)
        resumed = GEKOSampler(n, total_epochs=3, config=QUIET, seed=7, num_replicas=world, rank=s.world.rank,
                              state=s.state)
        resumed.load_state_dict(s.state_dict(consumed=120))
        assert list(resumed) == whole(s)[120:]
        stale = iter(s)
        next(stale)
        s.set_epoch(2)
        with pytest.raises(RuntimeError, match="replaced by set_epoch"):
            list(stale)


def _two_weight_sampler(ds):
    """An unbiased-mode sampler whose plan gives half the samples weight 1.5 and the others 0.75."""
    s = GEKOSampler(ds, total_epochs=4, config=GEKOConfig(mode="unbiased", log_bucket_stats=False, anneal=0.0,
                                                          keep_frozen=0.5), seed=3)
    s.state.bucket[: len(ds) // 2] = policy.FREEZE
    s.state.epoch = 1
    s.set_epoch(1)
    assert len(set(s.plan.loss_weight.tolist())) == 2
    return s


def _doubled_weights(items):
    """A collate_fn that changes what default_collate made (module-level for workers)."""
    batch = default_collate(items)
    batch["__weight__"] = batch["__weight__"] * 2
    return {"inner": batch}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("items", ["dict", "tuple"])
@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_every_batch_carries_each_samples_index_and_plan_weight(workers, context, items):
    # The keys, dtypes and order a loop reads, with or without workers, forked or spawned, drop_last on.
    # A worker sends the two columns inside the batch's pickle: only the item's own tensors cross the
    # worker queue in shared memory (each costs a segment and a file descriptor).
    ds = Squares(30, tuples=items == "tuple")
    s = _two_weight_sampler(ds)
    kw = {"num_workers": workers, "multiprocessing_context": context} if workers else {}
    batches = list(DataLoader(s.wrap(ds), batch_size=4, sampler=s, drop_last=True, **kw))
    order = list(s)
    assert len(batches) == len(order) // 4
    weights = torch.tensor(s.plan.loss_weight)
    for n, b in enumerate(batches):
        if items == "dict":
            assert type(b) is dict and list(b) == ["x", "y", "__index__", "__weight__"]  # the item's key order
            x, y, index, weight = b.values()
        else:
            assert type(b) is list and len(b) == 4  # default_collate's columns of tuple items
            x, y, index, weight = b
        assert index.dtype == torch.int64 and weight.dtype == torch.float32 and index.shape == weight.shape == (4,)
        assert index.tolist() == order[4 * n:4 * n + 4]
        assert torch.equal(x[:, 0], index.float()) and torch.equal(y, index * index)  # index is the sample's
        assert torch.equal(weight, weights[index])  # weight is the plan's
        assert x.is_shared() == (workers > 0) and not index.is_shared() and not weight.is_shared()
    assert {w for b in batches for w in (b["__weight__"] if items == "dict" else b[3]).tolist()} == {0.75, 1.5}


@pytest.mark.timeout(120)
def test_a_collate_fn_sees_each_items_weight_and_its_changes_reach_the_loop():
    ds = Squares(24)
    s = _two_weight_sampler(ds)
    # a collate_fn that changes default_collate's weights: the loop gets the changed ones
    for b in DataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=2, multiprocessing_context="fork",
                        collate_fn=_doubled_weights):
        b = b["inner"]
        assert torch.equal(b["__weight__"], 2 * torch.tensor(s.plan.loss_weight)[b["__index__"]])
    # a collate_fn of its own sees every item's index and weight (an int and a float32, as wrap[i] gives)
    rows = next(iter(DataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=1, collate_fn=list)))
    assert all(type(r) is dict and type(r["__weight__"]) is np.float32 for r in rows)
    assert [r["__weight__"] for r in rows] == [s.plan.loss_weight[r["__index__"]] for r in rows]
    assert s.wrap(ds)[5] == {"x": torch.tensor([5.0]), "y": 25, "__index__": 5,
                             "__weight__": s.plan.loss_weight[5]}


@pytest.mark.timeout(120)
def test_batches_out_of_order_still_carry_their_own_indices():
    # in_order=False hands batches over as workers finish them: each batch carries its own indices.
    ds = Squares(40)
    s = _two_weight_sampler(ds)
    loader = DataLoader(s.wrap(ds), batch_size=4, sampler=s, num_workers=2, multiprocessing_context="fork",
                        in_order=False)
    seen = []
    for b in loader:
        assert torch.equal(b["x"][:, 0], b["__index__"].float())
        assert torch.equal(b["__weight__"], torch.tensor(s.plan.loss_weight)[b["__index__"]])
        seen += b["__index__"].tolist()
    assert sorted(seen) == sorted(s)


def test_a_rank_without_num_replicas_says_where_the_bound_comes_from():
    """`rank=1` alone was refused as "in [0, 0]", which does not say that num_replicas (1 without a process
    group) sets the bound."""
    with pytest.raises(ValueError, match=r"got 1: ranks 0 to num_replicas - 1, with num_replicas=1 \(from "
                                         r"torch.distributed, or 1 without a process group\); pass num_replicas=N"):
        GEKOSampler(list(range(10)), total_epochs=3, rank=1)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[0, 1\], got 4: .*num_replicas=2 \(given\)"):
        GEKOSampler(list(range(10)), total_epochs=3, rank=4, num_replicas=2)


def test_an_epoch_past_the_planned_run_warns_once():
    # set_epoch(5) of a 3-epoch run was accepted without a word (a loop over range(E + 1), say).
    s = GEKOSampler(10, total_epochs=3, config=QUIET)

    def epoch(e):
        s.set_epoch(e)
        ids = torch.tensor(list(s))
        s.report(ids, torch.ones(len(ids)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for e in range(3):
            epoch(e)
    with pytest.warns(RuntimeWarning, match=r"set_epoch\(3\) is past the planned run \(total_epochs=3: epochs 0-2\)"):
        epoch(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epoch(4)  # said once


def test_a_count_restarted_at_zero_in_a_resumed_epoch_is_refused():
    s = GEKOSampler(20, total_epochs=2, config=QUIET, seed=1)
    s.set_epoch(0)
    resumed = GEKOSampler(20, total_epochs=2, config=QUIET, seed=1)
    resumed.load_state_dict(s.state_dict(consumed=8))
    assert resumed.position == 8
    with pytest.raises(ValueError, match=r"`consumed` \(3\) .* resumed at position 8: .*`sampler.position`"):
        resumed.state_dict(consumed=3)

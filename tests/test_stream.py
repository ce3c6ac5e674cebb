import json
import os

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from geko_data import policy
from geko_data.config import MOUNTAIN, GEKOConfig
from geko_data.shards import ShardError, read_index
from geko_data.state import SampleState, StateFileError
from geko_data.stream import GEKOStream
from geko_data.world import World
from resume_check import check_resume

# GEKO's rules before short runs kept half of FREEZE (tested in test_policy)
QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None, bucket_weights=(3, 2, 1))
N = 43


def as_list(batch):
    return batch


def ids_of(stream):
    return [s["__index__"] for s in stream]


def freeze_some(state):
    """A quarter frozen, a few pruned: set by hand as a repartition would."""
    state.bucket[::4] = policy.FREEZE
    state.pruned[1:8:3] = True
    state.bucket[1:8:3] = policy.FREEZE
    state.epoch = 1
    return set(range(0, N, 4)) | set(range(1, 8, 3))


def test_yields_webdataset_samples_with_index_and_weight(shards):
    s = GEKOStream(shards, total_epochs=2, config=QUIET, shuffle=False)
    out = list(s)
    assert [x["__index__"] for x in out] == list(range(N))
    first = out[0]
    assert first["__key__"] == "s0_000" and first["__url__"].endswith("shard-000.tar")
    assert json.loads(first["json"]) == {"shard": 0, "i": 0, "x": [0, 0]}
    assert first["__weight__"] == 1.0 and first["txt"] == b"sample 0/0"


def test_decode_callable_and_specs(shards):
    def decode(sample):
        sample["obj"] = json.loads(sample.pop("json"))
        return sample

    s = GEKOStream(shards, total_epochs=1, config=QUIET, decode=decode)
    out = list(s)
    assert len(out) == N and all("obj" in x for x in out)
    s2 = GEKOStream(shards, total_epochs=1, config=QUIET, decode=[])  # webdataset's default handlers
    x = next(iter(s2))
    assert isinstance(x["json"], dict) and x["txt"].startswith("sample")


def test_frozen_and_pruned_are_never_read(shards, monkeypatch):
    ranges = []  # (shard file name, offset, bytes read): every read of a local shard is one preadv
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset, *a):
        n = real_preadv(fd, buffers, offset, *a)
        ranges.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, n))
        return n

    s = GEKOStream(shards, total_epochs=3, config=QUIET)
    skipped = freeze_some(s.state)
    s.set_epoch(1)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    got = ids_of(s)
    monkeypatch.undo()
    assert got and not skipped & set(got)
    idx = read_index(shards)
    for i in skipped:  # no byte of a skipped sample was ever read: no read range overlaps its range
        lo, hi = int(idx.offset[i]), int(idx.offset[i] + idx.length[i])
        name = os.path.basename(idx.shards[idx.shard[i]])
        assert not any(p == name and off < hi and lo < off + n for p, off, n in ranges)
    total = sum(n for _, _, n in ranges)
    assert total == s.stats["bytes_read"] == sum(int(idx.length[i]) for i in set(got))


def test_repeats_are_read_once_and_yielded_m_times(shards):
    # curriculum_min_epochs=1 and the Mountain table: a 3-epoch run's epoch 1 in the curriculum's PEAK
    s = GEKOStream(shards, total_epochs=3, config=QUIET.replace(curriculum_min_epochs=1, phase_weights=MOUNTAIN))
    s.state.bucket[:] = policy.LIGHT
    s.state.bucket[:3] = policy.HARD
    s.state.epoch = 1
    s.set_epoch(1)  # PEAK: LIGHT 0, so everything goes to the three HARD samples, capped at max_repeats
    got = ids_of(s)
    assert sorted(set(got)) == [0, 1, 2] and len(got) == 15
    assert s.stats["samples_read"] == 3


def test_pipe_source_gives_the_same_samples(shards):
    a = GEKOStream(shards, total_epochs=3, config=QUIET, seed=2)
    b = GEKOStream(shards, total_epochs=3, config=QUIET, seed=2, shard_url="pipe:cat {}")
    for s in (a, b):
        freeze_some(s.state)
        s.state.bucket[20:23] = policy.HARD  # repeats too
        s.set_epoch(1)
    local, piped = list(a), list(b)
    assert len(local) > N // 2 and len({x["__index__"] for x in local}) < len(local)
    for x, y in zip(local, piped, strict=True):  # every field, not only ids
        assert x.pop("__url__").endswith(".tar") and y.pop("__url__").startswith("pipe:cat ")
        assert x == y
    assert b.stats["bytes_read"] == 0  # the pipe path reads through, it does not seek


def test_two_ranks_two_workers_cover_exactly(shards):
    plans, per_rank = [], []
    for rank in range(2):
        s = GEKOStream(shards, total_epochs=3, config=QUIET, seed=9, world=World(rank=rank, world_size=2),
                       batch_size=3)
        freeze_some(s.state)
        s.state.bucket[20:26] = policy.HARD
        s.set_epoch(1)
        loader = DataLoader(s, batch_size=3, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
        per_rank.append([x["__index__"] for b in loader for x in b])
        assert per_rank[-1] == ids_of(s)  # the loop sees the rank order whatever the workers
        plans.append(s._shared.read().counts)
    assert np.array_equal(plans[0], plans[1])
    assert len(per_rank[0]) == len(per_rank[1])
    got = np.bincount(per_rank[0] + per_rank[1], minlength=N)
    assert (got >= plans[0]).all() and (got - plans[0]).sum() <= 1  # exact up to padding


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_persistent_workers_see_new_state(shards, ctx):
    s = GEKOStream(shards, total_epochs=3, config=QUIET.replace(q_value_lr=1.0, min_q_for_freeze=0.5), seed=1,
                   batch_size=4)
    loader = DataLoader(s, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context=ctx,
                        persistent_workers=True)
    s.set_epoch(0)
    first = [x["__index__"] for b in loader for x in b]
    assert sorted(first) == list(range(N))
    mastered = [i for i in first if i % 2 == 0]
    s.report(mastered, [0.001] * len(mastered), correct=[True] * len(mastered),
             confidence=[0.999] * len(mastered))
    s.set_epoch(1)
    second = [x["__index__"] for b in loader for x in b]
    assert second and not set(second) & set(mastered)


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_resume_check(shards, num_workers, persistent):
    def make():
        s = GEKOStream(shards, total_epochs=3, config=QUIET, seed=4, batch_size=4, shuffle_buffer=8)
        kw = {"multiprocessing_context": "fork", "persistent_workers": persistent} if num_workers else {}
        return s, DataLoader(s, batch_size=4, num_workers=num_workers, collate_fn=as_list, **kw)
    check_resume(make, epochs=2, batch_size=4)


def test_persistent_workers_follow_a_new_plan_for_the_same_epoch(shards):
    """A persistent worker's cached order must not outlive the plan it came from (same epoch number)."""
    import dataclasses

    s = GEKOStream(shards, total_epochs=3, config=QUIET, seed=1, batch_size=4)
    loader = DataLoader(s, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork",
                        persistent_workers=True)
    s.set_epoch(1)
    assert sorted(x["__index__"] for b in loader for x in b) == list(range(N))
    counts = s.plan.counts.copy()
    counts[::2] = 0  # e.g. a rolled-back state's plan, published again for epoch 1
    s._shared.publish(dataclasses.replace(s.plan, counts=counts))
    again = [x["__index__"] for b in loader for x in b]
    assert sorted(again) == list(range(1, N, 2))


def test_resume_with_other_num_workers_continues_exactly(shards):
    s = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s.set_epoch(0)
    full = ids_of(s)
    s2 = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s2.load_state_dict(json.loads(json.dumps(s.state_dict(consumed=12))))
    loader = DataLoader(s2, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    assert [x["__index__"] for b in loader for x in b] == full[12:]


@pytest.mark.timeout(60)
def test_state_dict_without_consumed_after_workers_read_is_refused(shards):
    # It returned position 0 (the main process yielded nothing): a resume trained the whole epoch again.
    s = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s.set_epoch(0)
    loader = DataLoader(s, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    it = iter(loader)
    next(it)
    with pytest.raises(ValueError, match=r"needs `consumed=` when DataLoader workers read the epoch"):
        s.state_dict()
    assert s.state_dict(consumed=4)["position"] == 4
    del it
    s.set_epoch(1)  # a new epoch, read in the main process: the position is known again
    next(iter(s))
    assert s.state_dict()["position"] == 1


@pytest.mark.timeout(60)
def test_a_count_restarted_at_zero_in_a_resumed_epoch_is_refused(shards):
    # consumed counts from the epoch's start: a loop that restarted its count at 0 after a resume saved a
    # position before the resume's, and the next resume trained the samples between again, silently.
    s = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s.set_epoch(0)
    sd = s.state_dict(consumed=12)
    resumed = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    resumed.load_state_dict(sd)
    resumed.set_epoch(0)
    assert resumed.position == 12 and s.position == 0
    with pytest.raises(ValueError, match=r"`consumed` \(4\) counts this epoch's samples from its start, and this "
                                         r"epoch resumed at position 12: start the loop's count at `stream.position`"):
        resumed.state_dict(consumed=4)
    assert resumed.state_dict(consumed=16)["position"] == 16


def test_state_dict_mismatch(shards, tmp_path):
    s = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s.set_epoch(0)
    sd = s.state_dict(consumed=4)
    for kw, field in (({"seed": 5}, "seed"), ({"batch_size": 8}, "batch_size"),
                      ({"world": World(rank=0, world_size=2)}, "world_size")):
        args = {"total_epochs": 2, "config": QUIET, "seed": 4, "batch_size": 4, **kw}
        with pytest.raises(ValueError, match=field):
            GEKOStream(shards, **args).load_state_dict(sd)
    other = SampleState(N, fingerprint="not-these-shards")
    with pytest.raises(StateFileError, match="other shards"):
        GEKOStream(shards, total_epochs=2, state=other)


def test_bad_data_raises_naming_the_shard_or_skips_with_handler(shards):
    idx = read_index(shards)
    victim = idx.shards[1]
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])  # truncated tar
    with pytest.raises(ShardError, match="shard-001.tar"):
        list(GEKOStream(shards, total_epochs=1, config=QUIET))
    s = GEKOStream(shards, total_epochs=1, config=QUIET, handler=wds.ignore_and_continue)
    with pytest.warns(UserWarning):
        got = ids_of(s)
    assert len(got) == N - 17 and s.stats["skipped"] == 17  # counted, not silently lost
    os.remove(victim)
    with pytest.raises(ShardError, match="missing"):
        list(GEKOStream(shards, total_epochs=1, config=QUIET))


@pytest.mark.parametrize("shard_url", [None, "pipe:cat {}"])
def test_shard_rewritten_with_other_keys_is_detected(shards, shard_url):
    idx = read_index(shards)
    path = idx.shards[0]
    size = os.path.getsize(path)
    with wds.TarWriter(path) as w:  # same sample count and byte size, other keys
        for i in range(5):
            w.write({"__key__": f"x0_{i:03d}", "json": json.dumps({"shard": 0, "i": i, "x": [0, i]}).encode(),
                     "txt": f"sample 0/{i}".encode()})
    assert os.path.getsize(path) == size
    with pytest.raises(ShardError, match="shard-000.tar.*(expects key 's0_000'|'x0_000' is not in the index)"):
        list(GEKOStream(shards, total_epochs=1, config=QUIET, shuffle=False, shard_url=shard_url))


def test_constructor_validation(shards):
    with pytest.raises(ValueError, match="total_epochs"):
        GEKOStream(shards, total_epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        GEKOStream(shards, total_epochs=1, batch_size=0)
    with pytest.raises(FileNotFoundError):
        GEKOStream(shards / "nope", total_epochs=1)


def test_batched_weights_are_float32_so_losses_keep_their_dtype(shards):
    import torch

    s = GEKOStream(shards, total_epochs=1, config=QUIET, seed=0, decode=lambda x: {"k": x["__key__"]})
    batch = next(iter(DataLoader(s, batch_size=4, collate_fn=lambda b: {
        "__weight__": torch.utils.data.default_collate([x["__weight__"] for x in b])})))
    assert batch["__weight__"].dtype == torch.float32
    assert (torch.ones(4) * batch["__weight__"]).dtype == torch.float32


def test_weight_is_a_float_that_collates_to_float32_through_workers(shards):
    """`__weight__` is a Python float (pickles ~3x faster than a numpy.float32 on its way from a worker),
    yet default_collate still stacks it into float32, the dtype of the losses it multiplies."""
    import pickle

    import torch

    s = GEKOStream(shards, total_epochs=2, config=QUIET, batch_size=4)
    s.state.bucket[::3] = policy.HARD  # weights other than 1
    s.state.epoch = 0
    s.set_epoch(0)
    one = next(iter(s))
    assert isinstance(one["__weight__"], float)  # a numpy.float32 is not
    assert pickle.loads(pickle.dumps(one))["__weight__"] == one["__weight__"]
    loader = DataLoader(s, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    weights = torch.cat([b["__weight__"] for b in batches])
    ids = torch.cat([b["__index__"] for b in batches])
    assert weights.dtype == torch.float32 and len(ids) == len(s)
    assert torch.equal(weights, torch.from_numpy(s.plan.loss_weight[ids.numpy()]))


def test_the_plan_is_held_once_in_shared_memory(shards):
    """The state keeps the published plan itself (views of the shared memory workers map), not a second
    copy; iterating takes no copy of it either."""
    s = GEKOStream(shards, total_epochs=2, config=QUIET)
    s.set_epoch(0)
    assert np.shares_memory(s.state.plan.loss_weight, s._shared.weights())
    shared = s._shared.view()
    assert np.shares_memory(s.state.plan.counts, shared.counts)
    assert len(list(s)) == len(s)
    s.set_epoch(1)  # the next plan lands in the same memory
    assert np.shares_memory(s.state.plan.counts, shared.counts)
    assert np.array_equal(s.state.plan.counts, shared.counts)


def test_a_loop_that_changes_its_samples_leaves_repeats_and_other_draws_whole(shards):
    """A sample drawn once in its block is yielded as the dict the reader made (tagged in place); a
    repeated one is a new dict per draw: a loop that empties what it gets never reaches another draw."""
    s = GEKOStream(shards, total_epochs=3, config=QUIET.replace(curriculum_min_epochs=1, phase_weights=MOUNTAIN))
    s.state.bucket[:] = policy.LIGHT
    s.state.bucket[:3] = policy.HARD
    s.state.epoch = 1
    s.set_epoch(1)  # PEAK: the three HARD samples drawn 5 times each, in blocks with repeats
    seen = []
    for sample in s:
        assert set(sample) >= {"__key__", "__url__", "__index__", "__weight__"} and len(sample) > 4, sample
        seen.append(sample["__index__"])
        sample.clear()
    assert sorted(seen) == sorted([0, 1, 2] * 5)
    s2 = GEKOStream(shards, total_epochs=1, config=QUIET)
    whole = {x["__index__"]: dict(x) for x in s2}
    for sample in s2:  # every sample drawn once: each is its own dict, tagged once
        assert sample == whole[sample["__index__"]]
        sample.clear()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_steps_sizes_each_epoch_to_a_full_epochs_steps(shards, workers):
    s = GEKOStream(shards, total_epochs=3, config=QUIET, batch_size=8, batches="steps", seed=3)
    s.set_epoch(0)
    assert s.epoch_batch_size == 8  # a full epoch: 43 draws, 6 batches of 8 (the last holds 3)
    frozen = freeze_some(s.state)
    s.set_epoch(1)
    draws = len(s)
    assert draws == N - len(frozen)
    size = s.epoch_batch_size
    assert size == max(4, -(-draws // 6)) < 8
    kw = {"num_workers": workers, "multiprocessing_context": "fork"} if workers else {}
    batches = list(DataLoader(s, batch_size=size, collate_fn=as_list, **kw))
    assert len(batches) == 6 and [len(b) for b in batches[:-1]] == [size] * 5
    ids = [x["__index__"] for b in batches for x in b]
    assert sorted(ids) == sorted(set(range(N)) - frozen)
    alone = GEKOStream(shards, total_epochs=3, config=QUIET, batch_size=8, batches="steps", seed=3)
    freeze_some(alone.state)
    alone.set_epoch(1)
    assert ids == [x["__index__"] for x in alone]  # the rank's order, whatever the workers


def test_batches_is_validated_and_needs_batch_size(shards):
    with pytest.raises(ValueError, match="`batches` must be one of steps, fixed, got 'auto'"):
        GEKOStream(shards, total_epochs=1, batches="auto")
    with pytest.raises(ValueError, match="batch_size=B"):
        GEKOStream(shards, total_epochs=1, batches="steps")
    fixed = GEKOStream(shards, total_epochs=3, config=QUIET, batch_size=8)
    freeze_some(fixed.state)
    fixed.set_epoch(1)
    assert fixed.epoch_batch_size == 8 and fixed.batches == "fixed"


@pytest.mark.timeout(60)
def test_steps_batches_from_a_loader_at_the_full_batch_size_are_named(shards):
    # batches="steps" with the DataLoader left at batch_size=B took half the epoch's steps, without a word.
    s = GEKOStream(shards, total_epochs=3, config=QUIET, seed=1, batch_size=8, batches="steps")
    s.set_epoch(0)
    ids = [x["__index__"] for x in s]
    s.report(ids, [0.001 if i % 2 else 5.0 for i in ids], correct=[bool(i % 2) for i in ids],
             confidence=[0.99 if i % 2 else 0.2 for i in ids])
    s.set_epoch(1)
    assert s.epoch_batch_size < 8
    batch = [x["__index__"] for x in s][:8]
    with pytest.warns(RuntimeWarning, match=r"a report of 8 samples in epoch 1, whose batches hold \d+ "
                                            r"\(stream.epoch_batch_size\)"):
        s.report(batch, [1.0] * 8)


def test_reported_answers_balance_the_streams_plan(shards):
    """A stream's report carries the answers into its state, and its next epoch's loss weights give each
    answer its data share of the epoch's trained weight (a 3-epoch run: the answers' balance applies)."""
    cfg = GEKOConfig(log_bucket_stats=False, short_run_keep=None)
    s = GEKOStream(shards, total_epochs=3, config=cfg, seed=1)
    s.set_epoch(0)
    ids = np.array([x["__index__"] for x in s])
    answer = ids % 2
    right = answer == 0  # the model favours answer 0: its right answers freeze
    loss = np.where(right, 0.1 * (1 + ids), 3.0)  # about half of the right answers are among the easiest half
    s.report(ids, loss, correct=right, confidence=np.where(right, 0.99, 0.3), answer=answer)
    assert s.state.answer.tolist() == (np.arange(N) % 2).tolist()
    s.set_epoch(1)
    counts, weight = s.plan.counts, s.plan.loss_weight
    assert 0 < counts[np.arange(N) % 2 == 0].sum() < counts[np.arange(N) % 2 == 1].sum()  # unbalanced draws
    mass = [float((counts * weight)[np.arange(N) % 2 == a].sum()) for a in (0, 1)]
    share = [np.count_nonzero(np.arange(N) % 2 == a) / N for a in (0, 1)]
    assert mass[0] / sum(mass) == pytest.approx(share[0], rel=1e-4)
    assert mass[1] / sum(mass) == pytest.approx(share[1], rel=1e-4)

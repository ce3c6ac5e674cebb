"""What a spawned DataLoader worker receives of a GEKOStream: the index by its file's name, the plan by its
shared memory, and nothing that grows with the samples (no SampleState, no shard column); and that a
spawned worker reads exactly what a forked one reads."""

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch.multiprocessing  # noqa: F401 - torch's shared-memory reducers, as a DataLoader uses them
from multiprocessing.reduction import ForkingPickler
from torch.utils.data import DataLoader, get_worker_info

from geko_data import policy
from geko_data import shards as sh
from geko_data.config import GEKOConfig
from geko_data.keys import Keys
from geko_data.stream import GEKOStream

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)


def _sparse_index(folder, n, n_shards=10):
    """An index of ``n`` samples of 1 KB over sparse shard files (opening a stream reads no tar)."""
    per = -(-n // n_shards)
    shard = (np.arange(n) // per).astype(np.int32)
    paths = []
    for s, count in enumerate(np.bincount(shard, minlength=n_shards)):
        paths.append(os.path.join(folder, f"s{s:03d}.tar"))
        with open(paths[-1], "wb") as f:
            f.truncate(int(count) * 1024 + 1024)
    offset = (np.arange(n) - shard.astype(np.int64) * per) * 1024
    hashes = np.zeros((n, sh.HASH_BYTES), np.uint8)  # (never checked: no test here verifies)
    sizes = tuple(os.path.getsize(p) for p in paths)
    index = sh.ShardIndex(shards=tuple(paths), sizes=sizes, keys=Keys(pa.array([f"k{i:07d}" for i in range(n)])),
                          shard=shard, offset=offset, length=np.full(n, 1024, np.int64),
                          fingerprint=sh.fingerprint(paths, sizes, n, hashes=hashes), hashes=hashes)
    path = os.path.join(folder, sh.INDEX_NAME)
    sh._write_index(index, path)
    return path


def test_a_pickled_stream_does_not_grow_with_the_samples(tmp_path):
    """What a spawned worker receives is the same few KB at 20,000 and 200,000 samples (the state alone is
    32 bytes a sample; before, the stream pickled it and the layout's shard column)."""
    sizes = {}
    for n in (20_000, 200_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        s = GEKOStream(_sparse_index(str(folder), n), total_epochs=3, config=QUIET, batch_size=8)
        s.set_epoch(0)
        len(s)  # the main process's cached order is not sent either
        sizes[n] = len(ForkingPickler.dumps(s))
    assert sizes[200_000] - sizes[20_000] < 1_000, sizes
    assert sizes[200_000] < 100_000, sizes


def test_a_pickled_copy_keeps_the_policy_and_refuses_what_needs_the_state(shards):
    s = GEKOStream(shards, total_epochs=3, config=QUIET, batch_size=4)
    s.set_epoch(0)
    copy = pickle.loads(ForkingPickler.dumps(s))
    assert copy.config == s.config and copy.phase == s.phase and len(copy) == len(s)
    assert [x["__index__"] for x in copy] == [x["__index__"] for x in s]  # reads the published plan
    for call in (lambda: copy.state.times_seen, lambda: copy.report([0], [1.0]), lambda: copy.efficiency_report()):
        with pytest.raises(RuntimeError, match="pickled copy .* holds no SampleState"):
            call()
    assert not hasattr(copy.state, "__setstate__")  # pickle and copy probe dunders: plain AttributeError


def _no_state_in_worker(worker_id):
    stream = get_worker_info().dataset
    assert type(stream.state).__name__ == "_WorkerCopy", "the spawned worker received the SampleState"
    assert stream._layout.sample_shard.base is not None  # a view of the mapped index, not a copy


def _as_list(batch):
    return batch


@pytest.mark.timeout(300)
def test_spawned_workers_read_what_forked_ones_read(shards):
    """Two epochs through persistent workers, a plan with frozen, pruned and repeated samples, reports in
    between: spawn and fork give the same samples, keys, members and weights in the same order."""
    def run(ctx):
        s = GEKOStream(shards, total_epochs=3, config=QUIET.replace(q_value_lr=1.0, min_q_for_freeze=0.5, curriculum_min_epochs=1),
                       seed=4,
                       batch_size=4)
        s.state.bucket[::5] = policy.FREEZE
        s.state.bucket[1::7] = policy.HARD
        s.state.pruned[2] = True
        s.state.epoch = 0
        kw = {"worker_init_fn": _no_state_in_worker} if ctx == "spawn" else {}
        loader = DataLoader(s, batch_size=4, num_workers=2, collate_fn=_as_list, multiprocessing_context=ctx,
                            persistent_workers=True, **kw)
        epochs = []
        for epoch in range(2):
            s.set_epoch(epoch)
            got = [(x["__index__"], x["__key__"], x["txt"], x["__weight__"]) for b in loader for x in b]
            assert len(got) == len(s) and all(w == s.plan.loss_weight[i] for i, *_, w in got)
            epochs.append(got)
            ids = [g[0] for g in got]  # the even ids mastered, the odd ones missed
            s.report(ids, [0.001 if i % 2 == 0 else 3.0 for i in ids], correct=[i % 2 == 0 for i in ids],
                     confidence=[0.999 if i % 2 == 0 else 0.2 for i in ids])
        return epochs

    forked, spawned = run("fork"), run("spawn")
    assert spawned == forked


@pytest.mark.timeout(300)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_default_collate_sends_index_and_weight_inside_the_batch(shards, context):
    """With the DataLoader's default collate, a worker's batch carries ``__index__`` (int64) and ``__weight__``
    (float32) inside its pickle, not as shared-memory tensors (each costs a segment, a file descriptor and a
    socket round trip a batch); the loop reads the same keys, dtypes and values as without workers."""
    import torch

    def run(workers):
        s = GEKOStream(shards, total_epochs=3, config=QUIET, seed=2, batch_size=4)
        s.state.bucket[::3] = policy.HARD
        s.state.bucket[1::5] = policy.FREEZE
        s.state.epoch = 0
        s.set_epoch(0)
        kw = {"num_workers": workers, "multiprocessing_context": context} if workers else {}
        return s, list(DataLoader(s, batch_size=4, **kw))

    s, alone = run(0)
    _, sent = run(2)
    assert len(sent) == len(alone) > 2
    for a, b in zip(alone, sent):
        assert type(b) is dict and list(b) == list(a) == ["__key__", "json", "txt", "__url__", "__index__", "__weight__"]
        assert b["__key__"] == a["__key__"] and b["txt"] == a["txt"] and b["__url__"] == a["__url__"]
        assert b["__index__"].dtype == torch.int64 and b["__weight__"].dtype == torch.float32
        assert torch.equal(b["__index__"], a["__index__"]) and torch.equal(b["__weight__"], a["__weight__"])
        assert torch.equal(b["__weight__"], torch.from_numpy(s.plan.loss_weight[b["__index__"].numpy()]))
        assert not b["__index__"].is_shared() and not b["__weight__"].is_shared()


def test_items_reach_a_collate_fn_as_dicts_with_a_float_weight(shards):
    """A collate_fn of one's own gets each sample as a dict (a plain dict once pickled from a worker) whose
    ``__weight__`` is a float and ``__index__`` an int."""
    s = GEKOStream(shards, total_epochs=1, config=QUIET, batch_size=4)
    s.set_epoch(0)
    items = [x for b in DataLoader(s, batch_size=4, num_workers=2, collate_fn=_as_list,
                                   multiprocessing_context="fork") for x in b]
    assert items and all(type(x) is dict for x in items)
    assert all(type(x["__index__"]) is int and isinstance(x["__weight__"], float) for x in items)
    assert pickle.loads(pickle.dumps(next(iter(s)))).__class__ is dict


def _as_list(batch):
    return batch


@pytest.mark.timeout(120)
def test_a_checkpoint_after_batches_of_another_size_than_the_streams_is_refused(shards):
    # GEKOStream(batch_size=4) read by DataLoader(batch_size=8, num_workers=2): each loader batch mixes two
    # workers' chunks, so the first 8 samples the loop used are not the first 8 of the order, and a resume
    # from state_dict(consumed=8) trained some samples twice and others never, without a word.
    def run(loader_batch, report=True):
        stream = GEKOStream(shards, total_epochs=2, config=QUIET, seed=3, batch_size=4)
        loader = DataLoader(stream, batch_size=loader_batch, num_workers=2, collate_fn=_as_list,
                            multiprocessing_context="fork")
        stream.set_epoch(0)
        used = 0
        for batch in loader:
            ids = [x["__index__"] for x in batch]
            if report:
                stream.report(ids, np.ones(len(ids)))
            used += len(ids)
            if used >= 8:
                break
        return stream, used

    stream, used = run(8)
    with pytest.raises(ValueError, match=r"state_dict\(consumed=8\): the loop reported 8 samples .* not the 8 "
                                         r"this rank yields first.*give GEKOStream the DataLoader's batch_size"):
        stream.state_dict(consumed=used)
    assert run(4)[0].state_dict(consumed=8)["position"] == 8  # the same batch size: the order's first 8
    # a loop whose reports lag its batches cannot be compared, and is not refused
    assert run(8, report=False)[0].state_dict(consumed=8)["position"] == 8

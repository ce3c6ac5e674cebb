"""Remote shards, how an epoch's ranges move: the per-worker range plan (pure), requests in flight ahead of
the chunk being read, the hand-over between DataLoader workers and its shared-memory folder, against real
servers on 127.0.0.1 (RangeHTTPServer and our proxy)."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import write_uneven_shards
from geko_data import remote
from geko_data.config import GEKOConfig
from geko_data.handover import range_dir, remove_stale, shared_root
from geko_data.ranges import AHEAD, RangePlan
from geko_data.remote import RangeFetcher, RangeReader, RemoteConfig, SharedRanges
from geko_data.shards import read_index, write_shards
from geko_data.stream import GEKOStream
from servers import Proxy, http_server  # noqa: F401 - fixture

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
FAST = RemoteConfig(retries=3, backoff=0.02, max_backoff=0.1, timeout=10.0)


def as_list(batch):
    return batch


def range_dirs(pid=None):
    """The range folders of process ``pid`` (this one by default) on this host."""
    return set(glob.glob(os.path.join(shared_root(), f"geko-ranges-*-{pid or os.getpid()}-*")))


def even_shards(root, n=64, size=2000, per=64):
    """``n`` samples of ``size`` bytes in shards of ``per`` under a fresh folder of ``root``; (folder, name)."""
    name = uuid.uuid4().hex[:8]
    payload = bytes(range(256)) * (size // 256)
    write_shards(({"__key__": f"k{i:05d}", "bin": payload} for i in range(n)), str(root / name / "shard-%03d.tar"),
                 maxcount=per)
    return root / name, name


# ---------------------------------------------------------------------- the plan (pure)
@pytest.mark.parametrize("num_workers,batch,chunk", [(1, 1, 8), (2, 4, 8), (3, 5, 7), (2, 32, 16), (4, 3, 2)])
def test_range_plan_gives_every_drawn_sample_one_range_fetched_by_one_of_its_readers(tmp_path, num_workers, batch,
                                                                                      chunk):
    folder = write_uneven_shards(tmp_path / "shards")
    index = read_index(folder)
    rng = np.random.default_rng(num_workers * 100 + batch)
    order = rng.permutation(np.repeat(np.arange(index.num_samples), rng.integers(0, 3, index.num_samples)))
    order = order[np.argsort(index.shard[order], kind="stable")]  # shard order, as the stream reads
    remote_mask = [True, False, True, True]  # shard 1 is local: never planned
    plans = [RangePlan(index=index, remote=remote_mask, order=order, batch=batch, num_workers=num_workers,
                       worker=w, chunk=chunk, gap=1024, max_request=4096) for w in range(num_workers)]
    assert all(p.ranges == plans[0].ranges and (p.fetcher == plans[0].fetcher).all() for p in plans)  # same table
    ranges, fetcher, readers = plans[0].ranges, plans[0].fetcher, plans[0].readers
    for r, (shard, start, end) in enumerate(ranges):
        assert remote_mask[shard] and fetcher[r] in readers[r]
        assert end - start <= 4096 or len({i for p in plans for c in p.chunk_ranges.values() for i, rr in c.items()
                                           if rr == r}) == 1  # only a single big sample exceeds max_request
    pos = np.arange(order.shape[0])
    for w, p in enumerate(plans):
        mine = order[(pos // batch) % num_workers == w]
        for c in range(-(-mine.shape[0] // chunk)):
            ids = [int(i) for i in mine[c * chunk:(c + 1) * chunk] if remote_mask[index.shard[i]]]
            assert set(p.chunk_ranges.get(c, {})) == set(ids)
            for i in ids:
                shard, start, end = ranges[p.chunk_ranges[c][i]]
                assert shard == index.shard[i] and start <= index.offset[i]
                assert index.offset[i] + index.length[i] <= end
                assert w in readers[p.chunk_ranges[c][i]]
                # the range is requested by the time the chunk is read, by the worker that fetches it
                owner = plans[fetcher[p.chunk_ranges[c][i]]]
                assert p.chunk_ranges[c][i] in owner.owned[:owner.due(c - AHEAD)] or c < AHEAD or \
                    p.chunk_ranges[c][i] in owner.owned[:owner.due(0)]
        assert set(p.owned.tolist()) == set(np.flatnonzero(fetcher == w).tolist())
    single = [r for r in range(len(ranges)) if len(readers[r]) == 1]
    assert all(fetcher[r] in readers[r] for r in single)


# ---------------------------------------------------------------------- requests in flight
@pytest.mark.timeout(120)
def test_later_chunks_ranges_are_on_the_wire_while_a_chunk_is_read(http_server):
    folder, name = even_shards(http_server.root)
    proxy = Proxy(http_server.url, delay=0.1)
    proxy.start()
    try:
        s = GEKOStream(f"{proxy.url}{name}/", total_epochs=1, config=QUIET, shuffle=False, shuffle_buffer=8,
                       remote=FAST)
        s.set_epoch(0)
        proxy.reset()
        got = [x["__key__"] for x in s]
        stats = proxy.stats()
    finally:
        proxy.stop()
    assert got == [f"k{i:05d}" for i in range(64)]
    # 8 chunks of one 16 KB range each: the first chunk's range and the next AHEAD chunks' go out together
    assert stats["max_inflight"] >= 1 + AHEAD, stats
    assert s.stats["bytes_read"] == int(read_index(folder).length.sum())


@pytest.mark.timeout(120)
def test_a_stalled_hand_over_is_fetched_by_the_reader_itself(http_server, monkeypatch):
    # Worker 1 of 2 reads alone: the ranges worker 0 fetches for both never come, so after the (here short)
    # wait worker 1 fetches them itself and still reads every sample of its share, in order.
    folder, name = even_shards(http_server.root, n=48, per=48)
    monkeypatch.setattr(remote, "HANDOVER_WAIT", 0.2)
    index = read_index(f"{http_server.url}{name}/")
    order = np.arange(index.num_samples)
    share = SharedRanges(index=index, remote=[True], order=order, batch=4, num_workers=2, worker=1, chunk=8,
                         folder=range_dir(index), tag="t", config=FAST)
    assert any(share.plan.fetcher[r] == 0 for r in range(len(share.plan.ranges)))
    reader = RangeReader(index, list(index.shards), RangeFetcher(config=FAST), share)
    mine = order[(np.arange(order.shape[0]) // 4) % 2 == 1]
    got = []
    for c in range(0, mine.shape[0], 8):
        got += [(i, x["__key__"]) for i, x in reader.read(mine[c:c + 8].tolist())]
    reader.close()
    assert got == [(int(i), f"k{i:05d}") for i in mine]


# ---------------------------------------------------------------------- the shared-memory folder
@pytest.mark.timeout(120)
def test_a_killed_training_process_leaves_no_range_folder_for_long(http_server):
    _, name = even_shards(http_server.root, n=256, size=4096, per=128)
    url = f"{http_server.url}{name}/"
    child = textwrap.dedent(f"""
        import sys, time
        from torch.utils.data import DataLoader
        from geko_data.config import GEKOConfig
        from geko_data.stream import GEKOStream
        s = GEKOStream({url!r}, total_epochs=1, batch_size=8, shuffle_buffer=16,
                       config=GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0))
        s.set_epoch(0)
        it = iter(DataLoader(s, batch_size=8, num_workers=2, collate_fn=lambda b: b))
        next(it)
        print("reading", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "reading"
        (folder,) = range_dirs(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the training process and its DataLoader workers, no cleanup
        proc.wait(timeout=10)
    time.sleep(0.2)  # the workers' exit after the group's SIGKILL
    assert os.path.isdir(folder)  # SIGKILL runs no cleanup ...
    owner = type("Stream", (), {})()
    live = range_dir(owner)  # ... the next stream on this host removes it: its process is gone
    assert not os.path.exists(folder)
    assert os.path.isdir(live) and os.path.dirname(live) == os.path.dirname(folder)
    assert os.path.basename(live) not in remove_stale(os.path.dirname(live))  # a live process's folder stays
    assert os.path.isdir(live)


@pytest.mark.timeout(120)
def test_workers_hand_over_through_shared_memory_and_leave_nothing(http_server):
    _, name = even_shards(http_server.root, n=400, size=8192, per=200)
    before = range_dirs()
    s = GEKOStream(f"{http_server.url}{name}/", total_epochs=1, config=QUIET, seed=1, batch_size=8,
                   shuffle_buffer=32)
    (folder,) = range_dirs() - before
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert folder.startswith("/dev/shm/")
    s.set_epoch(0)
    loader = DataLoader(s, batch_size=8, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    assert sorted(x["__index__"] for b in loader for x in b) == list(range(400))
    assert os.listdir(folder) == []  # every reader dropped its link: no bytes left in memory
    assert s.stats["bytes_read"] == int(s.index.length.sum())
    del s, loader
    import gc

    gc.collect()
    assert not os.path.exists(folder)


@pytest.mark.timeout(60)
def test_a_forked_worker_collects_none_of_the_parents_filesystems(http_server):
    # fsspec closes a collected filesystem's session from a finalizer. In a forked DataLoader worker, a
    # filesystem the parent had dropped but not yet collected was collected there: its finalizer waited 0.1 s
    # on the parent's dead loop (on the worker's I/O thread when the collector ran there: every request of
    # the worker stalled, about 1 s per epoch in the benchmark) and closed the parent's sockets.
    import gc

    _, name = even_shards(http_server.root)

    def collected_in_a_fork() -> int:
        """How many filesystems the worker's first collection finds unreachable (kept, not freed: no finalizer
        runs, so counting cannot wait on anything)."""
        from fsspec.spec import AbstractFileSystem

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            os.write(w, str(sum(isinstance(o, AbstractFileSystem) for o in gc.garbage)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        return int(os.read(r, 64))

    gc.collect()
    gc.disable()  # what the collector had not got to when the DataLoader forked
    try:
        for _ in range(5):
            read_index(f"{http_server.url}{name}/")  # each read makes, uses and closes a filesystem
        collected = collected_in_a_fork()
    finally:
        gc.enable()
    assert collected == 0  # before: the 5 filesystems, each finalizer waiting 0.1 s on the parent's dead loop
    assert read_index(f"{http_server.url}{name}/").num_samples == 64  # the parent's connections still work

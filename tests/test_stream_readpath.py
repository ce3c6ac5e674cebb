"""The per-sample work of GEKOStream's local read path, which is CPU time of every sample in a DataLoader worker:
a run of adjacent samples is one ``preadv`` (no seek), and a sample costs a bounded number of Python frames
of the package (groups of a shard join the block's dict together, not through a generator step each).
``ShardReader.read_all`` gives what ``dict(ShardReader.read(ids))`` gives, bad data included."""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import pytest

import geko_data
from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.readers import BadData, ShardReader
from geko_data.shards import ShardError, read_index, write_shards
from geko_data.stream import GEKOStream

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None)
PACKAGE = os.path.dirname(os.path.abspath(geko_data.__file__))


@pytest.fixture
def folder(tmp_path):
    """2 shards x 300 samples of 3 members (2 KB, 1 byte, 9 bytes), as ShardWriter writes them."""
    payload = bytes(range(256)) * 8
    write_shards(({"__key__": f"k{i:05d}", "bin": payload, "cls": str(i % 10).encode(), "txt": f"sample{i:03d}"}
                  for i in range(600)), str(tmp_path / "shard-%03d.tar"), maxcount=300)
    return str(tmp_path)


def _profiled(stream: GEKOStream) -> tuple[list[dict], Counter]:
    """The stream's samples, and the Python frames of the package and the C calls made while reading them."""
    calls: Counter = Counter()

    def count(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            calls["frames"] += 1
        elif event == "c_call":
            calls[getattr(arg, "__name__", "?")] += 1

    it = iter(stream)
    sys.setprofile(count)
    try:
        out = list(it)
    finally:
        sys.setprofile(None)
    return out, calls


@pytest.mark.timeout(60)
def test_runs_of_one_sample_cost_one_pread_and_few_frames(folder):
    # Every other sample frozen: each run of adjacent drawn samples is one sample long, as a DataLoader
    # worker's runs are when its batches alternate with the other workers'.
    s = GEKOStream(folder, total_epochs=1, config=QUIET, shuffle_buffer=256)
    s.state.bucket[1::2] = policy.FREEZE
    s.state.epoch = 0
    s.set_epoch(0)
    out, calls = _profiled(s)
    n = len(out)
    assert n == 300 and {x["__index__"] for x in out} == set(range(0, 600, 2))
    assert calls["seek"] == 0
    assert calls["preadv"] == n  # one system call a run, each run one sample
    # Per sample: the tagging generator, its caller and __iter__; per group of a shard a few more. Reading
    # through a generator per sample and per group, and an open-file check per run, cost 6 a sample.
    assert calls["frames"] / n < 4.0, calls["frames"] / n
    idx = read_index(folder)
    first = next(x for x in out if x["__index__"] == 0)
    assert first["__key__"] == "k00000" and first["bin"] == bytes(range(256)) * 8 and first["cls"] == b"0"
    assert first["txt"] == b"sample000" and first["__url__"] == idx.shards[0]


def _reader(folder: str, handler=None) -> ShardReader:
    idx = read_index(folder)
    urls = list(idx.shards)
    bad = BadData(handler=handler, lost=np.zeros(idx.num_samples, np.uint8), sample_shard=idx.shard)
    start = np.searchsorted(idx.shard, np.arange(len(urls) + 1))
    return ShardReader(idx, urls, [True] * len(urls), start, bad, False)


def _corrupt(folder: str, ids: list[int]) -> None:
    """Overwrite a byte of the first header of each of ``ids`` (its name: the sample no longer parses)."""
    idx = read_index(folder)
    for i in ids:
        with open(idx.shards[idx.shard[i]], "r+b") as f:
            f.seek(int(idx.offset[i]) + 1)
            f.write(b"\xff")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", [False, True])
def test_read_all_is_dict_of_read_with_bad_data(folder, stop):
    _corrupt(folder, [10, 320])
    # Ids as a block reads them: shard 1 first, then shard 0, in runs with gaps, and one id out of order.
    ids = np.array([300, 301, 320, 321, 400, 0, 1, 2, 10, 11, 12, 250, 5])
    seen = []

    def handler(exn):
        seen.append(str(exn))
        return not stop  # False: webdataset's *_and_stop, the rest of the shard is lost

    a, b = _reader(folder, handler), _reader(folder, handler)
    got = a.read_all(ids)
    want = dict(b.read(ids))
    assert list(got) == list(want) and got == want
    assert a.bad.lost_here == b.bad.lost_here and a.tally == b.tally
    if stop:  # everything of a shard after its corrupt sample is lost, what came before is kept
        assert list(got) == [300, 301, 0, 1, 2] and a.bad.lost_here == {320, 321, 400, 10, 11, 12, 250, 5}
    else:
        assert list(got) == [300, 301, 321, 400, 0, 1, 2, 11, 12, 250, 5] and a.bad.lost_here == {10, 320}
    assert a.tally["samples_read"] == len(got)
    # Without a handler the first bad sample raises, naming its shard and key.
    with pytest.raises(ShardError, match=r"shard-001\.tar.*k00320"):
        _reader(folder).read_all(ids)


@pytest.mark.timeout(60)
def test_truncated_shard_fails_its_samples_in_read_all(folder):
    idx = read_index(folder)
    cut = int(idx.offset[150]) + 100  # inside sample 150 of shard 0
    path = idx.shards[0]
    reader = _reader(folder, handler=lambda exn: True)
    assert list(reader.read_all(np.array([0]))) == [0]  # the shard is open, its size checked
    os.truncate(path, cut)  # truncated while the reader keeps it open: its next group sees the size changed
    got = reader.read_all(np.array([148, 149, 150, 151, 300]))
    assert list(got) == [300] and reader.bad.lost_here == {148, 149, 150, 151}
    with pytest.raises(ShardError, match=r"shard-000\.tar' changed since indexing: \d+ bytes, index says"):
        _reader(folder).read_all(np.array([148]))  # as a fresh reader says


@pytest.mark.timeout(60)
def test_a_shard_swapped_for_a_link_out_of_the_folder_is_refused_at_the_next_open(tmp_path):
    # read_index checks each name once; each epoch re-opened the shard by name and read the file a link
    # planted since named, outside the folder.
    data, private = tmp_path / "data", tmp_path / "private"
    write_shards(({"__key__": f"k{i}", "txt": f"public{i:03d}"} for i in range(4)), str(data / "s-%02d.tar"))
    write_shards(({"__key__": f"k{i}", "txt": f"SECRET{i:03d}"} for i in range(4)), str(private / "p-%02d.tar"))
    stream = GEKOStream(str(data), total_epochs=2, shuffle=False, config=GEKOConfig(log_bucket_stats=False))
    stream.set_epoch(0)
    assert [s["txt"] for s in stream] == [f"public{i:03d}".encode() for i in range(4)]
    (data / "s-00.tar").unlink()
    (data / "s-00.tar").symlink_to(private / "p-00.tar")
    stream.set_epoch(1)
    with pytest.raises(ShardError, match=r"now resolves to .*p-00.tar', outside the index's folder"):
        list(stream)
    # a link that stays inside the folder is still read
    (data / "s-00.tar").unlink()
    write_shards(({"__key__": f"k{i}", "txt": f"public{i:03d}"} for i in range(4)), str(tmp_path / "again-%02d.tar"))
    os.replace(tmp_path / "again-00.tar", data / "real.tar")
    (data / "s-00.tar").symlink_to(data / "real.tar")
    assert [s["txt"] for s in stream] == [f"public{i:03d}".encode() for i in range(4)]

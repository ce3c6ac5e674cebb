"""GNU sparse tar members are refused, never expanded.

A red-team (r06) made a 10 KiB tar whose sparse member ``k0.bin`` is 1 GiB once tarfile fills its holes with
zeros, on every read. WebDataset writers never write sparse members; the indexer and every read path (the
local fast path and its tarfile fallback, ``pipe:`` streams, remote byte ranges) now raise a ShardError
naming the shard, the member and its byte offset before reading the member's data.
"""

import os
import re
import shutil
import subprocess
import tarfile
import tracemalloc

import numpy as np
import pytest

from geko_data import shards as sh
from geko_data.config import GEKOConfig
from geko_data.shards import ShardError, index_shards, iter_tar_samples, parse_sample, parse_samples
from geko_data.stream import GEKOStream
from servers import http_server  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
# GNU tar's sparse formats: old GNU headers (type 'S'), and pax GNU.sparse 0.0, 0.1 and 1.0 records.
FORMATS = {"gnu": ["--format=gnu"], "pax-0.0": ["--format=pax", "--sparse-version=0.0"],
           "pax-0.1": ["--format=pax", "--sparse-version=0.1"], "pax-1.0": ["--format=pax", "--sparse-version=1.0"]}


def _sparse_tar(folder, fmt="gnu", size=1 << 30, before=False):
    """r06's shard: sample k0 (``k0.bin``, ``size`` bytes of holes stored sparse: a few KiB), then sample k1
    (``k1.txt``); with
    ``before``, a plain sample ``a0.txt`` comes first (the sparse member is then not at byte 0)."""
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "k0.bin", "wb") as f:
        f.truncate(size)
    (work / "k1.txt").write_bytes(b"x")
    (work / "a0.txt").write_bytes(b"plain")
    members = (["a0.txt"] if before else []) + ["k0.bin", "k1.txt"]
    out = folder / "data"
    out.mkdir(exist_ok=True)
    subprocess.run(["tar", "--sparse", *FORMATS[fmt], "-C", str(work), "-cf", str(out / "shard-0.tar"), *members],
                   check=True)
    shutil.rmtree(work)
    assert os.path.getsize(out / "shard-0.tar") < 64 << 10
    return out / "shard-0.tar"


def _index_anyway(tar):
    """An index of ``tar`` as the indexer wrote it before sparse members were refused (ranges from tarfile,
    each sample's stored bytes hashed): what a shard swapped after indexing, or a shipped index, meets."""
    ranges = []
    with tarfile.open(tar) as tf:
        while (m := tf.next()) is not None:
            key = m.name.split(".", 1)[0]
            if ranges and ranges[-1][0] == key:
                ranges[-1][2] = tf.offset - ranges[-1][1]
            else:
                ranges.append([key, m.offset, tf.offset - m.offset])
    data = open(tar, "rb").read()
    digests = [sh.sample_hash(data[o:o + n]) for _, o, n in ranges]
    if isinstance(digests[0], int):  # (geko_data before BLAKE2b: one uint64 a sample)
        hashes = np.array(digests, np.uint64)
    else:
        hashes = np.frombuffer(b"".join(digests), np.uint8).reshape(len(ranges), -1)
    n, paths, sizes = len(ranges), [str(tar)], [len(data)]
    index = sh.ShardIndex(shards=tuple(paths), sizes=tuple(sizes), keys=[k for k, _, _ in ranges],
                          shard=np.zeros(n, np.int32), offset=np.array([o for _, o, _ in ranges], np.int64),
                          length=np.array([x for _, _, x in ranges], np.int64),
                          fingerprint=sh.fingerprint(paths, sizes, n, hashes=hashes), hashes=hashes)
    sh._write_index(index, str(tar.parent / "index.arrow"))
    return index


def _refusal(tar, at):
    return rf"shard '(pipe:cat )?{tar}': member 'k0\.bin' at byte {at} is a GNU sparse file"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_index_shards_refuses_a_sparse_member(tmp_path, fmt):
    tar = _sparse_tar(tmp_path, fmt)  # r06 as built: 1 GiB of holes
    with tarfile.open(tar) as tf:
        assert tf.getmember("k0.bin").issparse()
    with pytest.raises(ShardError, match=_refusal(tar, 0) + r" \(1,073,741,824 bytes"):
        index_shards([tar], output=tar.parent / "index.arrow")
    assert not (tar.parent / "index.arrow").exists()
    # not only at byte 0: the offset named is the sparse member's header
    later = _sparse_tar(tmp_path / "later", fmt, before=True)
    with tarfile.open(later) as tf:
        at = tf.getmember("k0.bin").offset
    assert at > 0
    with pytest.raises(ShardError, match=_refusal(later, at)):
        index_shards([later])


def _peak_while(fn):
    """(what ``fn`` raised or returned, peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        try:
            got = fn()
        except ShardError as e:
            got = e
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# The read tests expand 64 MiB (not r06's 1 GiB): what the code before this change allocated, for the test
# to fail there without taking GBs of a shared machine.
READ_SIZE = 64 << 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["gnu", "pax-1.0"])
@pytest.mark.parametrize("shard_url", [None, "pipe:cat {}"], ids=["local", "pipe"])
def test_stream_refuses_a_sparse_member_without_expanding_it(tmp_path, fmt, shard_url):
    tar = _sparse_tar(tmp_path, fmt, size=READ_SIZE, before=True)
    index = _index_anyway(tar)
    at = int(index.offset[1])  # sample k0: the sparse member
    stream = GEKOStream(tar.parent, total_epochs=1, shuffle=False, config=QUIET, shard_url=shard_url)
    stream.set_epoch(0)
    got, peak = _peak_while(lambda: [x["__key__"] for x in stream])
    assert isinstance(got, ShardError), got
    assert re.search(_refusal(tar, at), str(got)), str(got)
    assert peak < 8 << 20, f"{peak:,} bytes allocated while refusing"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["gnu", "pax-0.1"])
def test_every_parser_refuses_a_sparse_member(tmp_path, fmt):
    tar = _sparse_tar(tmp_path, fmt, size=READ_SIZE, before=True)
    index = _index_anyway(tar)
    buf = tar.read_bytes()
    off, n = int(index.offset[1]), int(index.length[1])
    pattern = _refusal(tar, off)
    # one sample (the fast parser hands it to tarfile, which must not read it)
    got, peak = _peak_while(lambda: parse_sample(buf[off:off + n], shard=str(tar), key="k0", offset=off))
    assert isinstance(got, ShardError) and re.search(pattern, str(got)), got
    assert peak < 8 << 20
    # a run of samples (the layout path first, as a local read does)
    spans = list(zip(index.offset.tolist(), index.length.tolist()))
    (a, k, after), peak = _peak_while(lambda: parse_samples(buf, spans, shard=str(tar), keys=["a0", "k0", "k1"],
                                                            offsets=[o for o, _ in spans]))
    assert a == {"__key__": "a0", "txt": b"plain"} and after == {"__key__": "k1", "txt": b"x"}
    assert isinstance(k, ShardError) and re.search(pattern, str(k)), k
    assert peak < 8 << 20
    # a stream (pipe: and remote streams): the sample before it is read, then the refusal
    with open(tar, "rb") as f:
        samples = iter_tar_samples(f, shard=str(tar))
        assert next(samples)[0] == {"__key__": "a0", "txt": b"plain"}
        got, peak = _peak_while(lambda: next(samples))
    assert isinstance(got, ShardError) and re.search(pattern, str(got)), got
    assert peak < 8 << 20


@pytest.mark.timeout(60)
def test_remote_reads_refuse_a_sparse_member(tmp_path, http_server):
    folder = http_server.root / f"sparse-{os.getpid()}-{tmp_path.name}"
    tar = _sparse_tar(folder, "gnu", size=READ_SIZE, before=True)
    index = _index_anyway(tar)
    url = f"{http_server.url}{folder.name}/data/"
    stream = GEKOStream(url, total_epochs=1, shuffle=False, config=QUIET)
    stream.set_epoch(0)
    got, peak = _peak_while(lambda: [x["__key__"] for x in stream])
    assert isinstance(got, ShardError), got
    assert re.search(rf"member 'k0\.bin' at byte {int(index.offset[1])} is a GNU sparse file", str(got)), got
    assert peak < 16 << 20


"""The per-sample content hash is cryptographic (BLAKE2b-128, index format 3).

A red-team (r02) changed 4 bytes of a shard (a label 1 -> 7) keeping every sample's xxh3_64, so
``verify=True`` and re-indexing both missed it: whoever writes the shards chooses their bytes, and a
non-cryptographic hash can be collided on purpose. These tests build that collision against xxh3 and check
that every read path with ``verify=True`` and a re-index now notice it, and that format-2 indexes (xxh3_64
hashes) are refused with the command to re-run.
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from geko_data.config import GEKOConfig
from geko_data.shards import ShardError, ShardIndex, index_shards, read_index
from geko_data.stream import GEKOStream
from servers import http_server  # noqa: F401 - fixture

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
META = b"geko_data_index"
# Bytes 64..68 and 72..76 of XXH3's default secret (kSecret, public in xxhash.h): a 64-byte stripe at offset
# 512 of a 1 KiB+ input is mixed with kSecret[64:128]; lane 0 with kSecret[64:72], lane 1 of the next stripe
# with kSecret[72:80].
K64, K72 = bytes.fromhex("3c2852bb"), bytes.fromhex("88d0658b")


def _payload(label: int, compensator: int) -> bytes:
    """A 1 KiB member whose lanes at 512 and 576 of the sample (the member's bytes 0 and 64) zero XXH3's
    product term (their low 32 bits equal the secret's), so the two high halves can trade value (label + d,
    compensator - d) without changing the accumulators: the r02 construction."""
    p = bytearray(1024)
    p[0:4], p[4:8] = K64, struct.pack("<I", label)
    p[64:68], p[68:72] = K72, struct.pack("<I", compensator)
    return bytes(p)


BENIGN, EVIL = _payload(1, 100), _payload(7, 94)  # label 1 -> 7, compensator 100 -> 94: the same lane sum


def _tar(body: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key in ("s0", "s1"):
            ti = tarfile.TarInfo(f"{key}.bin")
            ti.size, ti.mtime = len(body), 946684800
            tf.addfile(ti, io.BytesIO(body))
    return out.getvalue()


def _collided_shards(folder):
    """A folder with an index of the benign shard, the shard then swapped for the evil one (same size, same
    keys and byte ranges, every sample's xxh3_64 the same). Returns (folder, index built before the swap)."""
    folder.mkdir(parents=True, exist_ok=True)
    good, bad = _tar(BENIGN), _tar(EVIL)
    assert len(good) == len(bad) and good != bad
    # The collision is real against xxh3_64: each sample's bytes (header + 1 KiB) hash the same.
    for at in (0, 1536):
        assert good[at:at + 1536] != bad[at:at + 1536]
        assert xxhash.xxh3_64_intdigest(good[at:at + 1536]) == xxhash.xxh3_64_intdigest(bad[at:at + 1536])
    (folder / "shard-0.tar").write_bytes(good)
    before = index_shards([folder / "shard-0.tar"], output=folder / "index.arrow")
    (folder / "shard-0.tar").write_bytes(bad)  # the swap (an object overwritten in a bucket)
    return folder, before


def _labels(stream):
    stream.set_epoch(0)
    return [(x["__key__"], struct.unpack("<I", x["bin"][4:8])[0]) for x in stream]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shard_url", [None, "pipe:cat {}"], ids=["local", "pipe"])
def test_verify_catches_a_sample_changed_with_its_xxh3_kept(tmp_path, shard_url):
    folder, _ = _collided_shards(tmp_path / "s")
    # Without verify the change is read as it is (documented): only a content hash can see it.
    assert _labels(GEKOStream(folder, total_epochs=1, shuffle=False, config=QUIET, shard_url=shard_url)) == [
        ("s0", 7), ("s1", 7)]
    stream = GEKOStream(folder, total_epochs=1, shuffle=False, config=QUIET, shard_url=shard_url, verify=True)
    with pytest.raises(ShardError, match=r"shard-0\.tar.*sample 's0' at byte 0: content hash \(BLAKE2b-128\) "
                                         r"[0-9a-f]{32} differs from the index's [0-9a-f]{32}"):
        _labels(stream)


@pytest.mark.timeout(60)
def test_verify_catches_the_collision_over_http(tmp_path, http_server):
    # Remote byte-range reads check each fetched sample before parsing it (RangeReader's `check`).
    folder, _ = _collided_shards(http_server.root / f"collision-{os.getpid()}-{tmp_path.name}")
    url = f"{http_server.url}{folder.name}/"
    stream = GEKOStream(url, total_epochs=1, shuffle=False, config=QUIET, verify=True)
    with pytest.raises(ShardError, match=r"shard-0\.tar.*'s0'.*content hash \(BLAKE2b-128\)"):
        _labels(stream)


@pytest.mark.timeout(60)
def test_reindexing_the_collided_shard_changes_the_fingerprint(tmp_path):
    folder, before = _collided_shards(tmp_path / "s")
    again = index_shards([folder / "shard-0.tar"])
    assert again.fingerprint != before.fingerprint  # so a state saved for the benign shard is refused
    assert (again.hashes != before.hashes).any(axis=1).tolist() == [True, True]


@pytest.mark.timeout(60)
def test_index_hash_column_is_blake2b_128_of_each_sample(shards):
    table = pa.ipc.open_file(str(shards / "index.arrow")).read_all()
    assert table.schema.field("hash").type == pa.binary(16)  # fixed_size_binary(16)
    assert json.loads(table.schema.metadata[META])["format_version"] == 3
    idx = read_index(shards)
    assert idx.hashes.dtype == np.uint8 and idx.hashes.shape == (idx.num_samples, 16)
    column = table.column("hash").to_pylist()
    for i in range(idx.num_samples):
        with open(idx.shards[idx.shard[i]], "rb") as f:
            f.seek(idx.offset[i])
            digest = hashlib.blake2b(f.read(idx.length[i]), digest_size=16).digest()
        assert digest == idx.hashes[i].tobytes() == column[i]


def _as_format_2(src, dst):
    """``dst``: the index ``src`` as geko_data wrote it before (format 2): a uint64 xxh3_64 ``hash`` column
    and the fingerprint computed over those hashes as format 2 did."""
    table = pa.ipc.open_file(str(src)).read_all()
    meta = json.loads(table.schema.metadata[META])
    root = os.path.dirname(str(src))
    old = []
    for shard, offset, length in zip(*(table.column(c).to_pylist() for c in ("shard", "offset", "length"))):
        with open(os.path.join(root, meta["shards"][shard]), "rb") as f:
            f.seek(offset)
            old.append(xxhash.xxh3_64_intdigest(f.read(length)))
    hashes = np.array(old, dtype=np.uint64)
    table = table.set_column(table.column_names.index("hash"), "hash", pa.array(hashes, type=pa.uint64()))
    content = xxhash.xxh3_128_hexdigest(memoryview(hashes.astype("<u8")).cast("B"))
    payload = json.dumps([[os.path.basename(n) for n in meta["shards"]], [int(s) for s in meta["sizes"]],
                          table.num_rows, content])
    meta.update(format_version=2, fingerprint=hashlib.sha256(payload.encode()).hexdigest()[:32])
    table = table.replace_schema_metadata({META: json.dumps(meta).encode()})
    with pa.OSFile(str(dst), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return dst


@pytest.mark.timeout(60)
def test_format_2_index_with_xxh3_hashes_is_refused_with_the_fix(shards):
    old = _as_format_2(shards / "index.arrow", shards / "v2.arrow")
    fix = re.escape(f"re-run `geko-data index <shards> -o {old}`")
    pattern = re.escape(str(old)) + r": index format 2 keeps xxh3_64 .*not collision resistant.*" + fix
    with pytest.raises(ShardError, match=pattern):
        read_index(old)
    with pytest.raises(ShardError, match=pattern):
        GEKOStream(old, total_epochs=1, config=QUIET)


@pytest.mark.timeout(60)
def test_in_memory_index_pickles_its_digests_and_refuses_uint64_hashes(shards):
    built = index_shards(sorted(shards.glob("*.tar")))
    again = pickle.loads(pickle.dumps(built))
    assert again.hashes.dtype == np.uint8 and again.hashes.shape == (built.num_samples, 16)
    assert np.array_equal(again.hashes, built.hashes) and again.fingerprint == built.fingerprint
    assert np.array_equal(built.hashes, read_index(shards).hashes)
    # A hand-built index with format-2 style hashes (one uint64 a sample) is not taken for digests.
    with pytest.raises(ValueError, match=r"\(N, 16\) uint8 array of BLAKE2b-128 digests.*uint64"):
        ShardIndex(shards=built.shards, sizes=built.sizes, keys=list(built.keys), shard=built.shard,
                   offset=built.offset, length=built.length, fingerprint=built.fingerprint,
                   hashes=np.zeros(built.num_samples, np.uint64))


@pytest.mark.timeout(60)
def test_remote_index_merges_the_shards_digests(shards, http_server):
    from geko_data.remote_index import index_remote

    folder = http_server.root / f"merge-{os.getpid()}-{shards.parent.name}"
    shutil.copytree(shards, folder)
    url = f"{http_server.url}{folder.name}/"
    remote = index_remote([url], progress=False)
    local = read_index(shards)
    assert remote.hashes.dtype == np.uint8 and remote.hashes.shape == (local.num_samples, 16)
    assert np.array_equal(remote.hashes, local.hashes) and remote.fingerprint == local.fingerprint

"""Bad data through GEKOStream: every case raises naming the shard (and key), or is skipped and counted.

Each case runs on both read paths: local files (seek by the index) and ``pipe:cat`` (read through).
"""

import gzip
import io
import json
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from conftest import SHARD_SIZES, sample_for
from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.shards import ShardError, index_shards, read_index
from geko_data.stream import GEKOStream

# GEKO's rules before short runs kept half of FREEZE (tested in test_policy)
QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None, bucket_weights=(3, 2, 1))
N = sum(SHARD_SIZES)
PIPE = "pipe:cat {}"
PATHS = pytest.mark.parametrize("shard_url", [None, PIPE], ids=["local", "pipe"])


def as_list(batch):
    return batch


def run(shards, **kw):
    """(ids yielded, stats) of one epoch, with warnings about skips silenced."""
    s = GEKOStream(shards, total_epochs=1, config=QUIET, shuffle=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [x["__index__"] for x in s]
    return got, s.stats


def member_offset(path, name):
    with tarfile.open(path) as tf:
        return tf.getmember(name).offset


# ------------------------------------------------------------------ decode specs


def _evil_shard(tmp_path, marker):
    class Evil:  # unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a.tar")) as w:
        w.write({"__key__": "ok", "txt": b"fine"})
        w.write({"__key__": "bad", "pyd": pickle.dumps(Evil())})
        w.write({"__key__": "bad2", "pth.gz": gzip.compress(pickle.dumps(Evil()))})  # gunzipped, then torch.load
    index_shards([folder / "a.tar"], output=folder / "index.arrow")
    return folder


@PATHS
@pytest.mark.parametrize("decode", ["pil", [], ["rgb8", "l"]])
def test_decode_specs_refuse_members_that_would_be_unpickled(tmp_path, shard_url, decode):
    marker = tmp_path / "pwned"
    folder = _evil_shard(tmp_path, marker)
    with pytest.raises(ShardError, match=r"a\.tar.*sample 'bad'.*bad\.pyd.*'pyd'"):
        run(folder, decode=decode, shard_url=shard_url)
    got, stats = run(folder, decode=decode, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert got == [0] and stats["skipped"] == 2 and stats["skipped_draws"] == 2
    assert not marker.exists()


def test_decode_specs_really_decode(tmp_path):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir()
    pixels = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    arr = io.BytesIO()
    np.save(arr, np.arange(5))
    with wds.TarWriter(str(folder / "a.tar")) as w:
        w.write({"__key__": "im0", "png": png.getvalue(), "cls": b"3", "npy": arr.getvalue(), "json": b'{"a": 1}'})
    index_shards([folder / "a.tar"], output=folder / "index.arrow")
    (x,) = GEKOStream(folder, total_epochs=1, config=QUIET, decode="rgb8")
    assert x["png"].dtype == np.uint8 and np.array_equal(x["png"], pixels)
    assert x["cls"] == 3 and x["json"] == {"a": 1} and np.array_equal(x["npy"], np.arange(5))
    (y,) = GEKOStream(folder, total_epochs=1, config=QUIET, decode="pil")
    assert isinstance(y["png"], Image.Image) and y["png"].size == (3, 4)
    with pytest.raises(ValueError, match="`decode` spec 'bogus'"):
        GEKOStream(folder, total_epochs=1, decode="bogus")


def test_decode_errors_name_shard_key_and_member(shards):
    def broken(sample):
        raise KeyError("nope")

    with pytest.raises(ShardError, match=r"shard-00\d\.tar.*sample 's\d_\d{3}'.*KeyError") as e:
        run(shards, decode=broken)
    assert isinstance(e.value.__cause__, KeyError)
    s = GEKOStream(shards, total_epochs=1, config=QUIET, shuffle=False, decode=[lambda k, d: 1 / 0])
    with pytest.raises(ShardError, match=r"sample 's0_000': decoding member s0_000\.(json|txt) failed"):
        next(iter(s))


# ------------------------------------------------------------------ corrupt and truncated tars


@PATHS
@pytest.mark.parametrize("damage", ["zeroed", "bad-checksum"])
def test_corrupt_header_inside_a_shard_is_an_error(shards, shard_url, damage):
    """tarfile takes a bad header for the end of the archive: nothing after it may silently disappear."""
    path = read_index(shards).shards[1]
    off = member_offset(path, "s1_003.txt")  # the second member of sample s1_003
    data = bytearray(Path(path).read_bytes())
    if damage == "zeroed":
        data[off:off + 512] = bytes(512)
    else:
        data[off + 10] ^= 0xFF
    Path(path).write_bytes(bytes(data))  # same size: the size check cannot see it
    with pytest.raises(ShardError, match=r"shard-001\.tar.*'s1_003'"):
        run(shards, shard_url=shard_url)
    got, stats = run(shards, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert 8 not in got and len(got) + stats["skipped"] == N and stats["skipped_draws"] == stats["skipped"]
    if shard_url is None:  # the local path reads each sample apart: only the damaged one is lost
        assert stats["skipped"] == 1


def test_corrupt_header_error_names_the_byte_offset(shards):
    path = read_index(shards).shards[1]
    off = member_offset(path, "s1_003.txt")
    data = bytearray(Path(path).read_bytes())
    data[off:off + 512] = bytes(512)
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"byte {off}"):
        run(shards)


@PATHS
def test_truncated_shard_raises_or_is_skipped_and_counted(shards, shard_url):
    path = read_index(shards).shards[1]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-001\.tar.*s1_0\d\d"):
        run(shards, shard_url=shard_url)
    s = GEKOStream(shards, total_epochs=1, config=QUIET, shuffle=False, shard_url=shard_url,
                   handler=wds.ignore_and_continue)
    with pytest.warns(UserWarning, match=r"skipped \d+ unreadable .* in epoch 0"):
        got = [x["__index__"] for x in s]
    lost = s.stats["skipped"]
    assert lost > 0 and len(got) + lost == N and s.efficiency_report()["skipped_unreadable"] == lost
    assert set(range(5)) <= set(got)  # the shards around it are whole


def test_skip_warning_counts_each_epoch_apart(shards):
    path = read_index(shards).shards[1]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    s = GEKOStream(shards, total_epochs=3, config=QUIET, shuffle=False, handler=wds.ignore_and_continue)
    for epoch in range(2):
        s.set_epoch(epoch)
        with pytest.warns(UserWarning, match=rf"skipped 17 unreadable .*\(17 draw\(s\)\) in epoch {epoch} "):
            got = [x["__index__"] for x in s]
        assert len(got) == N - 17 and s.stats["skipped"] == 17  # per epoch, not a running total


@PATHS
def test_missing_shard(shards, shard_url):
    os.remove(read_index(shards).shards[2])
    with pytest.raises(ShardError, match=r"shard-002\.tar.*s2_000"):
        run(shards, shard_url=shard_url)
    got, stats = run(shards, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert len(got) == N - SHARD_SIZES[2] and stats["skipped"] == SHARD_SIZES[2]


@PATHS
def test_handler_returning_false_stops_the_shard_quietly(shards, shard_url):
    """webdataset's *_and_stop convention: no exception, the shard ends, and what it cost is counted."""
    path = read_index(shards).shards[1]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    got, stats = run(shards, shard_url=shard_url, handler=wds.ignore_and_stop)
    assert set(range(5)) | set(range(22, N)) <= set(got)  # other shards go on
    assert len(got) + stats["skipped"] == N


# ------------------------------------------------------------------ shard changed since indexing


def _rewrite(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@PATHS
def test_key_not_in_the_index(shards, shard_url):
    path = read_index(shards).shards[2]
    samples = [sample_for(2, i) for i in range(SHARD_SIZES[2])]
    samples.insert(4, {**sample_for(2, 99), "__key__": "s2_extra"})
    _rewrite(path, samples)
    # local: the size changed; pipe: the stream is held to the index key by key
    with pytest.raises(ShardError, match=r"shard-002\.tar.*(changed since indexing|'s2_extra' is not in the index)"):
        run(shards, shard_url=shard_url)
    got, stats = run(shards, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert len(got) + stats["skipped"] == N and stats["skipped"] > 0


def test_indexed_key_that_never_appears_on_a_pipe(shards):
    path = read_index(shards).shards[2]
    _rewrite(path, [sample_for(2, i) for i in range(SHARD_SIZES[2]) if i != 4])
    with pytest.raises(ShardError, match=r"shard-002\.tar.*'s2_005' is out of place.*'s2_004'"):
        run(shards, shard_url=PIPE)
    _rewrite(path, [sample_for(2, i) for i in range(SHARD_SIZES[2] - 1)])  # the last one is gone
    with pytest.raises(ShardError, match=r"shard-002\.tar.*ended before sample 's2_008'"):
        run(shards, shard_url=PIPE)


@PATHS
def test_duplicate_extension_in_one_sample(tmp_path, shard_url):
    folder = tmp_path / "dup"
    folder.mkdir()
    path = folder / "a.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("k0.txt", b"a"), ("k1.JSON", b"{}"), ("k1.txt", b"b"), ("k1.TXT", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index_shards([path], output=folder / "index.arrow")
    with pytest.raises(ShardError, match=r"a\.tar.*sample 'k1' has two members with extension 'txt'"):
        run(folder, shard_url=shard_url)
    got, stats = run(folder, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert got == [0] and stats["skipped"] == 1


@PATHS
def test_extensions_are_lowercased_as_webdataset_does(tmp_path, shard_url):
    folder = tmp_path / "case"
    folder.mkdir()
    path = folder / "a.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("k0.JSON", b"{}"), ("k0.Txt", b"x"), ("k1.CLS", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index_shards([path], output=folder / "index.arrow")
    ours = list(GEKOStream(folder, total_epochs=1, config=QUIET, shuffle=False, shard_url=shard_url))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    strip = lambda x: {k: v for k, v in x.items() if not k.startswith("__") or k == "__key__"}
    assert [strip(x) for x in ours] == [strip(x) for x in theirs]
    assert set(ours[0]) >= {"json", "txt"}


# ------------------------------------------------------------------ pipes


def test_shard_url_is_shell_quoted(tmp_path, monkeypatch):
    from conftest import write_uneven_shards

    monkeypatch.chdir(tmp_path)
    folder = write_uneven_shards(tmp_path / "a b $(touch pwned)", sizes=(3, 2))
    got = [x["__key__"] for x in GEKOStream(folder, total_epochs=1, config=QUIET, shuffle=False, shard_url=PIPE)]
    assert got == ["s0_000", "s0_001", "s0_002", "s1_000", "s1_001"]
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ workers


def test_skips_in_workers_are_counted_in_the_main_process(shards):
    path = read_index(shards).shards[1]  # ids 5..21
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    s = GEKOStream(shards, total_epochs=3, config=QUIET.replace(use_curriculum=False), seed=3, batch_size=4,
                   handler=wds.ignore_and_continue)
    s.state.bucket[:] = policy.FOCUS
    s.state.bucket[6] = policy.HARD  # drawn several times: all its draws are lost
    s.state.epoch = 1
    s.set_epoch(1)
    counts = s.plan.counts
    assert counts[6] > 1
    loader = DataLoader(s, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    got = [x["__index__"] for b in loader for x in b]
    lost = counts[5:22]
    report = s.efficiency_report()
    assert report["skipped_unreadable"] == int((lost > 0).sum()) == 17  # each sample once, whichever worker
    assert report["skipped_draws"] == int(lost.sum()) == int(counts.sum()) - len(got)
    assert s.stats["samples_yielded"] == len(got)
    s.set_epoch(2)  # a new epoch starts from zero
    assert s.stats["skipped"] == 0 and s.stats["skipped_draws"] == 0


def test_resume_with_workers_needs_the_batch_size(shards):
    s = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4)
    s.set_epoch(0)
    sd = json.loads(json.dumps(s.state_dict(consumed=12)))
    s2 = GEKOStream(shards, total_epochs=2, config=QUIET, seed=4)
    s2.load_state_dict(sd)
    loader = DataLoader(s2, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    with pytest.raises(RuntimeError, match=r"batch_size=B"):
        list(loader)


# ------------------------------------------------------------------ same size, other content


def _flip_label(path, key, ext, new):
    """Overwrite the data of member ``key.ext`` in place with ``new`` (same length): sizes stay equal."""
    with tarfile.open(path) as tf:
        m = tf.getmember(f"{key}.{ext}")
    with open(path, "r+b") as f:
        f.seek(m.offset_data)
        old = f.read(m.size)
        assert len(new) == len(old) and new != old
        f.seek(m.offset_data)
        f.write(new)
    return m.offset


@PATHS
def test_changed_content_of_the_same_size_is_detected(shards, tmp_path, shard_url):
    from geko_data.state import FingerprintError, SampleState, StateFileError

    before = GEKOStream(shards, total_epochs=1, config=QUIET)
    before.state.save(tmp_path / "state.arrow")
    old_index = shards / "old.arrow"
    old_index.write_bytes((shards / "index.arrow").read_bytes())
    path = read_index(shards).shards[1]
    _flip_label(path, "s1_003", "txt", b"sample 1/9")  # was "sample 1/3"
    offset = int(read_index(shards).offset[5 + 3])

    # the old index cannot see it by sizes or keys; verify=True sees it, naming shard, key and offset
    got = [x for x in GEKOStream(old_index, total_epochs=1, config=QUIET, shuffle=False, shard_url=shard_url)]
    assert got[8]["txt"] == b"sample 1/9"
    with pytest.raises(ShardError, match=rf"shard-001\.tar.*sample 's1_003' at byte {offset}: content hash"):
        run(old_index, verify=True, shard_url=shard_url)
    ids, stats = run(old_index, verify=True, shard_url=shard_url, handler=wds.ignore_and_continue)
    assert 8 not in ids and stats["skipped"] == 1

    # re-indexed: another fingerprint, so the old state is refused everywhere it is checked
    new = index_shards(read_index(shards).shards, output=shards / "index.arrow")
    assert new.fingerprint != before.index.fingerprint
    with pytest.raises(FingerprintError, match=new.fingerprint):
        SampleState.load(tmp_path / "state.arrow", expect_fingerprint=new.fingerprint)
    with pytest.raises(StateFileError, match="other shards"):
        GEKOStream(shards, total_epochs=1, state=SampleState.load(tmp_path / "state.arrow"))
    assert len(run(shards, verify=True, shard_url=shard_url)[0]) == N


def test_verify_refuses_a_compressed_stream(shards):
    with pytest.raises(ShardError, match="verify=True needs an uncompressed tar stream"):
        run(shards, verify=True, shard_url="pipe:gzip -c {}")
    assert len(run(shards, shard_url="pipe:gzip -c {}")[0]) == N  # without verify tarfile undoes it


# ------------------------------------------------------------------ decompression bombs


def _bomb_shard(tmp_path, inflated):
    folder = tmp_path / "bomb"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tf:  # webdataset's TarWriter would gzip `.gz` members again
        for name, data in (("ok.txt.gz", gzip.compress(b"fine" * 1000)),
                           ("bomb.txt.gz", gzip.compress(bytes(inflated), compresslevel=9))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index_shards([folder / "a.tar"], output=folder / "index.arrow")
    return folder


@PATHS
def test_gzip_bomb_is_refused_naming_the_member(tmp_path, shard_url):
    from geko_data.stream import DEFAULT_MAX_DECODED_BYTES

    assert DEFAULT_MAX_DECODED_BYTES == 256 << 20
    folder = _bomb_shard(tmp_path, 8 << 20)  # 8 MiB of zeros in ~8 KB
    with pytest.raises(ShardError, match=r"a\.tar.*sample 'bomb'.*member bomb\.txt\.gz decodes to more than "
                                         r"1,048,576 bytes \(max_decoded_bytes=1048576\)"):
        run(folder, decode=[], shard_url=shard_url, max_decoded_bytes=1 << 20)
    got, stats = run(folder, decode=[], shard_url=shard_url, max_decoded_bytes=1 << 20,
                     handler=wds.ignore_and_continue)
    assert got == [0] and stats["skipped"] == 1
    s = GEKOStream(folder, total_epochs=1, config=QUIET, shuffle=False, decode=[], shard_url=shard_url)
    assert [len(x["txt.gz"]) for x in s] == [4000, 8 << 20]  # under the default cap both decode
    with pytest.raises(ValueError, match="`max_decoded_bytes` must be an int >= 1, got 0"):
        GEKOStream(folder, total_epochs=1, max_decoded_bytes=0)


def test_gunzip_never_inflates_past_the_cap():
    import tracemalloc

    from geko_data.decode import DecodedTooLarge, gunzip

    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    tracemalloc.start()
    with pytest.raises(DecodedTooLarge):
        gunzip(bomb, 1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak  # the whole 64 MiB was never held
    # what the gzip module reads: several members, zero padding between them
    data = gzip.compress(b"one") + b"\0" * 7 + gzip.compress(b"two")
    assert gunzip(data, 100) == gzip.decompress(data.replace(b"\0" * 7, b"")) == b"onetwo"
    with pytest.raises(EOFError):
        gunzip(gzip.compress(b"x" * 1000)[:-12], 10_000)


@pytest.mark.timeout(60)
def test_a_member_named_key_dot_dunder_key_cannot_replace_the_samples_key(tmp_path):
    # The local fast path took member 'evil.__key__' as the sample's __key__: the loop was handed 'victim-0001'
    # for the sample the index calls 'evil' (the slow path and pipe: refused the same bytes).
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, body in (("victim-0001.txt", b"victim"), ("evil.txt", b"attacker"), ("evil.__key__", b"victim-0001")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    index_shards([str(tmp_path / "s.tar")], output=tmp_path / "index.arrow")
    for kw in ({}, {"shard_url": "pipe:cat {}"}):
        errors = []
        stream = GEKOStream(str(tmp_path), total_epochs=1, shuffle=False, handler=lambda e: errors.append(e) or True,
                            config=GEKOConfig(log_bucket_stats=False), **kw)
        stream.set_epoch(0)
        assert [(s["__key__"], s["txt"]) for s in stream] == [("victim-0001", b"victim")], kw
        assert len(errors) == 1 and "two members with extension '__key__'" in str(errors[0]), kw


@pytest.mark.timeout(60)
def test_an_index_beside_other_shards_says_it_may_be_theirs(tmp_path):
    # "shard changed since indexing: 778240 bytes, index says 624640" did not say the index may be another's.
    import shutil

    from geko_data.shards import write_shards

    write_shards(({"__key__": f"k{i}", "txt": "a" * 10} for i in range(8)), str(tmp_path / "a" / "s-%02d.tar"))
    write_shards(({"__key__": f"k{i}", "txt": "b" * 900} for i in range(8)), str(tmp_path / "b" / "s-%02d.tar"))
    shutil.copy(tmp_path / "a" / "index.arrow", tmp_path / "b" / "index.arrow")
    with pytest.raises(ShardError, match=r"changed since indexing: .*index was made for other shards: index these"):
        stream = GEKOStream(str(tmp_path / "b"), total_epochs=1, config=GEKOConfig(log_bucket_stats=False))
        stream.set_epoch(0)
        list(stream)

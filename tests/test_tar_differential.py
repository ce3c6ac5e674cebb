"""The fast tar header parser, the indexer and the stream reader against tarfile and webdataset.

Generated tars (ustar, GNU and pax headers written by tarfile, and hand-built headers: lying size fields,
pax records with size / path / multi-line values / wrong length prefixes, GNU long-name chains, v7
headers with a prefix, links, directories, unknown types) either read exactly as webdataset reads them,
on every path (fast parser, tarfile fallback, stream), or are refused with a ShardError.
"""

import io
import os
import shutil
import subprocess
import tarfile

import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geko_data.shards import (ShardError, _checksum_ok, _fast_members, _regular_run, _tarfile_members, index_shards,
                              iter_tar_samples, parse_sample, parse_samples)
from geko_data.stream import GEKOStream
from geko_data.config import GEKOConfig

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAGIC = {"ustar": b"ustar\x0000", "gnu": b"ustar  \x00", "v7": b""}


# ---------------------------------------------------------------- building tars byte by byte
def header(name: bytes, size: int, kind: bytes, *, magic: str = "ustar", prefix: bytes = b"",
           size_field: bytes | None = None, linkname: bytes = b"", fields: dict[int, bytes] | None = None) -> bytes:
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[157:257] = linkname[:100].ljust(100, b"\0")
    h[257:265] = MAGIC[magic].ljust(8, b"\0")
    h[345:500] = prefix[:155].ljust(155, b"\0")
    for at, value in (fields or {}).items():  # other number fields, as written (the checksum stays right)
        h[at:at + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: bytes, value: bytes, delta: int = 0) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n + delta).encode() + body


def pax_block(records: list[tuple[bytes, bytes, int]]) -> bytes:
    data = b"".join(pax_record(k, v, d) for k, v, d in records)
    return header(b"././@PaxHeader", len(data), b"x") + padded(data)


def gnu_long(name: bytes) -> bytes:
    return header(b"././@LongLink", len(name) + 1, b"L", magic="gnu") + padded(name + b"\0")


KEYS = st.sampled_from(["a", "b", "k" * 120, "dir/c", "é", "x" * 95 + "/y"])
EXTS = st.sampled_from(["txt", "cls", "TXT", "json"])
RECORD = st.one_of(
    st.tuples(st.just(b"comment"), st.sampled_from([b"one\ntwo", b"a=b", b""]), st.just(0)),
    st.tuples(st.just(b"mtime"), st.sampled_from([b"1.5", b"x"]), st.just(0)),
    st.tuples(st.just(b"size"), st.sampled_from([b"0", b"7", b"600", b"1024", b"-1", b"x", b"100000000000000000000"]),
              st.sampled_from([0, 0, 0, 1, -1])),
    st.tuples(st.just(b"path"), st.sampled_from([b"p.txt", b"q.cls/", "é.txt".encode(), b"a.txt\nb"]),
              st.sampled_from([0, 0, 0, 1, -2, 10 ** 20])),
    st.tuples(st.sampled_from([b"hdrcharset", b"GNU.sparse.major"]), st.just(b"1"), st.just(0)),
)


@st.composite
def member(draw) -> bytes:
    key, ext = draw(KEYS), draw(EXTS)
    name = f"{key}.{ext}".encode()
    data = draw(st.sampled_from([b"", b"hello", b"x" * 600, b"\0" * 512, b"y" * 1100]))
    kind = draw(st.sampled_from([b"0", b"0", b"0", b"\0", b"7", b"5", b"2", b"1", b"Z"]))
    magic = draw(st.sampled_from(["ustar", "gnu", "v7"]))
    prefix = draw(st.sampled_from([b"", b"", b"pre", b"p" * 155]))
    size = len(data) if kind not in (b"5", b"2", b"1") else draw(st.sampled_from([0, 0, len(data)]))
    lie = draw(st.sampled_from([None, None, None, 0, size + 512, "base256", "junk"]))
    size_field = {None: None, "base256": b"\x80" + b"\0" * 7 + size.to_bytes(4, "big"), "junk": b"12x\0" + b"\0" * 8}
    field = size_field[lie] if isinstance(lie, (str, type(None))) else b"%011o\0" % lie
    ext_headers = draw(st.lists(st.one_of(st.lists(RECORD, min_size=1, max_size=3).map(pax_block),
                                          st.sampled_from([name, name + b"/", b"z" * 200 + b".txt"]).map(gnu_long)),
                                max_size=2))
    body = data if kind not in (b"5", b"2", b"1") or size else b""
    # mode / uid / gid / mtime / devmajor / devminor in other spellings: valid ones tarfile reads, and
    # invalid ones it takes for a bad header
    fields = draw(st.sampled_from([None, None, None, {100: b"644 \0"}, {108: b"  17\0\0\0\0"}, {136: b"1_0\0"},
                                   {329: b"0000007\0"}, {337: b"9\0"}, {329: b"9\0"}, {116: b"x\0"}, {329: b"+1\0"},
                                   {100: b"\x80" + bytes(7)}, {136: b"7" * 12}]))
    head = bytearray(header(name, size, kind, magic=magic, prefix=prefix, size_field=field, fields=fields))
    flip = draw(st.sampled_from([None, None, None, None, 150, 10, 110, 330, 140]))  # checksum, name, fields
    if flip is not None:
        head[flip] ^= draw(st.sampled_from([0x01, 0x40, 0xFF]))
    return b"".join(ext_headers) + bytes(head) + padded(body)


def tar_of(members: list[bytes], tail: bytes) -> bytes:
    return b"".join(members) + tail


TAILS = st.sampled_from([b"\0" * 1024, b"\0" * 10240, b"", b"\0" * 512 + b"junk" + b"\0" * 508])


# ---------------------------------------------------------------- the property
def webdataset_samples(path: str) -> list[dict]:
    out = []
    for s in wds.WebDataset(path, shardshuffle=False):
        out.append({k: v for k, v in s.items() if k not in ("__url__", "__local_path__")})
    return out


def check_run_parser(buf: bytes, idx, path: str) -> None:
    """parse_samples over the whole shard reads each sample as parse_sample reads it alone."""
    spans = list(zip(idx.offset.tolist(), idx.length.tolist()))
    keys = [str(k) for k in idx.keys]
    one_by_one = []
    for (off, n), key in zip(spans, keys):
        try:
            one_by_one.append(parse_sample(buf[off:off + n], shard=path, key=key, offset=off))
        except ShardError as e:
            one_by_one.append(str(e))
    for data in (buf, bytearray(buf) + bytearray(b"\xff" * 700)):  # (a reused buffer has stale bytes after)
        run = parse_samples(data, spans, shard=path, keys=keys, offsets=[off for off, _ in spans])
        assert [str(r) if isinstance(r, ShardError) else r for r in run] == one_by_one


def check_tar(tmp_path, buf: bytes) -> str:
    """Assert the readers agree on ``buf`` or refuse it; returns what happened (for coverage)."""
    # 1. the fast parser never disagrees with tarfile on the whole buffer
    fast = _fast_members(buf)
    if fast is not None:
        assert fast == _tarfile_members(buf)
    path = str(tmp_path / "t.tar")
    with open(path, "wb") as f:
        f.write(buf)
    try:
        idx = index_shards([path])
    except ShardError:
        return "index refused"
    # 2. the run parser (every header of a run checked at once) gives parse_sample's sample or error for each
    check_run_parser(buf, idx, path)
    # 3. each indexed byte range reads as webdataset reads the shard, or is refused
    try:
        expected = webdataset_samples(path)
    except Exception:  # noqa: BLE001 - webdataset fails as it fails; then so must we, below
        expected = None
    got = []
    try:
        for i in range(idx.num_samples):
            rng = buf[int(idx.offset[i]):int(idx.offset[i] + idx.length[i])]
            fast = _fast_members(rng)
            if fast is not None:
                assert fast == _tarfile_members(rng)
            got.append(parse_sample(rng, shard=path, key=str(idx.keys[i]), offset=int(idx.offset[i])))
    except ShardError:
        return "sample refused"
    assert expected is not None, "webdataset failed on a shard read without an error"
    assert got == expected
    # 4. the stream reader takes the same samples from the same byte ranges
    with open(path, "rb") as f:
        streamed = list(iter_tar_samples(f, shard=path))
    assert [s for s, _, _ in streamed] == expected
    assert [(a, b - a) for _, a, b in streamed] == list(zip(idx.offset.tolist(), idx.length.tolist()))
    return "read"


@SETTINGS
@given(members=st.lists(member(), min_size=1, max_size=4), tail=TAILS)
def test_hand_built_tars_read_as_webdataset_reads_them_or_are_refused(tmp_path, members, tail):
    check_tar(tmp_path, tar_of(members, tail))


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@st.composite
def tarfile_written(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt]) as tf:
        for _ in range(draw(st.integers(1, 5))):
            name = f"{draw(KEYS)}.{draw(EXTS)}"
            ti = tarfile.TarInfo(name)
            kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink"]))
            data = b""
            if kind == "file":
                data = draw(st.binary(max_size=700))
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            else:
                ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                ti.linkname = "l" * draw(st.sampled_from([5, 150]))
            ti.size = len(data)
            if fmt == "pax":
                ti.pax_headers = draw(st.sampled_from([{}, {"comment": "multi\nline\nvalue"}, {"mtime": "1.25"},
                                                       {"SCHILY.xattr.user.x": "é"}]))
            try:
                tf.addfile(ti, io.BytesIO(data))
            except ValueError:  # a name ustar cannot hold
                pass
    return buf.getvalue()


@SETTINGS
@given(buf=tarfile_written())
def test_tarfile_written_tars_read_as_webdataset_reads_them(tmp_path, buf):
    assert check_tar(tmp_path, buf) in ("read", "index refused", "sample refused")


# ---------------------------------------------------------------- the red-team cases, by name
def test_pax_size_cannot_smuggle_a_hidden_member(tmp_path):
    # ustar header says 0 bytes, pax says 1024: tar, tarfile and webdataset read 1024 bytes of txt,
    # which here happen to contain a complete header for `cls`.
    hidden = header(b"k.cls", 5, b"0") + padded(b"EVIL!")
    buf = pax_block([(b"size", b"1024", 0)]) + header(b"k.txt", 0, b"0") + hidden + b"\0" * 1024
    assert check_tar(tmp_path, buf) == "read"
    assert webdataset_samples(str(tmp_path / "t.tar")) == [{"__key__": "k", "txt": hidden}]
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a.tar").write_bytes(buf)
    index_shards([folder / "a.tar"], output=folder / "index.arrow")
    assert _stream_samples(folder) == [{"__key__": "k", "txt": hidden}]


def test_pax_records_are_split_by_length_not_by_newline(tmp_path):
    # The comment's value holds a line that looks like a path record; only the length prefix says where
    # records end.
    buf = pax_block([(b"comment", b"x\n9 path=evil.txt", 0)]) + header(b"k.txt", 2, b"0") + padded(b"ok")
    assert check_tar(tmp_path, buf + b"\0" * 1024) == "read"
    assert webdataset_samples(str(tmp_path / "t.tar")) == [{"__key__": "k", "txt": b"ok"}]


def _stream_samples(folder, shard_url=None):
    s = GEKOStream(folder, total_epochs=1, shuffle=False, shard_url=shard_url,
                   config=GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0))
    return [{k: v for k, v in x.items() if not k.startswith("__") or k == "__key__"} for x in s]


def _hand_made(kind: str) -> bytes:
    if kind == "gnu-long-name-chain":  # tarfile (and so webdataset) takes the first long name
        return (gnu_long(b"a" * 120 + b".txt") + gnu_long(b"b" * 130 + b".txt") + header(b"x.txt", 2, b"0")
                + padded(b"hi") + header(b"c.txt", 1, b"0") + padded(b"c"))
    if kind == "v7-prefix":  # no magic, yet tarfile joins the prefix field
        return (header(b"k.txt", 3, b"0", magic="v7", prefix=b"pre") + padded(b"abc")
                + header(b"k.cls", 1, b"0", magic="v7", prefix=b"pre") + padded(b"1"))
    if kind == "dir-with-size":  # tarfile reads no data after a directory header, whatever its size
        return (header(b"k.txt", 2, b"0") + padded(b"ok") + header(b"d/", 0, b"5", size_field=b"%011o\0" % 1024)
                + header(b"k.cls", 1, b"0") + padded(b"1") + b"\0" * 1024)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gnu-long-name-chain", "v7-prefix", "dir-with-size"])
@pytest.mark.parametrize("shard_url", [None, "pipe:cat {}"], ids=["local", "pipe"])
def test_unusual_tars_webdataset_reads_are_read_the_same(tmp_path, kind, shard_url):
    folder = tmp_path / "s"
    folder.mkdir()
    path = folder / "a.tar"
    path.write_bytes(_hand_made(kind) + b"\0" * 1024)
    index_shards([path], output=folder / "index.arrow")
    expected = webdataset_samples(str(path))
    assert expected and _stream_samples(folder, shard_url) == expected


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_sparse_members_from_gnu_tar_are_refused(tmp_path, fmt):
    # webdataset reads a sparse member with its holes filled in (a 10 KiB tar held 1 GiB); no WebDataset
    # writer makes one, so geko_data refuses it, here when indexing and on every read path
    # (tests/test_sparse_tar.py), naming the member and its byte offset.
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "k.bin", "wb") as f:  # a hole, data, a hole: stored sparse
        f.seek(300_000)
        f.write(b"data" * 100)
        f.truncate(700_000)
    (src / "k.txt").write_bytes(b"label")
    (src / "m.txt").write_bytes(b"next")
    folder = tmp_path / "s"
    folder.mkdir()
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(folder / "a.tar"), "-C", str(src),
                    "k.txt", "k.bin", "m.txt"], check=True)
    with tarfile.open(folder / "a.tar") as tf:
        member = tf.getmember("k.bin")
        assert member.issparse()
    with pytest.raises(ShardError, match=rf"a\.tar': member 'k\.bin' at byte {member.offset} is a GNU sparse "
                                         rf"file \(700,000 bytes"):
        index_shards([folder / "a.tar"], output=folder / "index.arrow")


@SETTINGS
@given(head=st.one_of(st.binary(min_size=512, max_size=512), st.sampled_from([b"\xff" * 512, bytes(512)])),
       delta=st.sampled_from([0, 0, 1, -1, 2, 65521, -65521, 131042, -131042, 10 ** 9]))
def test_header_checksum_shortcut_is_the_byte_sum(head, delta):
    true = sum(head[:148]) + 256 + sum(head[156:])
    assert _checksum_ok(head, true + delta) == (delta == 0)


@pytest.mark.parametrize("at", [100, 108, 116, 136, 329, 337])
@pytest.mark.parametrize("value,valid", [(b"9\0", False), (b"0 7\0", False), (b"+7\0", True), (b" 17 \0", True),
                                         (b"\xff" + bytes(7), True)])
def test_every_number_field_is_checked_as_tarfile_checks_it(at, value, valid):
    buf = header(b"k.txt", 2, b"0", fields={at: value}) + padded(b"ok") + b"\0" * 1024
    if valid:
        assert _fast_members(buf) == _tarfile_members(buf) == ([("k.txt", b"ok")], 1024)
    else:
        assert _fast_members(buf) is None
        with pytest.raises(tarfile.ReadError):
            _tarfile_members(buf)


def _with_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def shardwriter_shards(samples: list[dict], pattern: str, maxcount: int):
    """``samples`` written by webdataset's own ShardWriter (member times from the clock, so every member has
    a pax record of its fractional time: the layout most WebDataset tars have) and indexed. ``write_shards``
    writes one fixed time and no pax records."""
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    names = sorted(os.path.join(os.path.dirname(pattern), f) for f in os.listdir(os.path.dirname(pattern))
                   if f.endswith(".tar"))
    return index_shards(names, output=os.path.join(os.path.dirname(pattern), "index.arrow"))


@pytest.mark.timeout(300)
def test_runs_of_shardwriter_samples_read_as_one_by_one_under_every_header_byte_change(tmp_path):
    """A run of regular samples is checked against one sample's layout in numpy passes; every byte of one
    sample's headers and pax records changed (its checksum made right again, so only the other checks can
    catch it) reads exactly as parse_sample reads that sample alone: the same members or the same error."""
    import random

    path = str(tmp_path / "shard-%03d.tar")
    # Times with different decimals make pax records of different lengths; one sample has another size.
    samples = [{"__key__": f"s{i:04d}", "txt": b"x" * (300 if i != 5 else 700), "cls": str(i).encode()}
               for i in range(12)]
    idx = shardwriter_shards(samples, path, maxcount=100)
    shard = idx.shards[0]
    buf = bytearray(open(shard, "rb").read())
    check_run_parser(bytes(buf), idx, shard)  # unchanged
    spans = list(zip(idx.offset.tolist(), idx.length.tolist()))
    fast = _regular_run(bytes(buf), spans, [str(k) for k in idx.keys])
    assert [s is not None for s in fast] == [True] * 12  # every sample read by a layout (two sizes: two)
    victim = 7
    lo, n = int(idx.offset[victim]), int(idx.length[victim])
    keys = [str(k) for k in idx.keys]
    expected = parse_samples(bytes(buf), spans, shard=shard, keys=keys, offsets=[off for off, _ in spans])
    rng = random.Random(0)
    interesting = b"\x00 ./09\n7x8"
    changed = 0
    for block in range(lo, lo + n, 512):
        if buf[block + 156:block + 157] not in (b"x", b"0") and buf[block - 512 + 156:block - 512 + 157] != b"x":
            continue  # a member's data: read as it is on every path
        pax_data = buf[block - 512 + 156:block - 512 + 157] == b"x"
        # Every field of a header (ustar's last bytes are padding) and a pax record's first 100 bytes.
        for at in [*range(100), *range(100, 512 if not pax_data else 100)][:360 if not pax_data else 100]:
            value = rng.randrange(256) if at % 2 else interesting[at // 2 % len(interesting)]
            if buf[block + at] == value:
                continue
            data = bytearray(buf)
            data[block + at] = value
            head = data[block:block + 512]
            if head[156:157] in (b"x", b"0") and head[257:262] == b"ustar":  # a header: checksum made right
                data[block:block + 512] = _with_checksum(head)
            try:
                alone = parse_sample(bytes(data[lo:lo + n]), shard=shard, key=keys[victim], offset=lo)
            except ShardError as e:
                alone = str(e)
            run = parse_samples(data, spans, shard=shard, keys=keys, offsets=[off for off, _ in spans])
            got = [str(r) if isinstance(r, ShardError) else r for r in run]
            assert got == expected[:victim] + [alone] + expected[victim + 1:], (block - lo + at, value)
            changed += 1
    assert changed > 1200


def test_checking_a_run_allocates_no_array_of_all_its_headers(tmp_path):
    """A run's header blocks are checked ``_FIT_STEP`` samples at a time in arrays each thread keeps: no
    fresh (samples, blocks, 512) array per run (at 20 KB samples those were fresh pages on every run, whose
    page faults cost more than the checks). The run reads the same."""
    import tracemalloc

    samples = [{"__key__": f"k{i:05d}", "bin": b"x" * 10, "cls": b"1"} for i in range(256)]
    idx = shardwriter_shards(samples, str(tmp_path / "s-%03d.tar"), maxcount=1000)
    data = open(idx.shards[0], "rb").read()
    spans = list(zip(idx.offset.tolist(), idx.length.tolist()))
    keys = [str(k) for k in idx.keys]
    first = _regular_run(data, spans, keys)  # the layout made, the arrays allocated
    tracemalloc.start()
    try:
        again = _regular_run(data, spans, keys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(s is not None for s in again) and again == first
    assert again == parse_samples(data, spans, shard=idx.shards[0], keys=keys, offsets=idx.offset.tolist())
    header_blocks = 256 * 6 * 512  # a pax header, its record and a header for each of 2 members
    assert peak < header_blocks // 2, peak

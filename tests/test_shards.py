import json
import os
import re
import tarfile
import io

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds

from geko_data.shards import (ShardError, fingerprint, index_shards, iter_tar_samples, parse_sample, read_index,
                              write_shards)
from conftest import SHARD_SIZES, write_tar_with_links


def test_write_shards_and_index(tmp_path):
    samples = ({"__key__": f"k{i:03d}", "txt": f"t{i}", "cls": str(i % 3)} for i in range(40))
    idx = write_shards(samples, str(tmp_path / "out" / "shard-%03d.tar"), maxcount=13)
    assert len(idx.shards) == 4 and idx.num_samples == 40
    assert (tmp_path / "out" / "index.arrow").exists()
    table = pa.ipc.open_file(str(tmp_path / "out" / "index.arrow")).read_all()
    assert table.column_names == ["id", "key", "shard", "offset", "length", "hash"]
    assert table.column("id").to_pylist() == list(range(40))
    again = read_index(tmp_path / "out")
    assert again.fingerprint == idx.fingerprint and list(again.keys) == [f"k{i:03d}" for i in range(40)]
    # every indexed byte range holds exactly its sample
    for i in (0, 12, 13, 39):
        with open(again.shards[again.shard[i]], "rb") as f:
            f.seek(again.offset[i])
            s = parse_sample(f.read(again.length[i]), shard="x", key=again.keys[i])
        assert s == {"__key__": f"k{i:03d}", "txt": f"t{i}".encode(), "cls": str(i % 3).encode()}


def test_write_shards_writes_the_same_bytes_for_the_same_samples(tmp_path):
    """Member times are a constant, not the clock: written again, the shards and the index fingerprint are
    the same, so a state saved against them still matches (they differed with every write)."""
    def samples():
        return ({"__key__": f"k{i:03d}", "txt": f"t{i}"} for i in range(30))

    a = write_shards(samples(), str(tmp_path / "a" / "shard-%03d.tar"), maxcount=10)
    b = write_shards(samples(), str(tmp_path / "b" / "shard-%03d.tar"), maxcount=10)
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.shards, b.shards):
        with open(x, "rb") as f, open(y, "rb") as g:
            assert f.read() == g.read()


def test_write_shards_refuses_a_key_that_repeats_the_previous_one(tmp_path):
    """Adjacent members with one key are one sample to a reader: two samples keyed "a" in a row were
    written as a single sample with every member twice, found only when a worker read it."""
    samples = [{"__key__": "a", "cls": b"0"}, {"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"2"}]
    with pytest.raises(ValueError, match=r"sample 1: `__key__` 'a' repeats the previous sample's"):
        write_shards(samples, str(tmp_path / "shard-%03d.tar"))


def test_write_shards_names_the_sample_whose_value_cannot_be_written(tmp_path):
    for value, ext in ((7, "txt"), (1, "n")):
        samples = [{"__key__": "a", "cls": b"0"}, {"__key__": "b", ext: value}]
        with pytest.raises(ValueError, match=r"sample 1 \('b'\) cannot be written: .*bytes or str"):
            write_shards(samples, str(tmp_path / ext / "shard-%03d.tar"))


def test_write_shards_refuses_no_samples_naming_its_own_argument_and_writes_nothing(tmp_path):
    # It said "`paths` must name at least one shard" (index_shards' argument) and left an empty tar.
    with pytest.raises(ValueError, match=r"`samples` is empty"):
        write_shards(iter([]), str(tmp_path / "out" / "shard-%03d.tar"))
    assert not (tmp_path / "out").exists()


def test_index_names_the_links_it_skips(tmp_path):
    # Samples made only of links vanished from the index without a word ("indexed 1 samples").
    path = tmp_path / "links.tar"
    write_tar_with_links(path)
    with pytest.warns(UserWarning, match=r"skipped 2 tar member\(s\) that are links or special files.*'h1.cls' "
                                         r"\(hard link\).*'h2.txt' \(symlink\).*not in the index") as record:
        index = index_shards([str(path)])
    assert len(record) == 1 and "sub" not in str(record[0].message)
    assert list(index.keys) == ["h0"]


def test_index_of_tarwriter_shards(shards):
    idx = read_index(shards)
    assert idx.num_samples == sum(SHARD_SIZES)
    assert np.bincount(idx.shard).tolist() == list(SHARD_SIZES)
    assert idx.keys[5] == "s1_000"


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_index_of_plain_tar_with_dirs_and_several_files_per_key(tmp_path):
    path = tmp_path / "third.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i in range(3):
            _add(tf, f"dir/sub/item{i}.json", json.dumps({"i": i}).encode())
            _add(tf, f"dir/sub/item{i}.txt", b"x" * (100 + 600 * i))
            _add(tf, f"dir/sub/item{i}.cls", str(i).encode())
        _add(tf, "dir/" + "long" * 40 + ".txt", b"long name")  # GNU long-name header
    idx = index_shards([path], output=tmp_path / "index.arrow")
    assert list(idx.keys) == [f"dir/sub/item{i}" for i in range(3)] + ["dir/" + "long" * 40]
    with open(path, "rb") as f:
        f.seek(idx.offset[2])
        s = parse_sample(f.read(idx.length[2]), shard=str(path), key=idx.keys[2])
    assert s["json"] == b'{"i": 2}' and s["txt"] == b"x" * 1300 and s["cls"] == b"2"
    with open(path, "rb") as f:
        f.seek(idx.offset[3])
        assert parse_sample(f.read(idx.length[3]), shard=str(path), key=idx.keys[3])["txt"] == b"long name"


def test_duplicate_keys_are_an_error(tmp_path):
    for n in range(2):
        with wds.TarWriter(str(tmp_path / f"d{n}.tar")) as w:
            w.write({"__key__": "same", "txt": "a"})
    with pytest.raises(ShardError, match="duplicate key 'same'"):
        index_shards([tmp_path / "d0.tar", tmp_path / "d1.tar"])


def test_bad_inputs(tmp_path, shards):
    with pytest.raises(ShardError, match="missing"):
        index_shards([tmp_path / "nope.tar"])
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardError, match="junk.tar"):
        index_shards([tmp_path / "junk.tar"])
    with pytest.raises(ValueError, match="__key__"):
        write_shards([{"txt": "no key"}], str(tmp_path / "w-%03d.tar"))
    with pytest.raises(FileNotFoundError, match="index"):
        read_index(tmp_path / "empty")
    idx = read_index(shards)
    idx.verify()
    original = open(idx.shards[1], "rb").read()
    with open(idx.shards[1], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="changed since indexing"):
        idx.verify()
    open(idx.shards[1], "wb").write(original)
    os.remove(idx.shards[2])
    with pytest.raises(ShardError, match="missing"):
        read_index(shards).verify()


@pytest.mark.timeout(60)
def test_fingerprint_depends_on_names_sizes_count_and_content():
    h = np.arange(5 * 16, dtype=np.uint8).reshape(5, 16)  # one 16-byte BLAKE2b digest a sample
    base = fingerprint(["a.tar", "b.tar"], [10, 20], 5, hashes=h)
    assert base == fingerprint(["/x/a.tar", "/y/b.tar"], [10, 20], 5, hashes=h)  # folders may move
    assert base != fingerprint(["a.tar", "b.tar"], [10, 21], 5, hashes=h)
    assert base != fingerprint(["a.tar", "c.tar"], [10, 20], 5, hashes=h)
    assert base != fingerprint(["a.tar", "b.tar"], [10, 20], 6, hashes=h)
    assert base != fingerprint(["a.tar", "b.tar"], [10, 20], 5, hashes=h[::-1].copy())
    flipped = h.copy()
    flipped[2, 15] ^= 1  # one bit of one digest
    assert base != fingerprint(["a.tar", "b.tar"], [10, 20], 5, hashes=flipped)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_parser_agrees_with_tarfile(tmp_path, fmt):
    from geko_data.shards import _fast_members, _tarfile_members

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        _add(tf, "a/" * 60 + "k.txt" if fmt != tarfile.USTAR_FORMAT else "d" * 90 + "/k.txt", b"x" * 700)
        _add(tf, "k.json", "{\"é\": 1}".encode())
        _add(tf, "empty.cls", b"")
    data = buf.getvalue()
    assert _fast_members(data) == _tarfile_members(data)
    cut = data.index(b"x" * 100) + 100  # inside the first member's data: truncated
    assert _fast_members(data[:cut]) is None
    corrupt = bytearray(data)
    corrupt[150] ^= 0xFF  # checksum field: the fast path declines, tarfile gets to say what is wrong
    assert _fast_members(bytes(corrupt)) is None
    end = _fast_members(data)[1]  # where the members stop: the end-of-archive blocks follow
    assert end == _tarfile_members(data)[1] and data[end:] == bytes(len(data) - end)


def _three_key_tar(path, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for i in range(3):
            _add(tf, f"k{i}.txt", b"t" * (100 + i))
            _add(tf, f"k{i}.cls", str(i).encode())
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf}


@pytest.mark.parametrize("damage", ["bad-checksum", "zeroed"])
def test_index_rejects_a_bad_header_mid_archive(tmp_path, damage):
    """tarfile takes a bad header past byte 0 for the end of the archive; the index must not."""
    path = tmp_path / "c.tar"
    off = _three_key_tar(path)["k1.txt"]
    data = bytearray(path.read_bytes())
    if damage == "zeroed":
        data[off:off + 512] = bytes(512)
    else:
        data[off + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"c\.tar.*byte {off}"):
        index_shards([path])


def test_index_accepts_zero_padding_but_not_concatenated_tars(tmp_path):
    path = tmp_path / "p.tar"
    _three_key_tar(path)
    with open(path, "ab") as f:
        f.write(bytes(20 * 512))  # blocking-factor padding, as `tar -b` writes
    assert list(index_shards([path]).keys) == ["k0", "k1", "k2"]
    second = tmp_path / "q.tar"
    _three_key_tar(second)
    with open(path, "ab") as f:
        f.write(second.read_bytes())  # `cat a.tar b.tar`: tarfile would stop at the first end marker
    with pytest.raises(ShardError, match=r"p\.tar.*concatenated"):
        index_shards([path])


def test_parse_sample_holds_the_members_to_the_indexed_bytes(tmp_path):
    path = tmp_path / "z.tar"
    offsets = _three_key_tar(path)
    idx = index_shards([path])
    data = bytearray(path.read_bytes())
    lo, n = int(idx.offset[1]), int(idx.length[1])
    assert parse_sample(bytes(data[lo:lo + n]), shard="z", key="k1", offset=lo) == {
        "__key__": "k1", "txt": b"t" * 101, "cls": b"1"}
    cls = offsets["k1.cls"]
    data[cls:cls + 512] = bytes(512)  # the sample's second header zeroed: its .cls would vanish
    with pytest.raises(ShardError, match=rf"shard 'z'.*sample 'k1'.*byte {cls}"):
        parse_sample(bytes(data[lo:lo + n]), shard="z", key="k1", offset=lo)
    data[cls + 1] = 1  # now an invalid header: the fast path declines and tarfile would stop quietly
    with pytest.raises(ShardError, match=rf"sample 'k1'.*byte {cls}"):
        parse_sample(bytes(data[lo:lo + n]), shard="z", key="k1", offset=lo)
    with pytest.raises(ShardError, match="sample 'k1'"):
        parse_sample(bytes(data[lo:lo + n - 512]), shard="z", key="k1", offset=lo)  # cut short


def _members_only(*members):
    """Tar bytes of ``members`` without the end-of-archive blocks: one sample's indexed range."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            _add(tf, name, data)
        end = tf.offset
    return buf.getvalue()[:end]


def test_extensions_lowercased_and_duplicates_rejected(tmp_path):
    data = _members_only(("k.JPG", b"j"), ("k.Seg.Png", b"p"))
    assert parse_sample(data, shard="s", key="k") == {"__key__": "k", "jpg": b"j", "seg.png": b"p"}
    data = _members_only(("k.txt", b"a"), ("k.TXT", b"b"))
    with pytest.raises(ShardError, match=r"shard 's'.*sample 'k'.*extension 'txt'"):
        parse_sample(data, shard="s", key="k")
    with pytest.raises(ShardError, match=r"shard 's'.*sample 'k'.*extension 'txt'"):
        list(iter_tar_samples(io.BytesIO(data), shard="s"))


def test_stream_reader_agrees_with_the_index(shards):
    idx = read_index(shards)
    for s, path in enumerate(idx.shards):
        ids = np.flatnonzero(idx.shard == s)
        with open(path, "rb") as f:
            got = list(iter_tar_samples(f, shard=path))
        assert [x["__key__"] for x, _, _ in got] == list(idx.keys[ids])
        for (sample, start, end), i in zip(got, ids):
            assert (start, end - start) == (idx.offset[i], idx.length[i])
            with open(path, "rb") as f:
                f.seek(start)
                assert parse_sample(f.read(end - start), shard=path, key=idx.keys[i]) == sample


def test_index_progress_counts_bytes(shards, capsys):
    idx = read_index(shards)
    index_shards(idx.shards, progress=True)
    err = capsys.readouterr().err
    assert "indexing 4 shard(s)" in err and re.search(r"100%\|.*\| [\d.]+k/[\d.]+k .*B/s", err), err


def test_hand_made_index_with_bad_metadata_is_a_named_shard_error(shards, tmp_path):
    table = pa.ipc.open_file(str(shards / "index.arrow")).read_all()
    key = next(k for k in table.schema.metadata if b"geko" in k)
    meta = json.loads(table.schema.metadata[key])
    cases = {"list.arrow": [1, 2], "no_shards.arrow": {k: v for k, v in meta.items() if k != "shards"},
             "uneven.arrow": {**meta, "sizes": meta["sizes"][:1]}, "sizes_text.arrow": {**meta, "sizes": "x"},
             # these two ended in a bare OverflowError and RecursionError
             "sizes_huge.arrow": {**meta, "sizes": [10 ** 30] * len(meta["sizes"])},
             "deep.arrow": "[" * 100_000 + "]" * 100_000}
    for name, bad in cases.items():
        path = tmp_path / name
        raw = bad.encode() if isinstance(bad, str) else json.dumps(bad).encode()
        t = table.replace_schema_metadata({key: raw})
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)
        with pytest.raises(ShardError, match=name):
            read_index(path)


# ---------------------------------------------------------------- an index is data: names, ranges, hashes
META = b"geko_data_index"


def _edit_index(src, dst, *, names=None, refingerprint=False, columns=None, drop=(), meta=None):
    """Write ``dst``: the index ``src`` with edits, as a hand-edited or hostile file would be."""
    table = pa.ipc.open_file(str(src)).read_all()
    m = json.loads(table.schema.metadata[META])
    if names is not None:
        m["shards"] = names
    for name, values in (columns or {}).items():
        table = table.set_column(table.column_names.index(name), name,
                                 pa.array(values, type=table.schema.field(name).type))
    if drop:
        table = table.drop_columns(list(drop))
    m.update(meta or {})
    if refingerprint:
        m["fingerprint"] = fingerprint(m["shards"], m["sizes"], table.num_rows, hashes=table.column("hash"))
    table = table.replace_schema_metadata({META: json.dumps(m).encode()})
    with pa.OSFile(str(dst), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return dst


def _hostile_names(tmp_path, shards):
    marker = tmp_path / "pwned"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shard-000.tar").write_bytes((shards / "shard-000.tar").read_bytes())
    os.symlink(outside / "shard-000.tar", shards / "link.tar")
    return marker, {
        "pipe": f"pipe:touch {marker}; cat shard-000.tar",
        "absolute": str(outside / "shard-000.tar"),
        "system-file": "/etc/passwd",
        "dotdot": "../outside/shard-000.tar",
        "dotdot-inside": "sub/../../outside/shard-000.tar",
        "url": "http://127.0.0.1:9/shard-000.tar",
        "file-url": "file:///etc/passwd",
        "nul": "shard-000.tar\0.x",
        "symlink-out": "link.tar",
    }


def test_shard_names_in_an_index_must_stay_in_its_folder(tmp_path, shards):
    from geko_data.stream import GEKOStream

    marker, cases = _hostile_names(tmp_path, shards)
    names = json.loads(pa.ipc.open_file(str(shards / "index.arrow")).schema.metadata[META])["shards"]
    for case, bad in cases.items():
        path = _edit_index(shards / "index.arrow", shards / f"{case}.arrow", names=[bad, *names[1:]],
                           refingerprint=True)
        pattern = re.escape(str(path)) + ".*" + re.escape(repr(bad))
        with pytest.raises(ShardError, match=pattern) as err:
            read_index(path)
        assert str(err.value).count("only from GEKOStream") == 1  # the advice once, not twice
        with pytest.raises(ShardError, match=pattern):
            for _ in GEKOStream(path, total_epochs=1):
                pass
    assert not marker.exists()
    # a symlink that stays inside the folder, and a subfolder, are fine
    os.makedirs(shards / "sub")
    os.symlink(shards / "shard-000.tar", shards / "sub" / "alias.tar")
    ok = _edit_index(shards / "index.arrow", shards / "ok.arrow", names=["sub/alias.tar", *names[1:]],
                     refingerprint=True)
    assert read_index(ok).shards[0] == str(shards / "sub" / "alias.tar")


def test_index_shards_writes_only_names_inside_the_index_folder(tmp_path, shards):
    tars = sorted(shards.glob("*.tar"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ShardError, match=r"elsewhere.*'\.\.' component"):
        index_shards(tars, output=tmp_path / "elsewhere" / "index.arrow")
    assert not (tmp_path / "elsewhere" / "index.arrow").exists()
    idx = index_shards(tars, output=tmp_path / "index.arrow")  # a parent folder of the shards is fine
    meta = json.loads(pa.ipc.open_file(str(tmp_path / "index.arrow")).schema.metadata[META])
    assert meta["shards"] == [f"shards/{t.name}" for t in tars]
    assert read_index(tmp_path / "index.arrow").fingerprint == idx.fingerprint


def test_index_rows_are_checked(shards):
    table = pa.ipc.open_file(str(shards / "index.arrow")).read_all()
    length, offset, keys = (table.column(c).to_pylist() for c in ("length", "offset", "key"))
    size = os.path.getsize(shards / "shard-000.tar")
    cases = {
        "negative-length": ({"length": [-512] + length[1:]}, "length=-512"),
        "past-the-end": ({"offset": [size] + offset[1:]}, "outside shard"),
        "unaligned": ({"offset": [offset[0] + 7] + offset[1:]}, "512-aligned"),
        "overlap": ({"length": [length[0] + 512] + length[1:]}, "overlap"),
        "duplicate-key": ({"key": [keys[1]] + keys[1:]}, "duplicate key 's0_001'"),
    }
    for case, (columns, why) in cases.items():
        path = _edit_index(shards / "index.arrow", shards / f"{case}.arrow", columns=columns)
        with pytest.raises(ShardError, match=re.escape(str(path)) + ".*" + re.escape(why)):
            read_index(path)
    # a duplicated row (same key, same range)
    dup = pa.concat_tables([table.slice(0, 1), table])
    path = shards / "duplicate-row.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, dup.schema) as w:
        w.write_table(dup)
    with pytest.raises(ShardError, match=re.escape(str(path)) + ".*overlap"):
        read_index(path)


@pytest.mark.timeout(60)
def test_index_without_content_hashes_is_refused_with_the_fix(shards):
    old = _edit_index(shards / "index.arrow", shards / "old.arrow", drop=["hash"], meta={"format_version": 1})
    with pytest.raises(ShardError, match=re.escape(str(old)) + ".*no per-sample content hashes.*geko-data index"):
        read_index(old)
    edited = _edit_index(shards / "index.arrow", shards / "edited.arrow",
                         columns={"hash": [bytes(16)] * sum(SHARD_SIZES)})
    with pytest.raises(ShardError, match=re.escape(str(edited)) + ".*fingerprint.*does not match"):
        read_index(edited)


@pytest.mark.timeout(60)
def test_index_hashes_each_sample_byte_range(shards):
    import hashlib

    idx = read_index(shards)
    for i in (0, 5, 42):
        with open(idx.shards[idx.shard[i]], "rb") as f:
            f.seek(idx.offset[i])
            assert hashlib.blake2b(f.read(idx.length[i]), digest_size=16).digest() == idx.hashes[i].tobytes()


# ---------------------------------------------------------------- hostile tar headers: ShardError, never raw
def _pax_then(records: bytes, then: bytes) -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, len(records)
    return ti.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512) + then


def _one_member(name: str, data: bytes) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("case", ["pax-record-length-1e20", "pax-size-1e20", "non-utf8-name"])
def test_hostile_tar_headers_are_shard_errors(tmp_path, case):
    member = _one_member("k.txt", b"abc")
    buf = {"pax-record-length-1e20": _pax_then(b"100000000000000000000 path=k.txt\n", member),
           "pax-size-1e20": _pax_then(b"30 size=100000000000000000000\n", member),
           "non-utf8-name": member + _one_member("\udcffk.txt", b"abc")}[case] + b"\0" * 1024
    path = tmp_path / "a.tar"
    path.write_bytes(buf)
    with pytest.raises(ShardError, match=re.escape(repr(str(path))) + r".* byte \d+"):
        index_shards([path])
    if case != "non-utf8-name":
        with pytest.raises(ShardError, match=r"'a\.tar'.*sample 'k' at byte 7"):
            parse_sample(buf[:-1024], shard="a.tar", key="k", offset=7)
        with pytest.raises(ShardError, match=r"'a\.tar'.* byte \d+"):
            list(iter_tar_samples(io.BytesIO(buf), shard="a.tar"))


@pytest.mark.timeout(60)
def test_write_progress_knows_the_total_of_a_list(tmp_path, capsys):
    # The list went through a chain of iterators first, and the bar showed a count without a total.
    samples = [{"__key__": f"s{i:03d}", "txt": f"sample {i}"} for i in range(30)]
    write_shards(samples, str(tmp_path / "d-%03d.tar"), maxcount=10, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"writing shards: 100%\|.*\| 30/30", err), err
    write_shards(iter(samples), str(tmp_path / "e-%03d.tar"), maxcount=10, progress=True)
    assert "30/" not in capsys.readouterr().err  # a generator has no total to show


@pytest.mark.timeout(60)
def test_an_index_never_writes_through_a_link_planted_in_the_shards_folder(shards, tmp_path):
    # `geko-data index data/*.tar -o data/index.arrow` with data/index.arrow a link to ~/.ssh/authorized_keys
    # replaced that file with the index (whose keys the shards' author chooses).
    victim = tmp_path / "home" / "authorized_keys"
    victim.parent.mkdir()
    victim.write_bytes(b"ssh-ed25519 AAAA mine")
    out = shards / "index.arrow"
    out.unlink()
    out.symlink_to(victim)
    with pytest.warns(UserWarning, match=r"`output` .* was a symbolic link .*replaces the link"):
        index_shards(sorted(str(p) for p in shards.glob("*.tar")), output=out)
    assert victim.read_bytes() == b"ssh-ed25519 AAAA mine"
    assert not out.is_symlink() and read_index(shards).num_samples == sum(SHARD_SIZES)


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_an_index_or_a_shard_is_refused_not_waited_on(shards, tmp_path):
    # Mapping a FIFO index, or opening a FIFO shard, waited for a writer forever.
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "index.arrow")
    with pytest.raises(ShardError, match=r"index\.arrow' is not a regular file"):
        read_index(fifo)
    from geko_data.stream import GEKOStream

    stream = GEKOStream(str(shards), total_epochs=1, shuffle=False)
    first = read_index(shards).shards[0]
    os.unlink(first)
    os.mkfifo(first)
    stream.set_epoch(0)
    with pytest.raises(ShardError, match=r"is not a regular file \(reading sample"):
        list(stream)


"""Hostile members through decoder specs: no image plugin that runs a program, and no decoded member past
``max_decoded_bytes`` (images and arrays checked from their headers, before they are decoded).

Every case is a real tar shard read through GEKOStream.
"""

import gzip
import io
import os
import pickle
import struct
import tarfile
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import webdataset as wds

from geko_data import decode as geko_decode
from geko_data.config import GEKOConfig
from geko_data.shards import ShardError, index_shards
from geko_data.stream import GEKOStream

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None, bucket_weights=(3, 2, 1))
MiB = 1 << 20

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"(ATTACKER POSTSCRIPT) print\nshowpage\n")


def shard(tmp_path, members, name="data"):
    """A folder holding one indexed tar of ``members`` (tar name -> bytes), written as given (webdataset's
    TarWriter would gzip a ``.gz`` member again)."""
    folder = tmp_path / name
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tf:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index_shards([folder / "a.tar"], output=folder / "index.arrow")
    return folder


def read(folder, **kw):
    s = GEKOStream(folder, total_epochs=1, config=QUIET, shuffle=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are counted in stats; the warning about them is noise here
        return list(s), s.stats


def image_bytes(fmt, size=(6, 4), mode="RGB"):
    from PIL import Image

    pixels = (np.arange(size[0] * size[1] * len(mode), dtype=np.uint8) * 37).reshape(size[1], size[0], -1)
    img = Image.fromarray(pixels.squeeze(-1) if len(mode) == 1 else pixels).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def iptc_embedding(data):
    """An IPTC/NAA image whose picture is ``data``: PIL's IPTC plugin opens it with every plugin on load."""
    def field(record, tag, value):
        return bytes([0x1C, record, tag]) + struct.pack(">H", len(value)) + value

    return (field(3, 60, bytes([1, 0])) + field(3, 20, struct.pack(">I", 10)) + field(3, 30, struct.pack(">I", 10))
            + field(3, 120, bytes([5])) + field(8, 10, data))


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that records each run in the returned file (PIL re-probes PATH for it)."""
    from PIL import EpsImagePlugin

    bindir = tmp_path / "bin"
    bindir.mkdir()
    ran = tmp_path / "GS_RAN"
    gs = bindir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$*" >> "{ran}"\n[ "$1" = "--version" ] && {{ echo 10.0; exit 0; }}\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL caches whether it found gs
    return ran


# ------------------------------------------------------------------ image formats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("member, data, spec, refusal", [
    ("k.jpg", EPS, "pil", r"member k\.jpg has extension 'jpg', which allows JPEG or a common raster format .*, "
                          r"but holds EPS data"),
    ("k.png", EPS, "torchrgb", r"member k\.png has extension 'png', which allows PNG or a common raster format .*, "
                               r"but holds EPS data"),
    ("k.jpg.gz", gzip.compress(EPS), "rgb8", r"member k\.jpg\.gz has extension 'jpg', which allows JPEG or a common "
                                             r"raster format .*, but holds EPS data"),
    ("k.eps", EPS, "pil", r"member k\.eps has extension 'eps': an EPS/PostScript image, which PIL renders by "
                          r"running Ghostscript"),
    ("k.ps", EPS, "l8", r"member k\.ps has extension 'ps': an EPS/PostScript image"),
    ("k.iim", iptc_embedding(EPS), "pil", r"member k\.iim has extension 'iim': an IPTC image, whose PIL plugin "
                                          r"opens the image it embeds with every PIL plugin"),
    ("k.jpg", EPS, [wds.imagehandler("pil")], r"member k\.jpg has extension 'jpg', which allows JPEG or a common "
                                              r"raster format .*, but holds EPS data"),
], ids=["jpg", "png", "jpg.gz", "eps", "ps", "iptc-embedding-eps", "wds-imagehandler"])
def test_postscript_in_an_image_member_never_runs_ghostscript(tmp_path, fake_ghostscript, member, data, spec,
                                                              refusal):
    folder = shard(tmp_path, {member: data, "ok.jpg": image_bytes("JPEG")})
    with pytest.raises(ShardError, match=r"a\.tar.*sample 'k': " + refusal):
        read(folder, decode=spec)
    got, stats = read(folder, decode=spec, handler=wds.ignore_and_continue)
    assert [x["__key__"] for x in got] == ["ok"] and stats["skipped"] == 1
    assert got[0]["jpg"] is not None
    assert not fake_ghostscript.exists(), fake_ghostscript.read_text()
    # the trap was armed: PIL finds this gs and runs it
    from PIL import EpsImagePlugin

    assert EpsImagePlugin.has_ghostscript() and fake_ghostscript.exists()


@pytest.mark.timeout(60)
def test_image_bytes_of_another_format_are_refused_naming_both(tmp_path):
    # A common raster format under another image extension (scraped data does that) still decodes.
    folder = shard(tmp_path, {"png-as-jpg.jpg": image_bytes("PNG"), "junk.png": b"\x00\x01not an image at all",
                              "broken.jpg": image_bytes("JPEG")[:40], "ok.png": image_bytes("PNG"),
                              "sgi-as-jpg.jpg": image_bytes("SGI")})
    errors = []
    got, _ = read(folder, decode="rgb8", handler=lambda e: errors.append(str(e)) or True)
    assert [x["__key__"] for x in got] == ["png-as-jpg", "ok"]
    assert "which allows PNG or a common raster format (JPEG, PNG, WEBP, GIF, BMP, TIFF, PPM), but holds no " \
           "image format PIL knows (it starts b'\\x00\\x01not an" in errors[0]
    # bytes of the right format that PIL cannot read are not a format mismatch: PIL's own error is kept
    assert "sample 'broken': decoding member broken.jpg failed" in errors[1]
    assert "member sgi-as-jpg.jpg has extension 'jpg', which allows JPEG or a common raster format" in errors[2]
    assert "but holds SGI data; refused" in errors[2]


@pytest.mark.timeout(60)
def test_every_image_extension_webdataset_decodes_opens_as_one_vetted_format():
    from PIL import Image
    from webdataset.autodecode import IMAGE_EXTENSIONS

    Image.init()
    for ext in IMAGE_EXTENSIONS:
        assert (ext in geko_decode.IMAGE_FORMATS) != (ext in geko_decode.REFUSED_IMAGE_EXTENSIONS), ext
        if ext in geko_decode.IMAGE_FORMATS:
            assert Image.EXTENSION["." + ext] in geko_decode.IMAGE_FORMATS[ext], ext  # what PIL calls it
    opened = {f for formats in geko_decode.IMAGE_FORMATS.values() for f in formats}
    assert opened <= set(Image.OPEN) and not opened & {"EPS", "IPTC", "PDF"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext, fmt, mode", [
    ("jpg", "JPEG", "RGB"), ("jpeg", "JPEG", "L"), ("png", "PNG", "RGBA"), ("ppm", "PPM", "RGB"),
    ("pgm", "PPM", "L"), ("pbm", "PPM", "1"), ("webp", "WEBP", "RGB"), ("gif", "GIF", "P"), ("bmp", "BMP", "RGB"),
    ("tif", "TIFF", "RGB"), ("tiff", "TIFF", "I;16"),
])
def test_images_decode_as_webdataset_decodes_them(tmp_path, ext, fmt, mode):
    from webdataset import autodecode

    data = image_bytes(fmt, mode=mode)
    folder = shard(tmp_path, {f"im.{ext}": data, "im.cls": b"3"})
    for spec in ("pil", "rgb8", "l", "torchrgb", "torchrgba8"):
        (x,), _ = read(folder, decode=spec)
        want = autodecode.imagehandler(spec)("." + ext, data)
        if spec == "pil":
            assert x[ext].mode == want.mode and x[ext].tobytes() == want.tobytes()
        else:
            assert type(x[ext]) is type(want) and x[ext].dtype == want.dtype
            assert np.array_equal(np.asarray(x[ext]), np.asarray(want)), spec
        assert x["cls"] == 3


# ------------------------------------------------------------------ decoded size


def npy_header(shape, dtype="|u1"):
    """An .npy's magic and header (no data): what numpy allocates from before reading anything."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npz_of(entries, compression=zipfile.ZIP_DEFLATED):
    """An .npz of ``entries`` (name -> bytes, or -> (header, zero bytes to stream after it))."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in entries.items():
            with zf.open(name, "w", force_zip64=True) as f:
                if isinstance(data, tuple):
                    f.write(data[0])
                    for _ in range(data[1] // MiB):
                        f.write(bytes(MiB))
                else:
                    f.write(data)
    return out.getvalue()


@pytest.mark.timeout(60)
def test_npz_bomb_is_refused_before_it_inflates(tmp_path):
    bomb = npz_of({"a.npy": (npy_header((64 * MiB,)), 64 * MiB)})  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 200_000
    small = io.BytesIO()
    np.savez_compressed(small, b=np.arange(10))
    folder = shard(tmp_path, {"a.npz": bomb, "b.npz": small.getvalue()})
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=r"a\.tar.*sample 'a': member a\.npz decodes to 67,108,864 bytes "
                                             r"\(entry 'a\.npy': a uint8 array of shape \(67108864,\)\), more than "
                                             r"1,048,576 \(max_decoded_bytes=1048576\); refused"):
            read(folder, decode="pil", max_decoded_bytes=MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak  # numpy's allocations are traced: the array was never allocated
    got, stats = read(folder, decode=[], max_decoded_bytes=MiB, handler=wds.ignore_and_continue)
    assert [x["__key__"] for x in got] == ["b"] and stats["skipped"] == 1
    assert np.array_equal(got[0]["npz"]["b"], np.arange(10))
    (big, _), _ = read(folder, decode=[])  # under the default cap it decodes
    assert big["npz"]["a"].nbytes == 64 * MiB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("member, data", [
    ("a.npy", npy_header((1 << 30,)) + bytes(16)),
    ("a.npy.gz", gzip.compress(npy_header((1 << 30,)) + bytes(16))),
    ("a.npz", npy_header((1 << 30,)) + bytes(16)),  # np.load reads a bare .npy whatever the extension
    ("a.npz", npz_of({"x.npy": npy_header((1 << 30,)) + bytes(16)})),
    ("a.npz", npz_of({"x": bytes(10), "y.npy": npy_header((1 << 30,)), "z.npy": npy_header((4,)) + bytes(4)})),
], ids=["npy", "npy.gz", "bare-npy-as-npz", "npz", "npz-second-entry"])
def test_an_array_header_claiming_past_the_cap_is_refused(tmp_path, member, data):
    """numpy allocates what the header says before it reads the data: a few bytes could claim any size."""
    folder = shard(tmp_path, {member: data})
    with pytest.raises(ShardError, match=r"sample 'a': member a\.np[yz](\.gz)? decodes to 1,073,741,8\d\d bytes "
                                         r"\(.*a uint8 array of shape \(1073741824,\).*\), more than 1,048,576 "
                                         r"\(max_decoded_bytes=1048576\)"):
        read(folder, decode=[], max_decoded_bytes=MiB)


@pytest.mark.timeout(60)
def test_npz_entries_zip_cannot_bound_are_refused(tmp_path):
    small = npz_of({"x.npy": npy_header((4,)) + bytes(4)}, compression=zipfile.ZIP_BZIP2)
    folder = shard(tmp_path, {"a.npz": small})
    with pytest.raises(ShardError, match=r"sample 'a': decoding member a\.npz failed \(ValueError: npz entry "
                                         r"'x\.npy' has zip compression method 12; only stored or deflated"):
        read(folder, decode=[])


@pytest.mark.timeout(60)
def test_image_bomb_is_refused_from_its_header(tmp_path):
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    folder = shard(tmp_path, {"b.png": image_bytes("PNG", size=(1000, 1000), mode="L"),
                              "c.png": image_bytes("PNG", size=(4000, 4000), mode="L")})
    assert os.path.getsize(folder / "a.tar") < 100_000
    # 1000x1000 grey is 1,000,000 bytes as uint8, 12,000,000 as float32 RGB
    with pytest.raises(ShardError, match=r"sample 'b': member b\.png decodes to 12,000,000 bytes \(a 1000x1000 PNG "
                                         r"image in mode L, 12 bytes a pixel as 'torchrgb'\), more than 1,048,576 "
                                         r"\(max_decoded_bytes=1048576\)"):
        read(folder, decode="torchrgb", max_decoded_bytes=MiB)
    errors = []
    got, _ = read(folder, decode="l8", max_decoded_bytes=MiB, handler=lambda e: errors.append(str(e)) or True)
    assert [x["png"].shape for x in got] == [(1000, 1000)]
    # past twice the cap in pixels PIL's own decompression-bomb check, lowered to the cap, refuses it first
    assert "sample 'c': member c.png decodes to more than 1,048,576 bytes (PIL: Image size (16000000 pixels) " \
           "exceeds limit of 2097152 pixels" in errors[0]
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's process-wide limit is put back
    got, _ = read(folder, decode="torchrgb")  # under the default cap both decode
    assert [tuple(x["png"].shape) for x in got] == [(3, 1000, 1000), (3, 4000, 4000)]


@pytest.mark.timeout(60)
def test_a_lower_pil_limit_of_the_callers_stays_pils_own_error(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = shard(tmp_path, {"b.png": image_bytes("PNG", size=(100, 100), mode="L")})
    with pytest.raises(ShardError, match=r"sample 'b': decoding member b\.png failed \(DecompressionBombError: "
                                         r"Image size \(10000 pixels\) exceeds limit of 2000 pixels"):
        read(folder, decode="l8", max_decoded_bytes=MiB)  # 10,000 bytes: well under the cap
    assert Image.MAX_IMAGE_PIXELS == 1000


# ------------------------------------------------------------------ the decoder itself


@pytest.mark.timeout(60)
def test_decoder_pickles_for_spawned_workers(tmp_path):
    """A spawned DataLoader worker gets the stream, decoder included, by pickle."""
    png = image_bytes("PNG")
    folder = shard(tmp_path, {"im.png": png})
    stream = GEKOStream(folder, total_epochs=1, config=QUIET, decode=["torchrgb", wds.imagehandler("pil")],
                        max_decoded_bytes=MiB)
    pickle.dumps(stream)
    decoder = pickle.loads(pickle.dumps(geko_decode.make_decoder("rgb8", max_decoded_bytes=10)))
    with pytest.raises(wds.autodecode.DecodingError) as e:
        decoder({"__key__": "k", "png": png})
    assert isinstance(e.value.__cause__, geko_decode.DecodedTooLarge)  # the cap travelled with it


@pytest.mark.timeout(60)
def test_a_fork_mid_decode_leaves_the_child_a_free_lock_and_pils_limit():
    """A fork while another thread decodes an image must not leave the child a held lock (a hang at its
    first image) or PIL's lowered limit."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    with geko_decode._pil_pixel_limit(1000):
        assert Image.MAX_IMAGE_PIXELS == min(1000, before or 1000)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = geko_decode._pil_lock.acquire(timeout=5) and Image.MAX_IMAGE_PIXELS == before
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert Image.MAX_IMAGE_PIXELS == before

"""Decoding members of GEKOStream samples with webdataset's decoders, minus what is unsafe.

A tar is data from elsewhere. Three things its members must not do through a decoder spec:

- run code: webdataset's default handlers unpickle ``.pyd``/``.pkl`` and torch-load ``.pth`` (refused, see
  ``UNSAFE_EXTENSIONS``), and its image handler lets PIL pick a plugin by content, so a ``.jpg`` holding
  PostScript runs Ghostscript. Here an image opens only as the format(s) its extension names
  (``IMAGE_FORMATS``) or a common raster format (``COMMON_IMAGE_FORMATS``), and the extensions whose PIL
  plugin runs another program, or re-opens what it embeds with every plugin, are refused
  (``REFUSED_IMAGE_EXTENSIONS``);
- exhaust memory: a 400 KB ``.gz`` member can inflate to 400 MB, a 60 KB PNG to a 700 MB tensor, a 250 KB
  ``.npz`` to 256 MB. ``.gz`` is gunzipped here in steps; an image's size is read from its header, and an
  ``.npy``/``.npz`` array's from its header, before anything is decoded; past ``max_decoded_bytes`` each is
  refused;
- pick the decoder: the checks run on what webdataset's own handlers decode, and a webdataset
  ``ImageHandler`` passed in a list is replaced by the checked one.

A callable ``decode=`` is the caller's own code and decides what it trusts.
"""

from __future__ import annotations

import io
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from geko_data.shards import ShardError

__all__ = ["COMMON_IMAGE_FORMATS", "DEFAULT_MAX_DECODED_BYTES", "IMAGE_FORMATS", "REFUSED_IMAGE_EXTENSIONS",
           "UNSAFE_EXTENSIONS", "check_decoded", "decoding_error", "gunzip", "make_decoder"]

#: Extensions webdataset's default decoders would unpickle (plain pickle, or torch's unsafe loader): code
#: execution from a tar. A ``decode=`` spec refuses them (decode them yourself with a callable).
UNSAFE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth", "pt"})

#: Default cap on one member's decoded size (gunzipped bytes, an image's pixels, an array's elements): far
#: above a real sample, far below a bomb.
DEFAULT_MAX_DECODED_BYTES = 256 << 20

#: The PIL format(s) an image member may be opened as, by its (lower-cased) extension: every extension
#: webdataset's image handler decodes, except ``REFUSED_IMAGE_EXTENSIONS``. Bytes of any other format are
#: refused, whatever PIL would make of them.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("jpg", "jpeg", "jpe", "jfif"), ("JPEG",)),
    **dict.fromkeys(("png", "apng"), ("PNG",)),
    **dict.fromkeys(("ppm", "pgm", "pbm", "pnm"), ("PPM",)),
    "webp": ("WEBP",),
    "gif": ("GIF",),
    "bmp": ("BMP",),
    "dib": ("DIB",),
    **dict.fromkeys(("tif", "tiff"), ("TIFF",)),
    **dict.fromkeys(("jp2", "j2k", "jpc", "jpf", "jpx", "j2c"), ("JPEG2000",)),
    "blp": ("BLP",),
    "cur": ("CUR",),
    "ico": ("ICO",),
    "icns": ("ICNS",),
    "pcx": ("PCX",),
    "dcx": ("DCX",),
    "dds": ("DDS",),
    **dict.fromkeys(("fit", "fits"), ("FITS",)),
    **dict.fromkeys(("fli", "flc"), ("FLI",)),
    **dict.fromkeys(("ftc", "ftu"), ("FTEX",)),
    "gbr": ("GBR",),
    "im": ("IM",),
    "msp": ("MSP",),
    "pcd": ("PCD",),
    "pxr": ("PIXAR",),
    "psd": ("PSD",),
    **dict.fromkeys(("bw", "rgb", "rgba", "sgi"), ("SGI",)),
    "ras": ("SUN",),
    **dict.fromkeys(("tga", "icb", "vda", "vst"), ("TGA",)),
    "xbm": ("XBM",),
    "xpm": ("XPM",),
    # PIL only identifies these; decoding them needs a handler the application registers itself.
    **dict.fromkeys(("mpg", "mpeg"), ("MPEG",)),
    **dict.fromkeys(("h5", "hdf"), ("HDF5",)),
    **dict.fromkeys(("wmf", "emf"), ("WMF",)),
    "bufr": ("BUFR",),
    "grib": ("GRIB",),
}

#: Formats any image extension also opens as: scraped datasets name PNG and WebP files ".jpg" often enough
#: that refusing them would lose real data, and none of these plugins runs a program or re-opens what it
#: embeds with other plugins.
COMMON_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

#: Image extensions a decoder spec refuses outright, with why: PIL's plugin for them runs a program or
#: opens what the file embeds with every plugin, EPS's included.
REFUSED_IMAGE_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(("eps", "ps"), "an EPS/PostScript image, which PIL renders by running Ghostscript on it"),
    "iim": "an IPTC image, whose PIL plugin opens the image it embeds with every PIL plugin "
           "(PostScript's, which runs Ghostscript, included)",
}

# zlib's wbits for a gzip header and trailer (what the gzip module reads).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class UnsafeMember(Exception):
    """A member a decoder spec would unpickle."""

    def __init__(self, ext: str) -> None:
        super().__init__(ext)
        self.ext = ext


class DecodedTooLarge(Exception):
    """A member whose decoded size passes the cap: ``size`` and ``what`` say how far, when it is known
    before decoding (an image's or an array's header)."""

    def __init__(self, limit: int, size: int | None = None, what: str = "") -> None:
        if size is None:
            text = f"decodes to more than {limit:,} bytes" + (f" ({what})" if what else "")
        else:
            text = f"decodes to {size:,} bytes" + (f" ({what})" if what else "") + f", more than {limit:,}"
        super().__init__(text)
        self.limit, self.size, self.what = limit, size, what


class RefusedImageFormat(Exception):
    """An image member with an extension in ``REFUSED_IMAGE_EXTENSIONS`` (or one ``IMAGE_FORMATS`` lacks)."""

    def __init__(self, ext: str, why: str) -> None:
        super().__init__(f"{ext}: {why}")
        self.ext, self.why = ext, why


class ImageFormatMismatch(Exception):
    """An image member whose bytes are not the format its extension names."""

    def __init__(self, ext: str, allowed: tuple[str, ...], detected: str | None, head: bytes) -> None:
        super().__init__(f"{ext}: {detected or head!r} is not {'/'.join(allowed)}")
        self.ext, self.allowed, self.detected, self.head = ext, allowed, detected, head


def gunzip(data: bytes, limit: int) -> bytes:
    """``data`` gunzipped (concatenated gzip members and zero padding included, as the gzip module reads),
    never holding more than ``limit + 1`` decoded bytes; raises DecodedTooLarge past ``limit`` and
    ``zlib.error`` / EOFError for a corrupt or truncated stream."""
    out = bytearray()
    rest = data
    while True:
        rest = rest.lstrip(b"\0")  # the gzip module skips zero padding between members
        if not rest:
            return bytes(out)
        d = zlib.decompressobj(_GZIP_WBITS)
        pending = rest
        while pending:
            # max_length bounds what one call may produce: the whole bomb is never inflated.
            out += d.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise DecodedTooLarge(limit)
            pending = d.unconsumed_tail
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        rest = d.unused_data


def _refuse_unsafe(key: str, data: bytes) -> None:
    """First webdataset decoder handler: refuse members the default handlers would unpickle.

    Every dot-part of the extension is checked, so ``x.pyd.gz`` (gunzipped, then unpickled) is refused
    before the gzip handler runs.
    """
    for part in key.lower().split("."):
        if part in UNSAFE_EXTENSIONS:
            raise UnsafeMember(part)
    # Falling through returns None: not ours, the next handler decides.


# Handlers are classes, not closures: the decoder travels with a pickled GEKOStream to spawned workers.
class _GunzipHandler:
    """webdataset's ``.gz`` pre-handler with a cap on the decoded size (its own inflates all at once)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, key: str, data: bytes) -> Any:
        from webdataset.autodecode import Continue

        if not key.endswith(".gz"):
            return None
        return Continue(key[:-3], gunzip(data, self.limit))


# ------------------------------------------------------------------ arrays

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # what np.load takes for an .npz (the second: an empty zip)


def _npy_nbytes(fp: Any) -> tuple[int, str]:
    """The bytes numpy allocates for the .npy at ``fp``, read from its header (and a description)."""
    import numpy.lib.format as npy_format

    try:  # the parser read_array itself uses: a second parser could read the header differently
        from numpy.lib._format_impl import _read_array_header
    except ImportError:  # numpy 1.x
        _read_array_header = npy_format._read_array_header
    version = npy_format.read_magic(fp)
    shape, _, dtype = _read_array_header(fp, version)
    # math.prod on Python ints: numpy's own product would wrap around for a crafted shape
    return math.prod(shape) * dtype.itemsize, f"a {dtype} array of shape {shape}"


def _check_npz(data: bytes, limit: int) -> None:
    """Refuses the .npz ``data`` if what np.load would decode from it passes ``limit``, before decoding it."""
    if data.startswith(_NPY_MAGIC):  # np.load reads a bare .npy, whatever the extension
        size, what = _npy_nbytes(io.BytesIO(data))
        if size > limit:
            raise DecodedTooLarge(limit, size, what)
        return
    if not data.startswith(_ZIP_MAGICS):
        return  # np.load takes it for a pickle and refuses it (allow_pickle=False)
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            # zipfile inflates a deflated entry in bounded steps, cut at its declared size; bzip2 and lzma
            # entries are inflated a whole read at a time, unbounded.
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"npz entry {info.filename!r} has zip compression method {info.compress_type}; "
                                 f"only stored or deflated entries (what numpy writes) are read")
            size, what = info.file_size, f"entry {info.filename!r} of {info.file_size:,} bytes"
            with zf.open(info) as entry:
                # As np.load: an entry starting with the .npy magic is an array, allocated from its header and
                # filled in chunks (the entry is never held whole); any other entry is read whole.
                if entry.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                    entry.seek(0)
                    size, array = _npy_nbytes(entry)
                    what = f"entry {info.filename!r}: {array}"
            if total:
                what += f", after {total:,} bytes of earlier entries"
            total += size
            if total > limit:
                raise DecodedTooLarge(limit, total, what)


class _ArrayCap:
    """Pre-handler: an ``.npy``/``.npz`` member is refused past the cap from its headers, before it is read.

    numpy allocates an array from its header's shape before reading any data, and an .npz's deflated
    entries inflate: a small member can decode to any size. Falling through returns None: the member is
    decoded by whichever handler would have.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, key: str, data: bytes) -> None:
        ext = key.rsplit(".", 1)[-1]  # as webdataset's basichandlers matches it, case and all
        if ext == "npy":
            size, what = _npy_nbytes(io.BytesIO(data))
            if size > self.limit:
                raise DecodedTooLarge(self.limit, size, what)
        elif ext == "npz":
            _check_npz(data, self.limit)


# ------------------------------------------------------------------ images

# PIL's decompression-bomb limit is process-wide: it is lowered only while a member is opened and loaded,
# under a lock so that overlapping decodes put back the caller's value, not each other's.
_pil_lock = threading.Lock()
_pil_saved: list[int | None] = []  # the caller's MAX_IMAGE_PIXELS while a decode holds the lock


def _reset_pil_lock_in_child() -> None:
    # A fork while another thread decodes copies the lock held, and that thread does not exist in the child
    # to release it or to put PIL's limit back.
    global _pil_lock
    _pil_lock = threading.Lock()
    if _pil_saved:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = _pil_saved.pop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pil_lock_in_child)


@contextmanager
def _pil_pixel_limit(limit: int) -> Iterator[None]:
    """PIL's decompression-bomb limit at most ``limit`` pixels (each decodes to a byte at least).

    The header check covers the image a member declares; PIL's own check also covers the images some
    formats embed and load later (an ICO's PNG, a BLP's JPEG, a GIF's frames). PIL raises past twice its
    limit and warns past it, so an image this decoder keeps (at most ``limit`` bytes) never warns.
    """
    from PIL import Image

    with _pil_lock:
        before = Image.MAX_IMAGE_PIXELS
        _pil_saved.append(before)
        Image.MAX_IMAGE_PIXELS = limit if before is None else min(before, limit)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = _pil_saved.pop()


def _detect_image_format(head: bytes) -> str | None:
    """The first PIL format whose signature check takes ``head`` (no plugin is run: only its prefix test)."""
    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(head):
                return fmt
        except Exception:  # noqa: BLE001 - a signature test failing means "not this format"
            continue
    return None


def _band_bytes(mode: str) -> int:
    """Bytes one band of a pixel takes in PIL ``mode``."""
    import numpy as np
    from PIL import ImageMode

    try:
        return max(1, np.dtype(ImageMode.getmode(mode).typestr).itemsize)
    except Exception:  # noqa: BLE001 - a mode this Pillow cannot describe: assume the widest band
        return 4


class _ImageHandler:
    """webdataset's ``ImageHandler`` for one spec, with two differences: an image opens only as the PIL
    format(s) its extension names or a common raster format, and one whose header says it decodes past the
    cap is refused before its pixels are decoded."""

    def __init__(self, spec: str, limit: int, extensions: Any = None) -> None:
        from webdataset import autodecode

        self.spec = spec
        self.limit = limit
        self.extensions = frozenset(e.lower() for e in (autodecode.IMAGE_EXTENSIONS if extensions is None
                                                         else extensions))

    def _check_size(self, img: Any) -> None:
        from webdataset.autodecode import imagespecs

        _, etype, mode = imagespecs[self.spec]
        width, height = img.size
        source = len(img.getbands()) * _band_bytes(img.mode)
        out = len(mode) * (4 if etype == "float" else 1)  # webdataset's floats are float32
        per_pixel = max(source, out)
        size = width * height * per_pixel
        if size > self.limit:
            raise DecodedTooLarge(self.limit, size, f"a {width}x{height} {img.format} image in mode {img.mode}, "
                                                    f"{per_pixel} bytes a pixel as {self.spec!r}")

    def _pil_bomb(self, exn: Exception) -> Exception:
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS == self.limit:  # PIL's limit was ours: past it, past the cap
            return DecodedTooLarge(self.limit, what=f"PIL: {exn}")
        return exn  # the caller's (or PIL's default) limit, lower than the cap: PIL's own error

    def _open(self, ext: str, formats: tuple[str, ...], data: bytes) -> Any:
        from PIL import Image, UnidentifiedImageError

        with _pil_pixel_limit(self.limit), io.BytesIO(data) as stream:
            try:
                img = Image.open(stream, formats=list(formats))
            except UnidentifiedImageError:
                detected = _detect_image_format(data[:16])
                if detected in formats:
                    raise  # the right format, but broken: PIL's own error says how
                raise ImageFormatMismatch(ext, IMAGE_FORMATS[ext], detected, data[:16]) from None
            except Image.DecompressionBombError as exn:
                raise self._pil_bomb(exn) from None
            self._check_size(img)
            try:
                img.load()
            except Image.DecompressionBombError as exn:
                raise self._pil_bomb(exn) from None
            self._check_size(img)  # what load() decoded may not be what the header said (embedded images)
        return img

    def __call__(self, key: str, data: bytes) -> Any:
        import numpy as np
        from webdataset.autodecode import imagespecs

        ext = key.rsplit(".", 1)[-1].lower()  # as webdataset's ImageHandler matches it
        if ext not in self.extensions:
            return None
        if ext in REFUSED_IMAGE_EXTENSIONS:
            raise RefusedImageFormat(ext, REFUSED_IMAGE_EXTENSIONS[ext])
        own = IMAGE_FORMATS.get(ext)
        if own is None:
            raise RefusedImageFormat(ext, "an image extension geko_data has no vetted PIL format for")
        formats = tuple(dict.fromkeys(own + COMMON_IMAGE_FORMATS))
        atype, etype, mode = imagespecs[self.spec]
        img = self._open(ext, formats, data).convert(mode.upper())
        # What follows is webdataset's ImageHandler conversion, for the three modes convert() produces.
        if atype == "pil":
            return img
        result = np.asarray(img)
        if etype == "float":
            result = result.astype(np.float32) / 255.0
        if atype == "numpy":
            return result
        import torch

        return torch.from_numpy(result.transpose(2, 0, 1).copy() if result.ndim == 3 else result.copy())


def make_decoder(decode: Any, *, max_decoded_bytes: int) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``decode`` as a sample -> sample callable; webdataset specs get the unsafe-member guard, the capped
    gunzip in place of webdataset's and the array-size check first, and checked image handlers in place of
    webdataset's."""
    if decode is None:
        return None
    if callable(decode) and not isinstance(decode, (str, list, tuple)):
        return decode  # the user's own function decides what it trusts
    from webdataset import autodecode

    specs = [decode] if isinstance(decode, str) else decode
    if not isinstance(specs, (list, tuple)):
        raise TypeError(f"`decode` must be None, a callable, a webdataset spec string or a list of specs and "
                        f"handlers, got {type(decode).__name__}")
    handlers: list[Callable[[str, bytes], Any]] = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in autodecode.imagespecs:
                raise ValueError(f"`decode` spec {spec!r} is not a webdataset image spec; allowed: "
                                 f"{sorted(autodecode.imagespecs)}")
            handlers.append(_ImageHandler(spec, max_decoded_bytes))
        elif isinstance(spec, autodecode.ImageHandler):
            # webdataset's own, e.g. wds.imagehandler("torchrgb"): it is not the caller's code, and it
            # opens any format PIL knows
            handlers.append(_ImageHandler(spec.imagespec, max_decoded_bytes, spec.extensions))
        elif callable(spec):
            handlers.append(spec)
        else:
            raise TypeError(f"`decode` entries must be spec strings or handler callables, got {spec!r}")
    pre = [_refuse_unsafe, _GunzipHandler(max_decoded_bytes), _ArrayCap(max_decoded_bytes)]
    return autodecode.Decoder(handlers, pre=pre, post=list(autodecode.default_post_handlers))


def check_decoded(sample: Any, *, url: str, key: str) -> dict[str, Any]:
    """``sample`` as ``decode`` returned it, which must be a dict (the reader tags it; a collator indexes it)."""
    if not isinstance(sample, dict):
        raise TypeError(f"`decode` must return the sample as a dict, got {type(sample).__name__} for sample "
                        f"{key!r} of {url!r}")
    return sample


def decoding_error(exn: Exception, *, url: str, key: str) -> ShardError:
    """A decoder's exception as a ShardError naming the shard, the key and the member."""
    from webdataset.autodecode import DecodingError

    cause, field = exn, None
    if isinstance(exn, DecodingError):
        cause, field = exn.__cause__ or exn, exn.k
    member = f"member {key}.{field}" if field is not None else "the sample"
    if isinstance(cause, UnsafeMember):
        return ShardError(f"shard {url!r}: sample {key!r}: {member} has extension {cause.ext!r}, "
                          f"which webdataset's decoders would unpickle; refused. "
                          f"Decode it with your own callable `decode=` if you trust these shards")
    if isinstance(cause, DecodedTooLarge):
        return ShardError(f"shard {url!r}: sample {key!r}: {member} {cause} (max_decoded_bytes="
                          f"{cause.limit}); refused: a decompression bomb, or raise the cap")
    if isinstance(cause, RefusedImageFormat):
        return ShardError(f"shard {url!r}: sample {key!r}: {member} has extension {cause.ext!r}: {cause.why}; "
                          f"refused. Decode it with your own callable `decode=` if you trust these shards")
    if isinstance(cause, ImageFormatMismatch):
        found = (f"{cause.detected} data" if cause.detected else
                 f"no image format PIL knows (it starts {cause.head!r})")
        return ShardError(f"shard {url!r}: sample {key!r}: {member} has extension {cause.ext!r}, which allows "
                          f"{' or '.join(cause.allowed)} or a common raster format "
                          f"({', '.join(COMMON_IMAGE_FORMATS)}), "
                          f"but holds {found}; refused: PIL would pick any plugin by content, and PostScript's "
                          f"runs Ghostscript")
    err = ShardError(f"shard {url!r}: sample {key!r}: decoding {member} failed ({type(cause).__name__}: {cause})")
    err.__cause__ = cause  # the decoder's own traceback stays one "direct cause" away
    return err

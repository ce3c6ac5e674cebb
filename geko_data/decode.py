"""Decoding members of GEKOStream samples with webdataset's decoders, minus what is unsafe.

A tar is data from elsewhere. Two things its members must not do through a decoder spec: run code
(webdataset's default handlers unpickle ``.pyd``/``.pkl`` and torch-load ``.pth``: refused, see
``UNSAFE_EXTENSIONS``) and exhaust memory (a 400 KB ``.gz`` member can inflate to 400 MB: gunzipped here
in steps, and refused beyond ``max_decoded_bytes``). A callable ``decode=`` is the caller's own code and
decides what it trusts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from geko_data.shards import ShardError

__all__ = ["DEFAULT_MAX_DECODED_BYTES", "UNSAFE_EXTENSIONS", "decoding_error", "gunzip", "make_decoder"]

#: Extensions webdataset's default decoders would unpickle (plain pickle, or torch's unsafe loader): code
#: execution from a tar. A ``decode=`` spec refuses them (decode them yourself with a callable).
UNSAFE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth", "pt"})

#: Default cap on one member's decoded (gunzipped) size: far above a real sample, far below a bomb.
DEFAULT_MAX_DECODED_BYTES = 256 << 20

# zlib's wbits for a gzip header and trailer (what the gzip module reads).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class UnsafeMember(Exception):
    """A member a decoder spec would unpickle."""

    def __init__(self, ext: str) -> None:
        super().__init__(ext)
        self.ext = ext


class DecodedTooLarge(Exception):
    """A member whose decoded size passes the cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"decodes to more than {limit:,} bytes")
        self.limit = limit


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


def _gunzip_handler(limit: int) -> Callable[[str, bytes], Any]:
    """webdataset's ``.gz`` pre-handler with a cap on the decoded size (its own inflates all at once)."""
    from webdataset.autodecode import Continue

    def handler(key: str, data: bytes) -> Any:
        if not key.endswith(".gz"):
            return None
        return Continue(key[:-3], gunzip(data, limit))

    return handler


def make_decoder(decode: Any, *, max_decoded_bytes: int) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``decode`` as a sample -> sample callable; webdataset specs get the unsafe-member guard first and
    the capped gunzip in place of webdataset's."""
    if decode is None:
        return None
    if callable(decode) and not isinstance(decode, (str, list, tuple)):
        return decode  # the user's own function decides what it trusts
    from webdataset import autodecode

    specs = [decode] if isinstance(decode, str) else decode
    if not isinstance(specs, (list, tuple)):
        raise TypeError(f"`decode` must be None, a callable, a webdataset spec string or a list of specs and "
                        f"handlers, got {type(decode).__name__}")
    handlers = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in autodecode.imagespecs:
                raise ValueError(f"`decode` spec {spec!r} is not a webdataset image spec; allowed: "
                                 f"{sorted(autodecode.imagespecs)}")
            handlers.append(autodecode.imagehandler(spec))
        elif callable(spec):
            handlers.append(spec)
        else:
            raise TypeError(f"`decode` entries must be spec strings or handler callables, got {spec!r}")
    return autodecode.Decoder(handlers, pre=[_refuse_unsafe, _gunzip_handler(max_decoded_bytes)])


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
    err = ShardError(f"shard {url!r}: sample {key!r}: decoding {member} failed ({type(cause).__name__}: {cause})")
    err.__cause__ = cause  # the decoder's own traceback stays one "direct cause" away
    return err

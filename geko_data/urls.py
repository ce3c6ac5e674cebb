"""Remote URLs: which are remote, which filesystem opens them, and what their errors mean.

A URL (``s3://``, ``gs://``, ``az://``, ``http(s)://`` or any protocol of an installed fsspec filesystem)
opens through fsspec. A protocol whose package is missing is one ``RemoteError`` naming the package and
the extra of geko-data that installs it. Failures are sorted into transient (worth another try) and
permanent (403, 404, other client errors), and every message is passed through ``redact``: credentials
of ``storage_options`` and any ``user:password@`` of a URL become ``***``. HTTP(S) redirects are held to
``RemoteConfig.follow_redirects`` (``redirect_guard``): by default none to another origin is followed.
"""

from __future__ import annotations

import difflib
import os
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["PROTOCOL_PACKAGES", "REDIRECTS", "RedirectRefused", "RemoteError", "describe", "endpoint_of",
           "is_transient", "is_url", "lower_scheme", "open_url", "redact", "redirect_guard"]

#: Protocol -> (package that implements it, extra of geko-data that installs it).
PROTOCOL_PACKAGES = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
    "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
}
# Statuses worth another try: throttling (429, S3's 503 SlowDown), server errors, request timeout.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Errors that another try cannot fix. 403 and 404 arrive as PermissionError / FileNotFoundError from
# fsspec's filesystems, or as an HTTP status below 500 from aiohttp.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError,
              AttributeError, NotImplementedError, KeyError)


class RemoteError(ValueError):
    """A remote URL that cannot be used: unknown protocol, filesystem package missing, bad options."""


class RedirectRefused(RemoteError):
    """An HTTP redirect that ``RemoteConfig.follow_redirects`` does not allow (never retried: a ValueError)."""


#: Values of ``RemoteConfig.follow_redirects``.
REDIRECTS = ("same-origin", "any", "none")


def is_url(path: Any) -> bool:
    """True for a remote URL (``proto://...`` other than ``file://``); ``pipe:`` commands are not URLs."""
    return isinstance(path, str) and "://" in path and not path.startswith(("file://", "pipe:"))


# Option names whose values are credentials (s3fs key/secret/token, botocore aws_*_key*, adlfs account_key /
# sas_token / connection_string / client_secret, gcsfs token, HTTP auth headers). Other values, an endpoint
# URL above all, stay in messages: a mistyped endpoint must be visible in the error it causes.
_SECRET_NAMES = ("key", "secret", "token", "password", "passwd", "credential", "auth", "sas", "connection_string",
                 "user")


def lower_scheme(url: str) -> str:
    """``url`` with its scheme in lower case: schemes are case-insensitive (RFC 3986), fsspec's protocols are
    registered in lower case ('S3://b/k' was refused as 'Protocol not known: S3'). Chained URLs
    ('simplecache::s3://...') are left as they are."""
    if "::" in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return scheme.lower() + "://" + rest


def _secrets(options: Any, secret: bool = False) -> list[str]:
    """Every string of ``storage_options`` held under a credential's name (``_SECRET_NAMES``), nested too."""
    if isinstance(options, dict):
        return [s for k, v in options.items()
                for s in _secrets(v, secret or any(n in str(k).lower() for n in _SECRET_NAMES))]
    if isinstance(options, (list, tuple)):
        return [s for v in options for s in _secrets(v, secret)]
    return [options] if secret and isinstance(options, str) and len(options) >= 4 else []


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def redact(text: str, storage_options: dict[str, Any] | None) -> str:
    """``text`` with the credentials of ``storage_options`` (values under names such as key, secret, token,
    password; not an endpoint) and URL userinfo replaced by ``***``."""
    for secret in sorted(_secrets(storage_options or {}), key=len, reverse=True):
        text = text.replace(secret, "***")
    words = [_strip_userinfo(w) if "://" in w and "@" in w else w for w in text.split(" ")]
    return " ".join(words)


def _filesystem_class(protocol: str, url: str, storage_options: dict[str, Any] | None) -> None:
    """RemoteError naming what to install when ``protocol`` has no usable fsspec filesystem."""
    package, extra = PROTOCOL_PACKAGES.get(protocol, (None, None))
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"reading {redact(url, storage_options)!r} needs fsspec: pip install "
                          f"'geko-data[{extra or 's3'}]'") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = f"the package {package}, which is not installed: pip install 'geko-data[{extra}]'" if extra \
            else f"a package that is not installed ({e})"
        raise RemoteError(f"protocol {protocol!r} of {redact(url, storage_options)!r} needs {hint}") from None
    except ValueError:
        known = ", ".join(sorted(PROTOCOL_PACKAGES))
        raise RemoteError(f"unknown protocol {protocol!r} in {redact(url, storage_options)!r}: use one of "
                          f"{known} or another protocol of an installed fsspec filesystem") from None


def open_url(url: str, storage_options: dict[str, Any] | None = None, *,
             follow_redirects: str = "same-origin") -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; RemoteError naming the package to install when
    its protocol is unknown or its filesystem library is missing. An HTTP(S) filesystem follows redirects
    as ``follow_redirects`` says (see ``RemoteConfig``)."""
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"`storage_options` must be a dict or None, got {type(storage_options).__name__}")
    if follow_redirects not in REDIRECTS:
        raise ValueError(f"`follow_redirects` must be one of {', '.join(map(repr, REDIRECTS))}, "
                         f"got {follow_redirects!r}")
    url = lower_scheme(url)
    protocol = url.split("://", 1)[0]
    _filesystem_class(protocol, url, storage_options)
    if protocol in ("s3", "s3a"):
        _check_s3_option_names(storage_options)
    import fsspec

    # A filesystem of our own, not fsspec's shared instance: the fetcher closes it (sessions, sockets) in the
    # process that made it, before a DataLoader forks workers from that process.
    options = {"skip_instance_cache": True, **(storage_options or {})}
    if protocol in ("s3", "s3a"):
        options = _one_retry_layer(options)
    if protocol in ("http", "https"):
        options = _with_redirect_guard(options, follow_redirects, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # a package the filesystem needs only when made (aiohttp for http)
        extra = PROTOCOL_PACKAGES.get(protocol, (None, protocol))[1]
        raise RemoteError(f"protocol {protocol!r} needs a package that is not installed: pip install "
                          f"'geko-data[{extra}]' ({e})") from None
    except (TypeError, ValueError) as e:
        raise RemoteError(f"`storage_options` rejected by the {protocol!r} filesystem: "
                          f"{redact(str(e), storage_options)}") from None
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop (5 tries, not an option): ours is the one that retries
    return fs, path


def endpoint_of(url: str, storage_options: dict[str, Any] | None) -> str | None:
    """The endpoint an ``s3://`` URL goes to, when it is not AWS's: ``client_kwargs["endpoint_url"]`` of
    ``storage_options`` (or its own ``endpoint_url``, which newer s3fs take), else ``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_S3`` of the environment."""
    if url.split("://", 1)[0].lower() not in ("s3", "s3a"):
        return None
    client = (storage_options or {}).get("client_kwargs")
    found = client.get("endpoint_url") if isinstance(client, dict) else None
    found = found or (storage_options or {}).get("endpoint_url")
    return found or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


#: boto3's names for what s3fs takes under other names (s3fs passes unknown keys on to aiobotocore's session,
#: which fails at the first request with a TypeError that names neither).
_BOTO3_NAMES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token",
                "endpoint_url": "client_kwargs={'endpoint_url': ...}",
                "region_name": "client_kwargs={'region_name': ...}"}


def check_options_for(urls: list[str], storage_options: dict[str, Any] | None) -> None:
    """Refuse ``storage_options`` the shards' filesystem would refuse only at its first request: with a local
    index whose ``shard_url`` points into S3, that request is in a DataLoader worker, mid-epoch."""
    if storage_options and any(lower_scheme(u).split("://", 1)[0] in ("s3", "s3a") for u in urls):
        _check_s3_option_names(storage_options)


def _check_s3_option_names(storage_options: dict[str, Any] | None) -> None:
    known = _s3_option_names()
    # boto3's names that this s3fs does not take as well (a newer one takes `endpoint_url` itself)
    wrong = [k for k in (storage_options or {}) if k in _BOTO3_NAMES and k not in known]
    if wrong:
        raise RemoteError("`storage_options` for s3:// are s3fs's, not boto3's: " + ", ".join(
            f"{k!r} is {_BOTO3_NAMES[k]}" for k in wrong) + " (e.g. {'key': ..., 'secret': ..., 'client_kwargs': "
            "{'endpoint_url': 'http://host:9000'}})")
    # s3fs hands names it does not know to botocore's session, which refuses them only at the first request,
    # deep inside a retried read ("AioSession.__init__() got an unexpected keyword argument 'client_kwarg'")
    # fsspec also takes options keyed by protocol ({"s3": {...}}) and `protocol`: not checked here
    unknown = [k for k in (storage_options or {}) if k not in known and k not in ("s3", "s3a", "protocol")]
    if unknown and known:
        close = {k: difflib.get_close_matches(str(k), sorted(known), n=1) for k in unknown}
        raise RemoteError("`storage_options` for s3:// hold names s3fs does not take: " + ", ".join(
            f"{k!r}" + (f" (did you mean {close[k][0]!r}?)" if close[k] else "") for k in unknown)
            + f"; its options are {', '.join(sorted(known))}")


def _s3_option_names() -> set[str]:
    """The keyword arguments s3fs's filesystem takes (its own, fsspec's, botocore's session's); empty when
    they cannot be read (no check then)."""
    try:
        import inspect

        import s3fs
        from aiobotocore.session import AioSession
    except ImportError:
        return set()
    names = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters)
    names |= set(inspect.signature(AioSession.__init__).parameters)
    names |= {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}  # fsspec's own
    return names - {"self", "args", "kwargs"}


def _with_redirect_guard(options: dict[str, Any], follow: str, storage_options: dict[str, Any] | None
                         ) -> dict[str, Any]:
    """HTTP filesystem options whose aiohttp session runs ``redirect_guard`` on every redirect (the user's
    own ``client_kwargs`` and trace configs kept). fsspec asks aiohttp to follow redirects on every GET and
    HEAD, and aiohttp follows them to any host with every header but ``Authorization`` and cookies."""
    client = dict(options.get("client_kwargs") or {})
    client["trace_configs"] = [*(client.get("trace_configs") or ()), redirect_guard(follow, storage_options)]
    return {**options, "client_kwargs": client}


def _header_names(headers: Any) -> set[str]:
    """The lower-cased names of a headers mapping of ``storage_options``; none when it is not one (fsspec or
    aiohttp refuses it then, with its own message)."""
    try:
        return {str(k).lower() for k in dict(headers or {})}
    except (TypeError, ValueError):
        return set()


def redirect_guard(follow: str, storage_options: dict[str, Any] | None = None) -> Any:
    """An ``aiohttp.TraceConfig`` holding an HTTP session's redirects to ``follow`` (``REDIRECTS``).

    It runs before aiohttp sends the request a redirect asks for, so a refused redirect never reaches its
    target: a ``RedirectRefused`` naming the URL, the target and ``RemoteConfig(follow_redirects=...)``.
    Origins are compared with the URL first requested, so a chain through another host back to the first
    one counts as leaving it. Following to another origin (``"any"``), the headers named in
    ``storage_options`` (``headers``, ``client_kwargs["headers"]``), ``Authorization``, ``Cookie`` and
    ``Proxy-Authorization`` are dropped from the request; a session-wide ``client_kwargs["auth"]`` cannot
    be (aiohttp adds it to every hop), so such a redirect is refused.
    """
    import aiohttp
    from yarl import URL

    options = storage_options or {}
    client = options.get("client_kwargs") if isinstance(options.get("client_kwargs"), dict) else {}
    private = _header_names(options.get("headers")) | _header_names(client.get("headers")) | {
        "authorization", "cookie", "proxy-authorization"}
    session_auth = client.get("auth") is not None

    def origin(u: Any) -> tuple[str, str, int | None]:
        return (u.scheme.lower(), (u.host or "").lower(), u.port)

    async def on_start(session: Any, ctx: Any, params: Any) -> None:
        ctx.first = params.url

    async def on_redirect(session: Any, ctx: Any, params: Any) -> None:
        location = params.response.headers.get("Location") or params.response.headers.get("URI")
        if location is None:  # aiohttp stops there and returns the 3xx
            return
        try:
            target = params.url.join(URL(location))
        except ValueError:
            target = None  # aiohttp refuses what is not a URL itself; refused here too, never guessed at
        first = getattr(ctx, "first", params.url)
        same = target is not None and bool(target.host) and origin(target) == origin(first)
        why = None
        if follow == "none":
            why = ("RemoteConfig(follow_redirects='none') follows no redirect; 'same-origin' follows those to the "
                   "same scheme, host and port, 'any' those to other hosts too")
        elif not same and follow == "same-origin":
            why = ("it leaves the origin (scheme, host, port) of the URL requested, and requests carry the headers "
                   "and credentials of storage_options; to follow redirects to other hosts (a CDN), pass "
                   "RemoteConfig(follow_redirects='any'), which sends them without the storage_options headers")
        elif not same and session_auth:
            why = ("storage_options client_kwargs['auth'] is session-wide and aiohttp sends it to every host; pass "
                   "the credentials as storage_options headers, which are dropped on leaving the origin, or "
                   "keep RemoteConfig(follow_redirects='same-origin')")
        if why is not None:
            hop = "" if str(params.url) == str(first) else f" (by way of {str(params.url)!r})"
            raise RedirectRefused(redact(f"{str(first)!r}{hop} redirects ({params.response.status}) to "
                                         f"{location if target is None else str(target)!r}, not followed: {why}",
                                         storage_options))
        if not same:  # "any", to another origin: nothing of ours goes there
            for name in private:
                params.headers.popall(name, None)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_redirect.append(on_redirect)
    return trace


def _one_retry_layer(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with botocore's retries off unless the user configured them: botocore retries a refused
    connection 4 times with backoff and s3fs 5 times more under each of our tries, so a wrong endpoint took
    a minute to fail instead of our documented backoff. Ours is the layer that retries."""
    config = dict(options.get("config_kwargs") or {})
    if "retries" in config:
        return options
    config["retries"] = {"total_max_attempts": 1}
    return {**options, "config_kwargs": config}


def _status(exn: BaseException) -> int | None:
    """HTTP status of an error when it carries one (aiohttp, botocore)."""
    status = getattr(exn, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def is_transient(exn: BaseException) -> bool:
    """Whether another try may succeed: yes for connection errors, timeouts, throttling and 5xx; no for
    403/404, other client errors and programming errors."""
    if isinstance(exn, FileNotFoundError) and exn.__cause__ is not None:
        # fsspec's HTTP info() turns every failure, a refused connection too, into FileNotFoundError.
        return is_transient(exn.__cause__)
    status = _status(exn)
    if status is not None:
        return status in _TRANSIENT_STATUS
    if isinstance(exn, _PERMANENT) or _no_credentials(exn) or _untrusted_certificate(exn):
        return False
    return not (isinstance(exn, ValueError) and not isinstance(exn, OSError))


def _untrusted_certificate(exn: BaseException) -> bool:
    """A server certificate that failed verification (self-signed, expired, another host's): aiohttp's
    ClientConnectorCertificateError, or ssl's SSLCertVerificationError anywhere in the chain. Another try
    meets the same certificate; it was retried 6 times (13 s) as a connection error."""
    seen: set[int] = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        if isinstance(exn, ssl.SSLCertVerificationError) or any(
                c.__name__.endswith("CertificateError") for c in type(exn).__mro__):
            return True
        exn = getattr(exn, "certificate_error", None) or exn.__cause__ or exn.__context__
    return False


def _no_credentials(exn: BaseException) -> bool:
    """botocore's NoCredentialsError / PartialCredentialsError and kin (named, not imported: botocore is
    optional): no credentials were found, which another try cannot change."""
    return any(c.__name__.endswith(("CredentialsError", "CredentialError")) for c in type(exn).__mro__)


def describe(exn: BaseException) -> str:
    """One line for a failed request: ``access denied (403)`` / ``not found (404)`` first when it is one."""
    if isinstance(exn, FileNotFoundError) and exn.__cause__ is not None:
        exn = exn.__cause__
    status = _status(exn)
    what = {403: "access denied (403)", 404: "not found (404)"}.get(status or 0, "")
    if not what and isinstance(exn, FileNotFoundError):
        what = "not found (404)"
    elif not what and isinstance(exn, PermissionError):
        what = "access denied (403)"
    elif not what and _no_credentials(exn):
        what = "no credentials found (pass key/secret in storage_options, or set them as the store's library reads them)"
    text = f"{type(exn).__name__}: {exn}"
    return f"{what}, {text}" if what else text

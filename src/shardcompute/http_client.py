"""The one way to build an HTTP client for a ShardCompute hop (agent, engine, chat client,
benchmarks, `up`): with a CA file, the coordinator's certificate must verify against it.

Plain Python and httpx: the control plane imports this, so it never imports MLX.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from urllib.parse import urlparse

import httpx

from shardcompute.errors import ShardComputeError

# The same name the config uses for security.tls_ca, so one env var serves every tool.
TLS_CA_ENV = "SHARDCOMPUTE_SECURITY__TLS_CA"


class TlsError(ShardComputeError):
    """A CA file that cannot be used, or a peer whose certificate does not verify."""


def default_tls_ca() -> str | None:
    """The CA file named by $SHARDCOMPUTE_SECURITY__TLS_CA, if set."""
    return os.environ.get(TLS_CA_ENV) or None


def client_ssl_context(ca_file: str | Path) -> ssl.SSLContext:
    """A context that trusts only the certificates `ca_file` (PEM) vouches for."""
    path = Path(ca_file).expanduser()
    if not path.is_file():
        raise TlsError(f"TLS CA file {path} does not exist or is not a file")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as e:
        raise TlsError(f"TLS CA file {path} holds no usable PEM certificate: {e}") from None
    except OSError as e:
        raise TlsError(f"cannot read TLS CA file {path}: {e.strerror}") from None


def http_client(
    base_url: str,
    *,
    ca_file: str | Path | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> httpx.Client:
    """A client for `base_url`, sending `token` as a bearer token if given.

    With `ca_file`, https:// URLs verify against it alone; giving a CA with an http:// URL
    is refused, since it would send the token in clear text while looking protected.
    """
    if ca_file is not None and urlparse(base_url).scheme != "https":
        raise TlsError(
            f"a TLS CA ({ca_file}) was given but {base_url} is not https://; "
            "use the coordinator's https:// URL"
        )
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    verify: ssl.SSLContext | bool = client_ssl_context(ca_file) if ca_file else True
    return httpx.Client(base_url=base_url, headers=all_headers, timeout=timeout, verify=verify)


def tls_failure(exc: BaseException, url: str, ca_file: str | Path | None) -> str | None:
    """If `exc` (an httpx error) came from TLS, a sentence saying what failed; else None.

    Retrying cannot fix these, so callers stop and say so rather than retry.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            trust = f"the CA file {ca_file}" if ca_file else "the system's CAs (no --tls-ca given)"
            return (
                f"the certificate of {url} does not verify against {trust}: "
                f"{seen.verify_message or seen.reason}"
            )
        if isinstance(seen, ssl.SSLError):
            return f"TLS with {url} failed: {seen.reason or seen}; is it an https:// server?"
        seen = seen.__cause__ or seen.__context__
    return None


def describe_http_error(exc: httpx.HTTPError, url: str, ca_file: str | Path | None) -> str:
    """What went wrong talking to `url`, for a user: TLS failures and dropped connections
    said plainly."""
    problem = tls_failure(exc, url, ca_file)
    if problem is not None:
        return problem
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the connection to {url} dropped before the answer was complete ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

"""Bearer-token checks: the cluster token on worker routes, the API key on /v1, /cluster and
/openapi.json, the metrics token (else the API key) on /metrics. /health and /ready are open.

Failed attempts are logged at a bounded rate, so nobody can flood the log by guessing.
"""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request

from shardcompute.coordinator.health import Clock
from shardcompute.coordinator.http_errors import Unauthorized
from shardcompute.coordinator.service import Coordinator

log = logging.getLogger("shardcompute.coordinator")


class RateLimitedLog:
    """At most `burst` warnings per `interval` seconds; the rest are counted, and the count is
    logged once the interval is over (at the next warning or `flush`)."""

    def __init__(
        self, logger: logging.Logger, clock: Clock, interval: float = 10.0, burst: int = 5
    ):
        self._log, self._clock = logger, clock
        self.interval, self.burst = interval, burst
        self._window_start = clock()
        self._logged = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Log `message` unless this interval's burst is spent (then only count it)."""
        self.flush()
        if self._logged < self.burst:
            self._logged += 1
            self._log.warning(message, *args)
        else:
            self.suppressed += 1

    def flush(self) -> None:
        """Once the interval is over: log how many were suppressed, and open a new interval."""
        now = self._clock()
        if now - self._window_start < self.interval:
            return
        if self.suppressed:
            self._log.warning(
                "%d more failed authentications in the last %.0fs were not logged",
                self.suppressed,
                now - self._window_start,
            )
        self._window_start, self._logged, self.suppressed = now, 0, 0


def coordinator_of(request: Request) -> Coordinator:
    """The Coordinator this app serves."""
    return request.app.state.coordinator


def auth_failures(request: Request) -> RateLimitedLog:
    """Where this app logs failed authentication."""
    return request.app.state.auth_failures


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_secret(request: Request, expected: str, what: str, code: str) -> None:
    """Raise 401 (and log it, rate-limited) unless the request's bearer token is `expected`."""
    given = bearer_token(request)
    # compare_digest: the time taken must not tell an attacker how much of a guess matched.
    if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
        return
    why = "missing" if given is None else "wrong"
    client = request.client.host if request.client else "unknown"
    auth_failures(request).warning(
        "401 %s %s from %s: %s %s", request.method, request.url.path, client, why, what
    )
    raise Unauthorized(f"{why} {what}: send the header 'Authorization: Bearer <{what}>'", code=code)


async def require_cluster_token(request: Request) -> None:
    """Dependency for routes only workers and engines may call."""
    token = coordinator_of(request).cluster_token
    check_secret(request, token, "cluster token", "invalid_cluster_token")


async def require_api_key(request: Request) -> None:
    """Dependency for /v1, /cluster and /openapi.json; open when no API key is configured."""
    key = coordinator_of(request).config.security.api_key
    if key:
        check_secret(request, key, "API key", "invalid_api_key")


async def require_metrics_token(request: Request) -> None:
    """Dependency for /metrics: the metrics token if one is set, else the API key if set."""
    security = coordinator_of(request).config.security
    if security.metrics_token:
        check_secret(request, security.metrics_token, "metrics token", "invalid_metrics_token")
    elif security.api_key:
        check_secret(request, security.api_key, "API key", "invalid_api_key")

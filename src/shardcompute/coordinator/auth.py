"""Bearer-token checks: the cluster token on worker routes, the API key on /v1 routes."""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request

from shardcompute.coordinator.http_errors import Unauthorized
from shardcompute.coordinator.service import Coordinator

log = logging.getLogger("shardcompute.coordinator")


def coordinator_of(request: Request) -> Coordinator:
    """The Coordinator this app serves."""
    return request.app.state.coordinator


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_secret(request: Request, expected: str, what: str) -> None:
    """Raise 401 (and log it) unless the request carries `expected` as its bearer token."""
    given = bearer_token(request)
    # compare_digest: the time taken must not tell an attacker how much of a guess matched.
    if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
        return
    why = "missing" if given is None else "wrong"
    client = request.client.host if request.client else "unknown"
    log.warning("401 %s %s from %s: %s %s", request.method, request.url.path, client, why, what)
    raise Unauthorized(
        f"{why} {what}: send the header 'Authorization: Bearer <{what}>'",
        code="invalid_api_key" if what == "API key" else "invalid_cluster_token",
    )


async def require_cluster_token(request: Request) -> None:
    """Dependency for routes only workers and engines may call."""
    check_secret(request, coordinator_of(request).cluster_token, "cluster token")


async def require_api_key(request: Request) -> None:
    """Dependency for /v1 routes; open when no API key is configured."""
    key = coordinator_of(request).config.security.api_key
    if key:
        check_secret(request, key, "API key")

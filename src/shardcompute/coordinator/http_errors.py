"""Errors that become an OpenAI-style JSON error body with a 4xx status, never a traceback."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from shardcompute.errors import ShardComputeError

# Retry-After on 429 and 503: a queue slot frees as soon as any request ends; engines take
# seconds to (re)load.
QUEUE_RETRY_SECONDS = "1"
NOT_READY_RETRY_SECONDS = "5"


class ApiError(ShardComputeError):
    """A request that cannot be served; `status` is the HTTP status sent back."""

    status = 400
    type = "invalid_request_error"
    default_headers: dict[str, str] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = {**self.default_headers, **(headers or {})}

    def body(self) -> dict[str, Any]:
        """The error as OpenAI clients expect it: {"error": {message, type, param, code}}."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """The HTTP response carrying this error."""
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorResponse(JSONResponse):
    """JSON in ASCII: an error message quoting a client's text must render whatever it holds."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"
    default_headers = {"WWW-Authenticate": "Bearer"}  # RFC 9110: say which scheme to use


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


class QueueFull(ApiError):
    status, type = 429, "rate_limit_error"
    default_headers = {"Retry-After": QUEUE_RETRY_SECONDS}


class NotReady(ApiError):
    status, type = 503, "service_unavailable"
    default_headers = {"Retry-After": NOT_READY_RETRY_SECONDS}


class EngineFailed(ApiError):
    status, type = 502, "engine_error"


class Timeout(ApiError):
    status, type = 504, "timeout_error"

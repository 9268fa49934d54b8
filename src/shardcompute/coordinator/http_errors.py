"""Errors that become an OpenAI-style JSON error body with a 4xx status, never a traceback."""

from __future__ import annotations

from typing import Any

from shardcompute.errors import ShardComputeError


class ApiError(ShardComputeError):
    """A request that cannot be served; `status` is the HTTP status sent back."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The error as OpenAI clients expect it: {"error": {message, type, param, code}}."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


class QueueFull(ApiError):
    status, type = 429, "rate_limit_error"


class NotReady(ApiError):
    status, type = 503, "service_unavailable"


class EngineFailed(ApiError):
    status, type = 502, "engine_error"


class Timeout(ApiError):
    status, type = 504, "timeout_error"

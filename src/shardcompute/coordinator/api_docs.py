"""The OpenAPI document as the server behaves: the statuses each route really returns (400 for
a bad body, not FastAPI's 422), the shapes of its bodies, SSE and text/plain responses, and
the bearer credentials the configuration asks for. Internal routes are not part of it."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shardcompute.config import SecurityConfig
from shardcompute.coordinator.openai_api import ChatCompletionRequest, CompletionRequest
from shardcompute.protocol import ClusterState

# --- response bodies, for the document (the routes build them as dicts) ----------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, OpenAI's shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    state: ClusterState
    reason: str


# --- responses of each route -----------------------------------------------------------------

_WHY = {
    400: "The request is invalid: the message names the field and the value.",
    401: "The bearer credential is missing or wrong.",
    404: "The model is not served here.",
    429: "The queue is full; retry after Retry-After seconds.",
    500: "A bug in the coordinator (the message names the exception).",
    502: "The engine failed this request.",
    503: "The cluster is not ready (forming, loading or degraded); retry later.",
    504: "The engine did not finish within coordinator.request_timeout_seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
# OpenAPI 3.1: the schema of an event-stream entry describes one event.
_SSE = {
    "schema": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "description": "A chunk as JSON (an error body as JSON if the engine failed "
                "after the first event), then [DONE].",
            },
        },
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Documented error responses, each an OpenAI-style error body."""
    docs: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        docs[status] = {"model": ErrorBody, "description": _WHY[status]}
        if status in (429, 503):
            docs[status]["headers"] = _RETRY_AFTER
    return docs


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The responses of a completion route: JSON or (streamed) SSE, and its errors."""
    ok = {"model": model, "description": "The completion", "content": {"text/event-stream": _SSE}}
    return {200: ok, **errors(400, 404, 429, 500, 502, 503, 504)}


PLAIN_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(500)}


# --- the document ----------------------------------------------------------------------------


def openapi_document(app: FastAPI, security: SecurityConfig, model_id: str) -> dict[str, Any]:
    """The app's OpenAPI document, with FastAPI's 422s removed, the credentials added, and
    `model` naming the one model served (any other is a 404)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemes: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            scheme = _scheme_for(path, security)
            if scheme is not None:
                schemes[scheme] = {"type": "http", "scheme": "bearer"}
                operation["security"] = [{scheme: []}]
                operation["responses"]["401"] = _unauthorized()
    components = doc.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    components["schemas"].update(_exact_request_schemas(model_id))
    if schemes:
        components["securitySchemes"] = schemes
    return doc


def _exact_request_schemas(model_id: str) -> dict[str, Any]:
    """The request bodies' schemas straight from pydantic: FastAPI's document model stores
    bounds as floats, and 2**63 - 1 (the largest seed) does not survive that."""
    models = [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest)]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        top["$defs"][name]["properties"]["model"] = {
            "type": "string",
            "enum": [model_id],
            "description": "The model this cluster serves; any other is a 404.",
        }
    return top["$defs"]


def _scheme_for(path: str, security: SecurityConfig) -> str | None:
    """Which credential a path needs under this configuration (None: open)."""
    if path == "/metrics" and security.metrics_token:
        return "metricsToken"
    if path in ("/metrics", "/cluster") or path.startswith("/v1/"):
        return "apiKey" if security.api_key else None
    return None


def _unauthorized() -> dict[str, Any]:
    return {
        "description": _WHY[401],
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }

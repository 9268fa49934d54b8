"""The OpenAI-compatible /v1 routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from shardcompute.coordinator.api_docs import (
    ChatCompletion,
    ModelList,
    TextCompletion,
    errors,
    generation_responses,
)
from shardcompute.coordinator.auth import coordinator_of, require_api_key
from shardcompute.coordinator.http_errors import ApiError
from shardcompute.coordinator.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    usage,
)
from shardcompute.coordinator.relay import ClientGone, Relay, until_disconnect

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models", responses=errors(500))
async def models(request: Request) -> ModelList:
    """The one model this cluster serves."""
    coordinator = coordinator_of(request)
    card = {"id": coordinator.model_id, "object": "model", "created": 0, "owned_by": "shardcompute"}
    return ModelList(object="list", data=[card])


@router.post(
    "/chat/completions", response_model=None, responses=generation_responses(ChatCompletion)
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """A chat turn; the model's chat template makes the prompt. Without max_tokens, the reply
    may run to the end of the context."""
    return await _serve(body, request, "chat")


@router.post("/completions", response_model=None, responses=generation_responses(TextCompletion))
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Raw-text completion (max_tokens defaults to 16)."""
    return await _serve(body, request, "completions")


async def _serve(
    body: ChatCompletionRequest | CompletionRequest, request: Request, endpoint: str
) -> Response:
    """Queue the request, wait for its first event, then stream or gather the rest."""
    coordinator = coordinator_of(request)
    count = coordinator.metrics.requests
    try:
        response = await _generate(body, request)
    except ApiError as e:
        count.labels(endpoint, "client_error" if e.status < 500 else "server_error").inc()
        raise
    except ClientGone:
        count.labels(endpoint, "cancelled").inc()
        return Response(status_code=499)
    count.labels(endpoint, "ok").inc()
    return response


async def _generate(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    coordinator = coordinator_of(request)
    coordinator.check_model(body.model)
    generation = await coordinator.door.admit(body)  # 400 before it is queued
    relay = Relay(coordinator, await coordinator.queue_request(generation))
    shape = ResponseShape(generation.kind, generation.request_id, coordinator.model_id)
    try:
        first = await until_disconnect(request, relay.next_event())
        if body.stream:
            stream = relay.sse(shape, first, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        out = await until_disconnect(request, relay.collect(first))
    except BaseException:
        coordinator.queue.cancel(generation.request_id)
        raise
    return JSONResponse(
        shape.full(out.text, out.finish_reason, usage(out.prompt_tokens, out.completion_tokens))
    )

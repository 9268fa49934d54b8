"""Routes for worker agents and engines; all need the cluster token."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from shardcompute.coordinator.auth import coordinator_of, require_cluster_token
from shardcompute.coordinator.relay import ClientGone, until_disconnect
from shardcompute.protocol import (
    Ack,
    CancelStatus,
    EventBatch,
    GenerationRequest,
    Heartbeat,
    HeartbeatResponse,
    LoadedReport,
    MetricsReport,
    RegisterRequest,
    RegisterResponse,
    WorkPoll,
)

# Not in the OpenAPI document: a private protocol between our own processes (protocol.py).
router = APIRouter(
    prefix="/internal/v1", dependencies=[Depends(require_cluster_token)], include_in_schema=False
)


@router.post("/workers/register")
async def register(body: RegisterRequest, request: Request) -> RegisterResponse:
    """An agent joins the cluster."""
    return coordinator_of(request).registry.register(body)


@router.post("/workers/{worker_id}/heartbeat")
async def heartbeat(worker_id: str, body: Heartbeat, request: Request) -> HeartbeatResponse:
    """An agent is alive; the reply carries its assignment."""
    return coordinator_of(request).registry.heartbeat(worker_id, body)


@router.post("/workers/{worker_id}/loaded")
async def loaded(worker_id: str, body: LoadedReport, request: Request) -> Ack:
    """An engine loaded its shard and joined its group."""
    coordinator_of(request).registry.mark_loaded(worker_id, body)
    return Ack()


@router.post("/workers/{worker_id}/metrics")
async def metrics(worker_id: str, body: MetricsReport, request: Request) -> Ack:
    """An engine's running totals."""
    coordinator_of(request).registry.update_metrics(worker_id, body.generation, body.metrics)
    return Ack()


@router.post("/work/next", response_model=None)
async def next_work(body: WorkPoll, request: Request) -> GenerationRequest | Response:
    """Long poll: the next request for the rank-0 engine, or 204 after `wait_seconds`."""
    coordinator = coordinator_of(request)
    coordinator.registry.check_rank0(body.worker_id, body.generation)
    try:
        job = await until_disconnect(request, coordinator.queue.take(body.wait_seconds))
    except ClientGone:  # taking a job now would lose it
        return Response(status_code=204)
    return Response(status_code=204) if job is None else job.request


@router.post("/work/{request_id}/events")
async def post_events(request_id: str, body: EventBatch, request: Request) -> CancelStatus:
    """The engine's new events; `cancelled` tells it to stop this request."""
    return CancelStatus(cancelled=coordinator_of(request).queue.post(request_id, body.events))


@router.get("/work/{request_id}/cancelled")
async def cancelled(request_id: str, request: Request) -> CancelStatus:
    """Whether the engine should stop this request."""
    return CancelStatus(cancelled=coordinator_of(request).queue.is_cancelled(request_id))

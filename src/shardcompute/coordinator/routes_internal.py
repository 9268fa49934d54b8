"""Routes for worker agents and engines; all need the cluster token."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from shardcompute.coordinator.auth import coordinator_of, require_cluster_token
from shardcompute.coordinator.relay import ClientGone, until_disconnect
from shardcompute.protocol import (
    Ack,
    CancelledRequests,
    CancelStatus,
    EventPosts,
    FailureReport,
    Heartbeat,
    HeartbeatResponse,
    LoadedReport,
    MetricsReport,
    RegisterRequest,
    RegisterResponse,
    WorkBatch,
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


@router.post("/workers/{worker_id}/failed")
async def failed(worker_id: str, body: FailureReport, request: Request) -> Ack:
    """An engine says it is exiting (its watchdog saw no progress): replace the group now."""
    coordinator_of(request).registry.mark_failed(worker_id, body)
    return Ack()


@router.post("/workers/{worker_id}/metrics")
async def metrics(worker_id: str, body: MetricsReport, request: Request) -> Ack:
    """An engine's running totals."""
    coordinator = coordinator_of(request)
    coordinator.registry.update_metrics(worker_id, body.generation, body.metrics)
    coordinator.metrics.observe_worker(body.metrics)
    return Ack()


@router.post("/work/next")
async def next_work(body: WorkPoll, request: Request) -> WorkBatch:
    """Long poll: up to `max_requests` requests for the rank-0 engine (none after
    `wait_seconds`), and the requests it holds that were cancelled meanwhile."""
    coordinator = coordinator_of(request)
    coordinator.registry.check_rank0(body.worker_id, body.generation)
    queue = coordinator.queue
    try:
        jobs = await until_disconnect(request, queue.take(body.wait_seconds, body.max_requests))
    except ClientGone:  # taking jobs now would lose them
        return WorkBatch()
    return WorkBatch(requests=[j.request for j in jobs], cancelled=queue.take_cancelled())


@router.post("/work/events")
async def post_events(body: EventPosts, request: Request) -> CancelledRequests:
    """The engine's new events for several requests; the ones it should stop."""
    queue = coordinator_of(request).queue
    stop = [p.request_id for p in body.posts if queue.post(p.request_id, p.events)]
    return CancelledRequests(cancelled=stop)


@router.get("/work/{request_id}/cancelled")
async def cancelled(request_id: str, request: Request) -> CancelStatus:
    """Whether the engine should stop this request."""
    return CancelStatus(cancelled=coordinator_of(request).queue.is_cancelled(request_id))

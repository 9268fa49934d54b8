"""The dashboard: a static page (no build step, nothing from a CDN) and its live stream.

The page and its scripts are public, since they hold no data; everything they show comes
from `/dashboard/events` and `/v1`, which need the API key when one is configured.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.staticfiles import StaticFiles

from shardcompute.coordinator.auth import coordinator_of, require_api_key
from shardcompute.coordinator.service import Coordinator
from shardcompute.protocol import Message

PAGE_DIR = Path(__file__).with_name("dashboard")
PUSH_SECONDS = 0.5  # how often the stream sends the cluster; a dead worker shows this fast
# The page loads only its own files and talks only to this origin; nothing inline runs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/dashboard")
async def page() -> FileResponse:
    """The dashboard page."""
    return FileResponse(PAGE_DIR / "index.html", headers=SECURITY_HEADERS)


@router.get("/dashboard/events", dependencies=[Depends(require_api_key)])
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: the traffic history, then the cluster and each new sample."""
    stream = _event_stream(coordinator_of(request))
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _event_stream(coordinator: Coordinator) -> AsyncIterator[str]:
    # Ends when the client goes away: Starlette cancels the generator at its next send.
    traffic = coordinator.traffic
    yield _event("traffic", traffic.since(0))
    seen = traffic.count
    while True:
        coordinator.registry.sweep()
        yield _event("cluster", coordinator.view())
        await asyncio.sleep(PUSH_SECONDS)
        if traffic.count > seen:
            yield _event("traffic", traffic.since(seen))
            seen = traffic.count


def _event(name: str, message: Message) -> str:
    return f"event: {name}\ndata: {message.model_dump_json()}\n\n"


def add_dashboard(app: FastAPI) -> None:
    """Serve the page at / and /dashboard, its files under /dashboard/static."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=PAGE_DIR), name="dashboard-static")

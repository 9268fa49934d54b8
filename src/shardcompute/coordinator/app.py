"""The coordinator's HTTP app: ops routes, error handling and the health sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from shardcompute.coordinator import routes_api, routes_internal
from shardcompute.coordinator.auth import coordinator_of, require_api_key
from shardcompute.coordinator.http_errors import ApiError, error_body
from shardcompute.coordinator.routes_dashboard import add_dashboard
from shardcompute.coordinator.service import Coordinator
from shardcompute.protocol import ClusterView

log = logging.getLogger("shardcompute.coordinator")


def create_app(coordinator: Coordinator) -> FastAPI:
    """An app serving `coordinator`; it sweeps worker health while it runs."""
    app = FastAPI(
        title="ShardCompute coordinator", lifespan=_lifespan, docs_url=None, redoc_url=None
    )
    app.state.coordinator = coordinator
    app.include_router(routes_internal.router)
    app.include_router(routes_api.router)
    _add_ops_routes(app)
    add_dashboard(app)
    _add_error_handlers(app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    coordinator = app.state.coordinator
    tasks = [
        asyncio.create_task(_sweep_forever(coordinator)),
        asyncio.create_task(_sample_traffic_forever(coordinator)),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


async def _sweep_forever(coordinator: Coordinator) -> None:
    # Sweep several times per timeout so a dead worker is noticed promptly.
    period = min(coordinator.config.coordinator.heartbeat_timeout_seconds / 4, 1.0)
    while True:
        await asyncio.sleep(period)
        coordinator.registry.sweep()


async def _sample_traffic_forever(coordinator: Coordinator) -> None:
    while True:
        await asyncio.sleep(coordinator.traffic.interval_seconds)
        coordinator.record_traffic()


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """200 once every rank has loaded and the cluster serves; 503 before and after."""
        registry = coordinator_of(request).registry
        registry.sweep()
        ok = registry.state == "ready"
        body = {"ready": ok, "state": registry.state, "reason": registry.reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/cluster", dependencies=[Depends(require_api_key)])
    async def cluster(request: Request) -> ClusterView:
        """The cluster, its workers and their metrics as JSON."""
        coordinator = coordinator_of(request)
        coordinator.registry.sweep()
        return coordinator.view()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        coordinator = coordinator_of(request)
        coordinator.registry.sweep()
        return Response(coordinator.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500 or exc.status == 409:
            log.warning("%d %s %s: %s", exc.status, request.method, request.url.path, exc)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        body = error_body(
            f"{exc.detail}: {request.method} {request.url.path}", "invalid_request_error"
        )
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(body, status_code=500)


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """A message naming every bad field, and the first field's dotted path."""
    problems, params = [], []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "body"]
        if err["type"] == "json_invalid":
            problems.append(
                f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
            )
            continue
        if not loc and err["type"] in ("model_attributes_type", "dict_type"):
            problems.append(
                "request body must be a JSON object with Content-Type: application/json"
            )
            continue
        param = ".".join(loc) or "body"
        params.append(param)
        problems.append(f"{param}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems), (params[0] if params else None)

"""The coordinator's HTTP app: ops routes, error handling and the health sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from shardcompute.coordinator import routes_api, routes_internal
from shardcompute.coordinator.api_docs import (
    PLAIN_TEXT,
    Health,
    Readiness,
    errors,
    openapi_document,
)
from shardcompute.coordinator.auth import (
    RateLimitedLog,
    coordinator_of,
    require_api_key,
    require_metrics_token,
)
from shardcompute.coordinator.http_errors import ApiError, ErrorResponse, error_body
from shardcompute.coordinator.routes_dashboard import add_dashboard
from shardcompute.coordinator.service import Coordinator
from shardcompute.coordinator.validation import describe_validation
from shardcompute.protocol import ClusterView

log = logging.getLogger("shardcompute.coordinator")


def create_app(coordinator: Coordinator) -> FastAPI:
    """An app serving `coordinator`; it sweeps worker health while it runs."""
    app = FastAPI(
        title="ShardCompute coordinator",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key
    )
    app.state.coordinator = coordinator
    app.state.auth_failures = RateLimitedLog(log, coordinator.clock)
    app.include_router(routes_internal.router)
    app.include_router(routes_api.router)
    _add_ops_routes(app)
    add_dashboard(app)
    _add_openapi_route(app)
    _add_error_handlers(app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(_sweep_forever(app)),
        asyncio.create_task(_sample_traffic_forever(app.state.coordinator)),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


async def _sweep_forever(app: FastAPI) -> None:
    coordinator: Coordinator = app.state.coordinator
    # Sweep several times per timeout so a dead worker is noticed promptly.
    period = min(coordinator.config.coordinator.heartbeat_timeout_seconds / 4, 1.0)
    while True:
        await asyncio.sleep(period)
        coordinator.registry.sweep()
        app.state.auth_failures.flush()  # a flood's count is logged even when it stops


async def _sample_traffic_forever(coordinator: Coordinator) -> None:
    while True:
        await asyncio.sleep(coordinator.traffic.interval_seconds)
        coordinator.record_traffic()


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/health", responses=errors(500))
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    readiness = {"model": Readiness, "description": "Whether the cluster serves"}

    @app.get("/ready", responses={200: readiness, 503: readiness, **errors(500)})
    async def ready(request: Request) -> JSONResponse:
        """200 once every rank has loaded and the cluster serves; 503 before and after."""
        registry = coordinator_of(request).registry
        registry.sweep()
        ok = registry.state == "ready"
        body = {"ready": ok, "state": registry.state, "reason": registry.reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/cluster", dependencies=[Depends(require_api_key)], responses=errors(500))
    async def cluster(request: Request) -> ClusterView:
        """The cluster, its workers and their metrics as JSON."""
        coordinator = coordinator_of(request)
        coordinator.registry.sweep()
        return coordinator.view()

    @app.get(
        "/metrics",
        dependencies=[Depends(require_metrics_token)],
        response_class=PlainTextResponse,
        responses=PLAIN_TEXT,
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        coordinator = coordinator_of(request)
        coordinator.registry.sweep()
        return Response(coordinator.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_openapi_route(app: FastAPI) -> None:
    document: dict = {}

    @app.get("/openapi.json", dependencies=[Depends(require_api_key)], include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        """The OpenAPI document of the public routes (built once)."""
        if not document:
            coordinator = coordinator_of(request)
            security, model_id = coordinator.config.security, coordinator.model_id
            document.update(openapi_document(app, security, model_id))
        return JSONResponse(document)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500 or exc.status == 409:
            log.warning("%d %s %s: %s", exc.status, request.method, request.url.path, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc.errors())
        return ErrorResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own 404/405 (with Allow) and body-parsing errors, in OpenAI's shape.
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code == 400:  # FastAPI could not decode the body at all
            message += ": send a JSON object, encoded as UTF-8"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(message, kind)
        return ErrorResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
        return ErrorResponse(body, status_code=500)

"""An engine's HTTP client for the coordinator's internal routes (no MLX here).

Only a 409 means "your generation is over". A coordinator that is away (connection refused,
or a restarted one that does not know this generation yet: 503 or 404) is waited for: the
caller retries, and the engine keeps its weights.
"""

from __future__ import annotations

import logging
import time

import httpx

from shardcompute.http_client import http_client
from shardcompute.protocol import (
    Assignment,
    CancelledRequests,
    EventPosts,
    FailureReport,
    GenerationEvent,
    LoadedReport,
    MetricsReport,
    RequestEvents,
    WorkBatch,
    WorkerMetrics,
    WorkPoll,
    decode,
)

log = logging.getLogger("shardcompute.engine")

POLL_SECONDS = 1.0  # how long a poll for work waits when none is queued
AWAY_STATUSES = (404, 502, 503, 504)


class GenerationOver(Exception):
    """The coordinator says our generation is no longer current (HTTP 409)."""


class CoordinatorAway(Exception):
    """The coordinator cannot be reached, or does not know this generation yet."""


class QueueClient:
    """Rank 0's work queue, and every rank's reports."""

    def __init__(self, a: Assignment, token: str):
        self.a = a
        self.http = http_client(
            a.coordinator_url.rstrip("/") + "/internal/v1",
            ca_file=a.tls_ca,
            token=token,
            timeout=POLL_SECONDS + 10.0,
            headers={"content-type": "application/json"},
        )

    def post(self, path: str, message) -> httpx.Response:
        try:
            r = self.http.post(path, content=message.model_dump_json())
        except httpx.TransportError as e:
            raise CoordinatorAway(str(e)) from None
        if r.status_code == 409:
            raise GenerationOver(_message(r))
        if r.status_code in AWAY_STATUSES:
            raise CoordinatorAway(f"HTTP {r.status_code}: {_message(r)}")
        r.raise_for_status()
        return r

    def poll(self, max_requests: int, wait_seconds: float = POLL_SECONDS) -> WorkBatch:
        """Up to `max_requests` new requests (waiting up to `wait_seconds`), and cancellations."""
        a = self.a
        poll = WorkPoll(
            worker_id=a.worker_id,
            generation=a.generation,
            wait_seconds=wait_seconds,
            max_requests=max_requests,
        )
        return decode(WorkBatch, self.post("/work/next", poll).content)

    def post_events(self, posts: dict[str, list[GenerationEvent]]) -> set[str]:
        """Post several requests' events at once; the ids that should stop (cancelled, or every
        one of them when the post fails: a coordinator that died took its clients with it)."""
        body = EventPosts(posts=[RequestEvents(request_id=r, events=e) for r, e in posts.items()])
        try:
            return set(decode(CancelledRequests, self.post("/work/events", body).content).cancelled)
        except (httpx.HTTPError, GenerationOver, CoordinatorAway, ValueError) as e:
            log.warning("posting events for %d requests failed: %s; stopping them", len(posts), e)
            return set(posts)

    def metrics(self, metrics: WorkerMetrics) -> None:
        report = MetricsReport(generation=self.a.generation, metrics=metrics)
        try:
            self.post(f"/workers/{self.a.worker_id}/metrics", report)
        except (httpx.HTTPError, GenerationOver, CoordinatorAway) as e:
            log.warning("metrics report failed: %s", e)

    def failed(self, reason: str) -> None:
        """Say this engine is exiting, quickly and at most once; the agent's heartbeat says it
        too if this does not get through."""
        report = FailureReport(generation=self.a.generation, reason=reason)
        try:
            self.http.post(
                f"/workers/{self.a.worker_id}/failed", content=report.model_dump_json(), timeout=2
            )
        except httpx.HTTPError as e:
            log.warning("could not report the failure: %s", e)

    def loaded(self, report: LoadedReport, patience: float = 120.0) -> bool:
        """Report this rank loaded, waiting out a coordinator that is away; False when the
        generation is over (this engine is no longer wanted)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.post(f"/workers/{self.a.worker_id}/loaded", report)
                return True
            except GenerationOver as e:
                log.info("rank %d of generation %d is no longer wanted: %s",
                         self.a.rank, self.a.generation, e)  # fmt: skip
                return False
            except CoordinatorAway as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("the coordinator is away (%s); reporting again", e)
                time.sleep(1.0)


def _message(r: httpx.Response) -> str:
    """The error body's message, else the start of the body."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]

"""The request queue between API clients and the rank-0 engine, which pulls work from it.

A request is pending until the engine takes it, then active until its last event. A client
that goes away cancels it: a pending request leaves the queue, an active one is dropped here
at once and the engine learns it on its next post, so the slot is free either way.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shardcompute.coordinator.health import Clock
from shardcompute.coordinator.http_errors import QueueFull
from shardcompute.protocol import GenerationEvent, GenerationRequest


@dataclass
class Job:
    """One request on its way through the engine; events arrive on `events`."""

    request: GenerationRequest
    created: float
    events: asyncio.Queue[GenerationEvent] = field(default_factory=asyncio.Queue)
    taken_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


EventObserver = Callable[[Job, GenerationEvent, float], None]


class RequestQueue:
    """FIFO of pending jobs plus the set of jobs the engine is working on."""

    def __init__(self, max_pending: int, clock: Clock, observer: EventObserver | None = None):
        self._max_pending = max_pending
        self._clock = clock
        self._observer = observer
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._active: dict[str, Job] = {}
        self._cancelled: set[str] = set()  # active requests cancelled since the engine's poll
        self._arrived = asyncio.Condition()
        self.submitted_total = 0

    @property
    def depth(self) -> int:
        """Requests waiting for the engine."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests the engine has taken and not finished."""
        return len(self._active)

    async def submit(self, request: GenerationRequest) -> Job:
        """Queue a request, or refuse it with 429 when the queue is full."""
        if len(self._pending) >= self._max_pending:
            raise QueueFull(
                f"{len(self._pending)} requests are already queued "
                f"(coordinator.max_queued_requests={self._max_pending}); retry later",
                code="queue_full",
            )
        job = Job(request, created=self._clock())
        self._pending[request.request_id] = job
        self.submitted_total += 1
        async with self._arrived:
            self._arrived.notify_all()
        return job

    async def take(self, wait_seconds: float, most: int = 1) -> list[Job]:
        """Up to `most` of the oldest pending jobs, waiting up to `wait_seconds` for the first
        (none on timeout, or when `most` is 0)."""
        if most <= 0:
            await asyncio.sleep(wait_seconds)
            return []
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: self._pending), wait_seconds)
            except asyncio.TimeoutError:
                return []
            jobs = [self._pending.popitem(last=False)[1] for _ in range(min(most, self.depth))]
        for job in jobs:
            job.taken_at = self._clock()
            self._active[job.request_id] = job
        return jobs

    def take_cancelled(self) -> list[str]:
        """The active requests whose clients went away since the last call."""
        cancelled, self._cancelled = sorted(self._cancelled), set()
        return cancelled

    def post(self, request_id: str, events: list[GenerationEvent]) -> bool:
        """Deliver the engine's events; True when the engine should stop this request."""
        job = self._active.get(request_id)
        if job is None:  # finished, cancelled or failed: the engine must stop
            return True
        now = self._clock()
        for event in events:
            if self._observer is not None:
                self._observer(job, event, now)
            job.events.put_nowait(event)
            if event.finish_reason is not None:
                del self._active[request_id]
                return True
        return False

    def is_cancelled(self, request_id: str) -> bool:
        """Whether the engine should give up on a request it took."""
        return request_id not in self._active

    def cancel(self, request_id: str) -> None:
        """Free the slot of a request whose client went away; the engine learns it at its next
        poll (or event post)."""
        self._pending.pop(request_id, None)
        if self._active.pop(request_id, None) is not None:
            self._cancelled.add(request_id)

    def fail_all(self, message: str) -> None:
        """End every pending and active request with `message` (the cluster lost a rank)."""
        for job in [*self._pending.values(), *self._active.values()]:
            job.events.put_nowait(GenerationEvent(finish_reason="error", error=message))
        self._pending.clear()
        self._active.clear()
        self._cancelled.clear()

"""Relays a job's events to its HTTP client, streamed as SSE or gathered into one body.

Every wait has a deadline (coordinator.request_timeout_seconds) and ends early when the
client disconnects, which cancels the job so its slot is freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from shardcompute.coordinator.http_errors import EngineFailed, Timeout
from shardcompute.coordinator.openai_api import SSE_DONE, ResponseShape, sse, usage
from shardcompute.coordinator.queue import Job
from shardcompute.coordinator.service import Coordinator
from shardcompute.protocol import GenerationEvent

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, raising ClientGone if the client hangs up first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    # The body was already read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Outcome:
    """What a finished generation amounts to."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Relay:
    """Reads one job's events with its deadline, turning engine errors into ApiErrors."""

    def __init__(self, coordinator: Coordinator, job: Job):
        self._coordinator = coordinator
        self.job = job
        self._deadline = job.created + coordinator.config.coordinator.request_timeout_seconds

    async def next_event(self) -> GenerationEvent:
        """The next event, or Timeout once the request's deadline passes."""
        remaining = self._deadline - self._coordinator.clock()
        try:
            event = await asyncio.wait_for(self.job.events.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise Timeout(
                "the engine did not finish within coordinator.request_timeout_seconds="
                f"{self._coordinator.config.coordinator.request_timeout_seconds}",
                code="request_timeout",
            ) from None
        if event.error is not None or event.finish_reason == "error":
            raise EngineFailed(event.error or "the engine failed this request")
        return event

    async def collect(self, first: GenerationEvent) -> Outcome:
        """Read events up to the last one and join their text."""
        parts, event = [first.text], first
        while event.finish_reason is None:
            event = await self.next_event()
            parts.append(event.text)
        return Outcome(
            "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens
        )

    async def sse(
        self, shape: ResponseShape, first: GenerationEvent, include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE chunks from `first` to the last event, then [DONE]; errors become an error
        chunk, since the 200 status has already gone out."""
        try:
            yield shape.chunk(first.text, first.finish_reason, first=True)
            event = first
            while event.finish_reason is None:
                event = await self.next_event()
                if event.text or event.finish_reason:
                    yield shape.chunk(event.text, event.finish_reason)
            if include_usage:
                yield shape.usage_chunk(usage(event.prompt_tokens, event.completion_tokens))
        except (EngineFailed, Timeout) as e:
            yield sse(e.body())
        finally:
            # Runs on completion and on disconnect (Starlette cancels the generator).
            self._coordinator.queue.cancel(self.job.request_id)
        yield SSE_DONE

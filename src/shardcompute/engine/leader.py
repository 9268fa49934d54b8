"""Rank 0's side of the step loop: requests in, plans out, tokens back to their requests.

Other threads hand it requests (`submit`) and stop them (`abort`): the work-queue poller and the
event poster of the serving engine, or `generate` itself. The step loop's thread alone touches
the scheduler, between steps, so a slow HTTP call never holds up a step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from shardcompute.engine.scheduler import Event, Refused, Request, Scheduler
from shardcompute.engine.step_plan import StepPlan

Sink = Callable[[list[Event]], None]


class EngineLeader:
    def __init__(self, scheduler: Scheduler, sink: Sink):
        self.scheduler, self.sink = scheduler, sink
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[tuple[str, str, str | None]] = queue.SimpleQueue()
        self._news = threading.Event()
        self._finish = False

    # --- from any thread ---------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self._inbox.put(request)
        self._news.set()

    def abort(self, request_id: str, reason: str = "cancelled", error: str | None = None) -> None:
        """Stop a request at the next step, ending it with `reason` (and `error`)."""
        self._aborts.put((request_id, reason, error))
        self._news.set()

    def finish(self) -> None:
        """Exit every rank once nothing is left to run."""
        self._finish = True
        self._news.set()

    # --- the step loop's thread --------------------------------------------------------------

    def next_plan(self) -> StepPlan:
        self._take_news()
        if self._finish and self.scheduler.idle:
            return StepPlan(step=self.scheduler.step, kind="exit")
        return self.scheduler.schedule()

    def take_tokens(self, tokens: dict[int, int]) -> None:
        """Tokens chosen in this step, as soon as they are: the requests get them now."""
        events = self.scheduler.update(tokens)
        if events:
            self.sink(events)

    def wait(self, seconds: float) -> None:
        """Idle: sleep up to `seconds`, waking early when a request or an abort comes."""
        self._news.wait(seconds)

    def _take_news(self) -> None:
        self._news.clear()
        events = []
        while not self._inbox.empty():
            request = self._inbox.get()
            try:
                self.scheduler.add(request)
            except Refused as e:
                events.append(Event(request.id, finish_reason="error", error=str(e)))
        while not self._aborts.empty():
            request_id, reason, error = self._aborts.get()
            if self.scheduler.abort(request_id) is not None:
                events.append(Event(request_id, finish_reason=reason, error=error))
        if events:
            self.sink(events)

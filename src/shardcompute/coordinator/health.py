"""Liveness from heartbeats, judged against an injected clock so tests never sleep."""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]


class HealthTracker:
    """Remembers when each worker last beat; a worker silent past `timeout` is dead."""

    def __init__(self, clock: Clock, timeout_seconds: float):
        self._clock = clock
        self._timeout = timeout_seconds
        self._last_beat: dict[str, float] = {}

    def beat(self, worker_id: str) -> None:
        """Record a sign of life from `worker_id` now."""
        self._last_beat[worker_id] = self._clock()

    def forget(self, worker_id: str) -> None:
        """Stop tracking a worker (it was declared dead or left)."""
        self._last_beat.pop(worker_id, None)

    def age(self, worker_id: str) -> float:
        """Seconds since the worker's last beat (infinite for an unknown worker)."""
        last = self._last_beat.get(worker_id)
        return float("inf") if last is None else self._clock() - last

    def expired(self) -> list[str]:
        """Workers whose silence has passed the timeout, oldest first."""
        now = self._clock()
        late = [(t, w) for w, t in self._last_beat.items() if now - t > self._timeout]
        return [w for _, w in sorted(late)]

"""Ends an engine whose step loop stops making progress: a peer is gone or stuck (SIGSTOP, a
hung machine), and MLX's collectives have no timeouts of their own.

Progress is a plan exchanged or a step executed. The allowance is judged against the steps
seen, not a fixed wall time: max(floor, factor x the p99 of the recent intervals between
progress), so a long prefill chunk (which counts as one step) is not a stall, and a stall is
seen within seconds. Before exiting, the engine says why (`on_stall`): its open requests get an
error event and the coordinator marks the cluster degraded at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("shardcompute.engine")

WATCHDOG_EXIT_CODE = 3


class Watchdog:
    def __init__(
        self,
        floor_seconds: float,
        on_stall: Callable[[str], None] = lambda reason: None,
        factor: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.floor, self.factor, self.on_stall, self.clock = floor_seconds, factor, on_stall, clock
        self.intervals: deque[float] = deque(maxlen=2000)
        self.last: float | None = None
        self._thread: threading.Thread | None = None

    def pet(self) -> None:
        """Note progress; the first call starts the watch (all ranks have loaded by then)."""
        now = self.clock()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def allowance(self) -> float:
        """Seconds without progress that count as a stall."""
        if not self.intervals:
            return self.floor
        ordered = sorted(self.intervals)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return max(self.floor, self.factor * p99)

    def stalled(self) -> str | None:
        """Why this engine is stalled, or None."""
        if self.last is None:
            return None
        quiet, allowance = self.clock() - self.last, self.allowance()
        if quiet <= allowance:
            return None
        return (
            f"no progress for {quiet:.1f}s (allowed max({self.floor:g}s, {self.factor:g} x p99 "
            f"step) = {allowance:.1f}s): a peer is gone or stuck"
        )

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.floor / 8))
            reason = self.stalled()
            if reason is None:
                continue
            log.error("%s; exiting", reason)
            try:
                self.on_stall(reason)
            finally:
                logging.shutdown()
                os._exit(WATCHDOG_EXIT_CODE)

"""The dashboard's traffic history: one sample a second, the last 15 minutes, in memory.

Kept on the server so a page opened later still shows what happened before it connected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from shardcompute.coordinator.metrics import Metrics
from shardcompute.coordinator.queue import RequestQueue
from shardcompute.protocol import TrafficHistory, TrafficSample, WorkerView

SAMPLE_SECONDS = 1.0
HISTORY_SECONDS = 15 * 60


class TrafficLog:
    """A ring buffer of samples; `count` grows forever, so a reader can ask for what is new."""

    def __init__(
        self, interval_seconds: float = SAMPLE_SECONDS, history_seconds: float = HISTORY_SECONDS
    ):
        self.interval_seconds = interval_seconds
        self._samples: deque[TrafficSample] = deque(maxlen=int(history_seconds / interval_seconds))
        self.count = 0

    def record(self, sample: TrafficSample) -> None:
        """Keep `sample`, dropping the oldest once the buffer is full."""
        self._samples.append(sample)
        self.count += 1

    def since(self, count: int) -> TrafficHistory:
        """The samples recorded after the first `count` (as many as are still kept)."""
        new = min(max(self.count - count, 0), len(self._samples))
        samples = list(self._samples)[len(self._samples) - new :]
        return TrafficHistory(interval_seconds=self.interval_seconds, samples=samples)


def running_and_waiting(queue: RequestQueue, workers: list[WorkerView]) -> tuple[int, int]:
    """The running batch and the requests waiting for a place in it.

    The engine's counts once rank 0 reports them, else the coordinator's: every request the
    engine took counts as running. The engine reports after its steps, so its counts are
    capped by what the coordinator knows is in flight right now.
    """
    lead = next((w.metrics for w in workers if w.rank == 0 and w.loaded), None)
    in_flight = queue.in_flight
    if lead is None or lead.running == 0:
        return in_flight, queue.depth
    running = min(lead.running, in_flight)
    return running, queue.depth + in_flight - running


def take_sample(
    metrics: Metrics,
    queue: RequestQueue,
    workers: list[WorkerView],
    wall: Callable[[], float] = time.time,
) -> TrafficSample:
    """The traffic now: token rate and latency percentiles over their windows, queue, batch."""
    running, waiting = running_and_waiting(queue, workers)
    ttft_p50, ttft_p90 = metrics.recent_ttft.percentiles(50, 90)
    itl_p50, itl_p90 = metrics.recent_token_latency.percentiles(50, 90)
    return TrafficSample(
        t=round(wall(), 3),
        tokens_per_second=round(metrics.tokens.rate(), 3),
        ttft_p50=ttft_p50,
        ttft_p90=ttft_p90,
        itl_p50=itl_p50,
        itl_p90=itl_p90,
        queue_depth=waiting,
        running=running,
    )

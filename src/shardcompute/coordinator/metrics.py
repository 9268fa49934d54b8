"""Metrics in Prometheus text format: request timings as they happen, worker and cluster
gauges read from the registry and queue at scrape time.

The serving metrics follow vLLM's names under a `shardcompute:` prefix (vLLM's `vllm:`), so
dashboards written for one read the other: num_requests_running / _waiting, kv_cache_usage_perc,
num_preemptions_total, time_to_first_token_seconds, inter_token_latency_seconds,
request_queue_time_seconds, e2e_request_latency_seconds, prompt/generation_tokens_total, and
batch_size (rows decoded per engine step)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shardcompute.coordinator.health import Clock
from shardcompute.coordinator.queue import Job
from shardcompute.protocol import ClusterView, GenerationEvent, WorkerMetrics

CLUSTER_STATES = ("forming", "loading", "ready", "degraded")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class TokenRate:
    """Tokens per second over a sliding window of the injected clock."""

    def __init__(self, clock: Clock, window_seconds: float = 10.0):
        self._clock = clock
        self._window = window_seconds
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        """Count `tokens` produced now."""
        self._samples.append((self._clock(), tokens))

    def rate(self) -> float:
        """Tokens per second averaged over the window."""
        horizon = self._clock() - self._window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        return sum(n for _, n in self._samples) / self._window


class RecentValues:
    """Values observed over a sliding window of the injected clock, for percentiles."""

    def __init__(self, clock: Clock, window_seconds: float = 10.0):
        self._clock = clock
        self._window = window_seconds
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, count: int = 1) -> None:
        """Observe `value` now, `count` times."""
        now = self._clock()
        self._samples.extend((now, value) for _ in range(count))

    def percentiles(self, *qs: float) -> list[float | None]:
        """The nearest-rank percentiles (0-100) of the window; None each when it is empty."""
        horizon = self._clock() - self._window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        if not self._samples:
            return [None] * len(qs)
        values = sorted(v for _, v in self._samples)
        return [values[max(math.ceil(q / 100 * len(values)) - 1, 0)] for q in qs]


class Metrics:
    """Owns a private Prometheus registry, so several coordinators can live in one process."""

    def __init__(self, clock: Clock, view: Callable[[], ClusterView]):
        self.registry = CollectorRegistry()
        self.tokens = TokenRate(clock)
        # Recent latencies for the dashboard's charts (the histograms only ever accumulate).
        self.recent_ttft = RecentValues(clock)
        self.recent_token_latency = RecentValues(clock)
        self.requests = Counter(
            "shardcompute_requests",
            "API requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        r = self.registry
        self.ttft = Histogram(
            "shardcompute:time_to_first_token_seconds",
            "Time from arrival to the first generated text, queueing included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "shardcompute:inter_token_latency_seconds",
            "Time between generated tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "shardcompute:request_queue_time_seconds",
            "Time from arrival to the request's first engine step (coordinator and engine)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "shardcompute:e2e_request_latency_seconds",
            "Time from arrival to the last event of a finished request",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "shardcompute:batch_size",
            "Rows decoded per engine step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "shardcompute:prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "shardcompute:generation_tokens", "Tokens generated", registry=r
        )
        r.register(_ClusterCollector(view))

    def observe_event(self, job: Job, event: GenerationEvent, now: float) -> None:
        """Time a generation event as it reaches the coordinator."""
        if event.queue_seconds is not None and job.taken_at is not None:
            self.queue_time.observe(job.taken_at - job.created + event.queue_seconds)
        if event.finish_reason in ("stop", "length"):
            self.e2e.observe(now - job.created)
            self.prompt_tokens.inc(event.prompt_tokens)
        n = len(event.token_ids) or (1 if event.text else 0)
        if n == 0:
            return
        self.tokens.add(n)
        self.generation_tokens.inc(n)
        if job.first_token_at is None:
            job.first_token_at = now
            self.ttft.observe(now - job.created)
            self.recent_ttft.add(now - job.created)
            n -= 1  # the first token's latency is the TTFT, not an inter-token gap
        elif job.last_token_at is not None:
            gap = (now - job.last_token_at) / n
            for _ in range(n):
                self.token_latency.observe(gap)
            self.recent_token_latency.add(gap, n)
        job.last_token_at = now

    def observe_worker(self, metrics: WorkerMetrics) -> None:
        """An engine's report: the batch size of each step it ran since its last one."""
        for size in metrics.batch_sizes:
            self.batch_size.observe(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    """Gauges computed from the cluster view each time /metrics is scraped."""

    def __init__(self, view: Callable[[], ClusterView]):
        self._view = view

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        v = self._view()
        state = GaugeMetricFamily(
            "shardcompute_cluster_state", "1 for the current cluster state", labels=["state"]
        )
        for name in CLUSTER_STATES:
            state.add_metric([name], float(v.state == name))
        yield state
        yield GaugeMetricFamily("shardcompute_cluster_generation", "", value=v.generation)
        alive = sum(w.alive for w in v.workers)
        yield GaugeMetricFamily("shardcompute_workers_alive", "Live workers", value=alive)
        yield GaugeMetricFamily("shardcompute_queue_depth", "Queued requests", value=v.queue_depth)
        yield GaugeMetricFamily("shardcompute_requests_in_flight", "", value=v.in_flight)
        yield GaugeMetricFamily(
            "shardcompute_tokens_per_second", "Over the last 10 s", value=v.tokens_per_second
        )
        yield from _scheduler_families(v)
        yield from _worker_families(v)


def _scheduler_families(v: ClusterView) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """vLLM's scheduler gauges, from rank 0's latest report (the scheduler lives there)."""
    m = next((w.metrics for w in v.workers if w.rank == 0), WorkerMetrics())
    yield GaugeMetricFamily(
        "shardcompute:num_requests_running", "Requests in the running batch", value=m.running
    )
    yield GaugeMetricFamily(
        "shardcompute:num_requests_waiting",
        "Requests waiting: queued at the coordinator, or taken by the engine and not admitted",
        value=v.queue_depth + m.waiting,
    )
    usage = m.kv_tokens_used / m.kv_tokens_total if m.kv_tokens_total else 0.0
    yield GaugeMetricFamily(
        "shardcompute:kv_cache_usage_perc", "KV-cache positions allocated, of the budget",
        value=usage,
    )  # fmt: skip
    yield CounterMetricFamily(
        "shardcompute:num_preemptions", "Requests preempted for KV space", value=m.preemptions
    )


def _worker_families(v: ClusterView) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    labels = ["worker_id", "rank", "host"]
    families = {
        "alive": GaugeMetricFamily(
            "shardcompute_worker_alive", "1 while heartbeating", labels=labels
        ),
        "since": GaugeMetricFamily(
            "shardcompute_worker_seconds_since_heartbeat", "", labels=labels
        ),
        "memory": GaugeMetricFamily("shardcompute_worker_memory_bytes", "", labels=labels),
        "peak": GaugeMetricFamily("shardcompute_worker_peak_memory_bytes", "", labels=labels),
        "tokens": CounterMetricFamily("shardcompute_worker_tokens_processed", "", labels=labels),
        "coll": CounterMetricFamily(
            "shardcompute_worker_collective_seconds",
            "Time in collectives during the sampled decode steps",
            labels=labels,
        ),
        "sampled": CounterMetricFamily(
            "shardcompute_worker_profiled_steps",
            "Decode steps sampled with their collectives timed",
            labels=labels,
        ),
        "sampled_s": CounterMetricFamily(
            "shardcompute_worker_profiled_step_seconds",
            "Wall time of the sampled decode steps",
            labels=labels,
        ),
        "steps": CounterMetricFamily("shardcompute_worker_steps", "Engine steps", labels=labels),
    }
    for w in v.workers:
        key = [w.worker_id, "" if w.rank is None else str(w.rank), w.facts.host]
        m = w.metrics
        families["alive"].add_metric(key, float(w.alive))
        families["since"].add_metric(key, w.seconds_since_heartbeat)
        families["memory"].add_metric(key, m.memory_bytes)
        families["peak"].add_metric(key, m.peak_memory_bytes)
        families["tokens"].add_metric(key, m.tokens_processed)
        families["coll"].add_metric(key, m.collective_seconds)
        families["sampled"].add_metric(key, m.profiled_steps)
        families["sampled_s"].add_metric(key, m.profiled_step_seconds)
        families["steps"].add_metric(key, m.steps)
    yield from families.values()

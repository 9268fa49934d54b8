"""What the dashboard shows, computed without a browser or a server: engine restarts, the plan
in the cluster view, latency percentiles, the traffic ring buffer and the running batch.
A fake clock drives every window; nothing sleeps."""

from dataclasses import dataclass

import pytest
from test_registry import FakeClock, join, make_registry

from shardcompute.config import load_config
from shardcompute.coordinator.metrics import Metrics, RecentValues
from shardcompute.coordinator.queue import Job
from shardcompute.coordinator.service import Coordinator
from shardcompute.coordinator.traffic import TrafficLog, running_and_waiting, take_sample
from shardcompute.protocol import (
    GenerationEvent,
    GenerationRequest,
    Heartbeat,
    LoadedReport,
    TrafficSample,
    WorkerMetrics,
)

PLAN = {"world_size": 2, "weights": [1.0, 1.0], "ranks": [{"rank": 0}, {"rank": 1}]}


def test_engine_restarts_count_each_new_engine_after_the_first():
    reg, _, _ = make_registry()
    w0, w1 = join(reg), join(reg)
    for worker_id in (w0, w1):  # the first engines: no restart
        reg.heartbeat(worker_id, Heartbeat(generation=1, engine_state="running"))
    reg.mark_loaded(w0, LoadedReport(generation=1, rank=0))
    reg.heartbeat(w0, Heartbeat(generation=1, engine_state="exited", engine_exit_code=1))
    assert reg.generation == 2  # re-formed: both agents start new engines
    reg.mark_loaded(w1, LoadedReport(generation=2, rank=1))  # may come before the heartbeat
    for worker_id in (w0, w1):
        reg.heartbeat(worker_id, Heartbeat(generation=2, engine_state="running"))
    assert [v.engine_restarts for v in reg.worker_views()] == [1, 1]


def coordinator() -> tuple[Coordinator, FakeClock]:
    clock = FakeClock()
    config = load_config(None, {"parallelism.tensor_parallel_size": 2}, env={})
    return Coordinator(config, "token", clock), clock


def test_the_view_carries_the_current_generations_plan_and_dtype():
    coord, _ = coordinator()
    reg = coord.registry
    w0, w1 = join(reg), join(reg)
    assert coord.view().plan is None and coord.view().dtype == "auto"
    report = dict(plan=PLAN, collectives_per_token=62, dtype="float32")
    reg.mark_loaded(w1, LoadedReport(generation=1, rank=1, **report))
    view = coord.view()
    assert (view.plan, view.collectives_per_token, view.dtype) == (PLAN, 62, "float32")
    assert (view.backend, view.heartbeat_timeout_seconds) == ("ring", 10.0)
    reg.heartbeat(w0, Heartbeat(generation=1, engine_state="exited"))  # generation 2 forms
    assert coord.view().plan is None, "a plan of an earlier generation is not the cluster's"


def test_recent_values_percentiles_over_the_window():
    clock = FakeClock()
    values = RecentValues(clock, window_seconds=10)
    assert values.percentiles(50, 90) == [None, None]
    for v in (0.4, 0.1, 0.3, 0.2):
        values.add(v)
    values.add(1.0, count=6)
    assert values.percentiles(0, 30, 40, 50, 90) == [0.1, 0.3, 0.4, 1.0, 1.0]
    clock.advance(10.5)
    assert values.percentiles(50) == [None]


def job(clock: FakeClock) -> Job:
    request = GenerationRequest(request_id="r", kind="completion", prompt="p", max_tokens=9)
    return Job(request, created=clock())


def test_a_sample_takes_rate_and_latencies_from_the_events():
    clock = FakeClock()
    metrics = Metrics(clock, view=lambda: None)
    j = job(clock)
    clock.advance(0.5)
    metrics.observe_event(j, GenerationEvent(text="a", token_ids=[1]), clock())  # TTFT 0.5
    for _ in range(3):
        clock.advance(0.1)
        metrics.observe_event(j, GenerationEvent(text="b", token_ids=[2]), clock())
    sample = take_sample(metrics, FakeQueue(in_flight=1, depth=2), [], wall=lambda: 1234.5)
    assert (sample.t, sample.tokens_per_second) == (1234.5, 0.4)  # 4 tokens over 10 s
    assert (sample.ttft_p50, sample.ttft_p90) == (0.5, 0.5)
    assert sample.itl_p50 == pytest.approx(0.1)
    assert (sample.running, sample.queue_depth) == (1, 2)


@dataclass
class FakeQueue:
    in_flight: int = 0
    depth: int = 0


@dataclass
class FakeWorker:
    rank: int | None
    loaded: bool
    metrics: WorkerMetrics


@pytest.mark.parametrize(
    "engine_running, in_flight, depth, expected",
    [
        (None, 3, 1, (3, 1)),  # no engine report: whatever the engine took is running
        (0, 2, 0, (2, 0)),  # the engine does not fill `running` yet
        (2, 3, 1, (2, 2)),  # one request the engine took waits for a place in the batch
        (4, 0, 0, (0, 0)),  # a stale report after the batch drained
    ],
)
def test_running_batch_prefers_the_engines_count(engine_running, in_flight, depth, expected):
    workers = [FakeWorker(1, True, WorkerMetrics(running=9))]  # only rank 0 schedules
    if engine_running is not None:
        workers.append(FakeWorker(0, True, WorkerMetrics(running=engine_running)))
    assert running_and_waiting(FakeQueue(in_flight, depth), workers) == expected


def sample(t: float) -> TrafficSample:
    return TrafficSample(t=t, tokens_per_second=t, queue_depth=0, running=0)


def test_traffic_log_keeps_the_last_horizon_and_serves_what_is_new():
    log = TrafficLog(interval_seconds=1, history_seconds=5)
    assert log.since(0).samples == [] and log.since(0).interval_seconds == 1
    for t in range(3):
        log.record(sample(t))
    assert [s.t for s in log.since(0).samples] == [0, 1, 2]
    assert [s.t for s in log.since(2).samples] == [2] and log.since(3).samples == []
    for t in range(3, 8):
        log.record(sample(t))
    assert [s.t for s in log.since(0).samples] == [3, 4, 5, 6, 7]  # the oldest fell out
    assert [s.t for s in log.since(6).samples] == [6, 7]

"""Every message crossing a process boundary survives a JSON round trip, and bad ones are
refused with the field named."""

import inspect
import json

import pytest

from shardcompute import protocol as p

FACTS = p.DeviceFacts(
    host="h", platform="Linux", cpu="x", cpu_count=2, memory_bytes=8, mlx_device="Device(cpu, 0)"
)
METRICS = p.WorkerMetrics(memory_bytes=5, tokens_processed=7, collective_seconds=0.5, steps=3)
ASSIGNMENT = p.Assignment(
    generation=2,
    worker_id="w1",
    rank=1,
    world_size=2,
    hostfile=["10.0.0.1:29500", "10.0.0.2:29501"],
    plan_weights=[2.0, 1.0],
    model_name="smollm2-135m",
    coordinator_url="http://c:8000",
)
WORKER = p.WorkerView(
    worker_id="w1",
    rank=0,
    alive=True,
    engine_state="running",
    loaded=True,
    address="10.0.0.1",
    seconds_since_heartbeat=0.1,
    facts=FACTS,
    metrics=METRICS,
    agent_pid=41,
    engine_pid=42,
)

SAMPLES = [
    p.RegisterRequest(facts=FACTS, address="10.0.0.1", requested_rank=0, collective_port=1234),
    # Registering again after a coordinator restart: the engine's assignment, loaded.
    p.RegisterRequest(
        facts=FACTS,
        address="10.0.0.2",
        worker_id="w1",
        running=ASSIGNMENT.model_copy(update={"tls_ca": "/etc/shardcompute/ca.pem"}),
        loaded=True,
    ),
    p.RegisterResponse(
        worker_id="w1",
        heartbeat_interval_seconds=1,
        heartbeat_timeout_seconds=3,
        cluster_state="forming",
    ),
    p.Heartbeat(generation=2, engine_state="exited", engine_exit_code=-9, metrics=METRICS),
    p.Heartbeat(generation=2, engine_state="running", engine_pid=4242),
    ASSIGNMENT,
    p.HeartbeatResponse(cluster_state="loading", assignment=ASSIGNMENT),
    p.HeartbeatResponse(cluster_state="ready", assignment=ASSIGNMENT, loaded=True),
    p.LoadedReport(generation=2, rank=1, load_seconds=1.5, metrics=METRICS),
    p.LoadedReport(
        generation=2,
        rank=0,
        metrics=METRICS.model_copy(update=dict(running=3, waiting=1, kv_tokens_used=9)),
        plan={"world_size": 2, "weights": [2.0, 1.0], "ranks": [{"rank": 0, "heads": [0, 6]}]},
        collectives_per_token=62,
        dtype="float32",
        kv_budget=4096,
    ),
    p.MetricsReport(generation=2, metrics=METRICS),
    p.Ack(),
    p.WorkPoll(worker_id="w1", generation=2, wait_seconds=5, max_requests=6),
    p.WorkBatch(
        requests=[p.GenerationRequest(request_id="r", kind="completion", prompt="p", max_tokens=2)],
        cancelled=["r0"],
    ),
    p.FailureReport(generation=2, reason="no progress for 9.1s"),
    p.GenerationRequest(
        request_id="r",
        kind="chat",
        max_tokens=8,
        stop=["\n"],
        seed=3,
        messages=[p.ChatMessage(role="user", content="hé")],
        stream=True,
    ),
    p.GenerationRequest(
        request_id="r",
        kind="completion",
        prompt="once",
        prompt_ids=[12, 0, 49151],
        max_tokens=1,
        temperature=0,
        top_k=40,
        top_p=0.9,
    ),
    p.EventPosts(
        posts=[
            p.RequestEvents(
                request_id="a",
                events=[
                    p.GenerationEvent(text="a", token_ids=[1]),
                    p.GenerationEvent(finish_reason="length", prompt_tokens=3, completion_tokens=2),
                ],
            ),
            p.RequestEvents(
                request_id="b", events=[p.GenerationEvent(finish_reason="error", error="boom")]
            ),
        ]
    ),
    p.CancelledRequests(cancelled=["b"]),
    p.CancelStatus(cancelled=True),
    p.ClusterView(
        state="ready",
        reason="ok",
        generation=1,
        world_size=1,
        model="m",
        plan_weights=[1.0],
        hostfile=["h:1"],
        workers=[WORKER],
        queue_depth=0,
        in_flight=0,
        requests_total=3,
        tokens_per_second=1.5,
        dtype="float32",
        plan={"world_size": 1, "weights": [1.0], "ranks": []},
        collectives_per_token=4,
        coordinator_pid=40,
    ),
    p.TrafficHistory(
        interval_seconds=1.0,
        samples=[
            p.TrafficSample(t=1.5, tokens_per_second=0, queue_depth=0, running=0),
            p.TrafficSample(
                t=2.5, tokens_per_second=9, ttft_p50=0.2, itl_p90=0.05, queue_depth=1, running=2
            ),
        ],
    ),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    wire = msg.model_dump_json()
    assert json.loads(wire)["version"] == p.PROTOCOL_VERSION
    assert p.decode(type(msg), wire) == msg
    assert p.decode(type(msg), wire.encode()) == msg
    assert p.decode(type(msg), json.loads(wire)) == msg


def test_every_message_has_a_sample():
    messages = {
        cls
        for _, cls in inspect.getmembers(p, inspect.isclass)
        if issubclass(cls, p.Message) and cls is not p.Message
    }
    assert messages == {type(m) for m in SAMPLES}


def test_other_version_is_refused_with_both_versions():
    wire = json.loads(p.Ack().model_dump_json())
    wire["version"] = 99
    with pytest.raises(p.ProtocolError, match=f"version: .*99.*speaks {p.PROTOCOL_VERSION}"):
        p.decode(p.Ack, wire)


COMPLETION = {"request_id": "r", "kind": "completion", "prompt": "x", "max_tokens": 4}


@pytest.mark.parametrize(
    "cls, data, field",
    [
        (p.WorkPoll, {"worker_id": "w", "generation": 1, "wait_seconds": -1}, "wait_seconds"),
        (p.WorkPoll, {"worker_id": "w", "generation": 1, "typo": 1}, "typo"),
        (p.GenerationRequest, {"request_id": "r", "kind": "chat", "max_tokens": 4}, "messages"),
        (p.GenerationRequest, {"request_id": "r", "kind": "poem", "max_tokens": 4}, "kind"),
        (p.GenerationRequest, {**COMPLETION, "seed": -1}, "seed"),
        (p.GenerationRequest, {**COMPLETION, "seed": p.MAX_SEED + 1}, "seed"),
        (p.GenerationRequest, {**COMPLETION, "prompt_ids": [3, -1]}, "prompt_ids.1"),
        (p.Heartbeat, {"engine_state": "sleepy"}, "engine_state"),
        (p.Assignment, {**ASSIGNMENT.model_dump(), "rank": 2}, "world_size=2"),
    ],
)
def test_bad_messages_name_the_field(cls, data, field):
    with pytest.raises(p.ProtocolError, match=f"bad {cls.__name__}: .*{field}"):
        p.decode(cls, data)


def test_not_json_is_a_protocol_error():
    with pytest.raises(p.ProtocolError, match="bad Ack"):
        p.decode(p.Ack, b"{not json")

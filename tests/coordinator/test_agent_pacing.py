"""The agent's pace, with a real engine child but the coordinator's replies stubbed: an engine
that exits is reported at once, not a heartbeat interval later; and while the cluster
re-forms, the agent beats often enough to pick up a new generation promptly."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from shardcompute.protocol import Assignment, HeartbeatResponse
from shardcompute.worker.agent import Agent, AgentSettings

INTERVAL = 60.0  # the heartbeat interval under test: far longer than any wait below


def assignment(generation: int = 1) -> Assignment:
    return Assignment(
        generation=generation,
        worker_id="w1",
        rank=0,
        world_size=1,
        hostfile=["127.0.0.1:1"],
        plan_weights=[1.0],
        model_name="dummy:tiny",
        coordinator_url="http://127.0.0.1:1",
    )


@pytest.fixture
def agent(tmp_path):
    # An "engine" that lives 0.3 s (the appended --assignment PATH goes to its argv).
    engine = [sys.executable, "-c", "import time; time.sleep(0.3)"]
    settings = AgentSettings(
        coordinator_url="http://127.0.0.1:1",
        cluster_token="t",
        address="127.0.0.1",
        engine_command=engine,
        mlx_probe=False,
    )
    a = Agent(settings, tmp_path)
    a.interval = INTERVAL
    yield a
    a.engine.stop(grace_seconds=0)


def test_an_engine_that_exits_ends_the_pause_at_once(agent):
    agent.engine.start(assignment())
    start = time.monotonic()
    agent._pause(INTERVAL, threading.Event())
    waited = time.monotonic() - start
    assert agent.engine.state()[0] == "exited"
    assert waited < INTERVAL / 4, f"the pause went on {waited:.1f}s after the engine exited"


def test_a_pause_with_nothing_to_report_lasts_its_time(agent):
    agent.engine.start(assignment())
    agent.engine.stop(grace_seconds=0)  # idle: nothing can change
    start = time.monotonic()
    agent._pause(0.4, threading.Event())
    assert time.monotonic() - start >= 0.4


@pytest.mark.parametrize(
    "state, steady", [("ready", True), ("loading", False), ("degraded", False)]
)
def test_a_cluster_that_is_not_ready_asks_for_the_next_beat_soon(agent, monkeypatch, state, steady):
    reply = HeartbeatResponse(cluster_state=state, assignment=None)
    monkeypatch.setattr(agent, "_call", lambda *a: reply)
    agent.worker_id = "w1"
    assert agent.beat() is steady


def test_unsteady_beats_follow_each_other_within_the_retry_time(agent, monkeypatch):
    stop, beats = threading.Event(), []

    def beat() -> bool:
        beats.append(time.monotonic())
        if len(beats) == 3:
            stop.set()
        return False  # e.g. the cluster is loading

    monkeypatch.setattr(agent, "register", lambda: None)
    monkeypatch.setattr(agent, "beat", beat)
    agent.run(stop)
    assert len(beats) == 3 and beats[-1] - beats[0] < INTERVAL / 4

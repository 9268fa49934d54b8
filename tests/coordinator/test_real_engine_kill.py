"""kill -9 on rank 1 of a real-engine cluster in the middle of a streamed request: first its
engine, then its agent. Either way the request ends at once with an error naming the lost
rank, nothing is left hanging, and the cluster comes back in a new generation that answers
as before."""

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
from local_cluster import REAL_MODEL, LocalCluster, real_agent_command, start_real_cluster, wait_for

COLLECTIVE_TIMEOUT = 8  # the engine's watchdog floor: seconds without progress before it exits
LOST_RANK = ("lost a rank", "peer was lost")


def complete(cluster: LocalCluster) -> str:
    body = {"model": REAL_MODEL, "prompt": "The capital of France is", "max_tokens": 8}
    r = httpx.post(cluster.url + "/v1/completions", json=body | {"temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_and_kill(cluster: LocalCluster, pid: int) -> dict:
    """Stream a long completion, kill -9 `pid` after two chunks; the error chunk that ends it."""
    body = {"model": REAL_MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    chunks = []
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # each read waits at most the timeout: never a hang
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
                if len(chunks) == 2:
                    os.kill(pid, signal.SIGKILL)
    assert "error" in chunks[-1], chunks[-1]
    return chunks[-1]["error"]


def child_of(pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10)
    return int(out.stdout.split()[0])


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def ready_generation(cluster: LocalCluster) -> int:
    view = cluster.cluster()
    return view["generation"] if view["state"] == "ready" else 0


def test_rank1_killed_mid_request_fails_it_and_the_cluster_recovers(tmp_path, smollm2_gguf):
    timeout = {"SHARDCOMPUTE_WORKER__STALL_SECONDS": str(COLLECTIVE_TIMEOUT)}
    cluster = start_real_cluster(tmp_path, smollm2_gguf, **timeout)
    try:
        answer = complete(cluster)
        agent1 = cluster.procs["agent1"].pid

        # The engine alone: its agent reports it exited and runs the next generation's.
        generation = cluster.cluster()["generation"]
        error = stream_and_kill(cluster, child_of(agent1))
        assert error["type"] == "engine_error" and any(s in error["message"] for s in LOST_RANK)
        wait_for(lambda: ready_generation(cluster) > generation, 90, "a new ready generation")
        assert complete(cluster) == answer

        # The agent: its engine dies with it, the coordinator misses its heartbeats, and
        # rank 0, whose peer is gone, exits (raising, or by its watchdog if the ring waits).
        # (Its agent may start the next generation's engine at once, which waits for the
        # lost peer until the coordinator notices it is gone: watch the process, not /cluster.)
        engine0, engine1 = child_of(cluster.procs["agent0"].pid), child_of(agent1)
        error = stream_and_kill(cluster, agent1)
        assert any(s in error["message"] for s in LOST_RANK), error
        wait_for(lambda: not running(engine1), 10, "the engine to die with its agent")
        cluster.wait_state("degraded", 10)
        wait_for(lambda: not running(engine0), 4 * COLLECTIVE_TIMEOUT, "rank 0's engine to exit")
        cluster.spawn("agent1-replacement", real_agent_command(cluster.url, 1))
        cluster.wait_state("ready", 90)
        assert complete(cluster) == answer
    finally:
        cluster.stop()

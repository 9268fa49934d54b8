"""Heartbeat loss with short timeouts: the worker is declared dead, the cluster degraded,
/ready 503, and metrics say so; a returning or replacement worker makes it ready again."""

import os
import signal
import threading

import httpx
from local_cluster import start_cluster, wait_for

MODEL = "smollm2-135m"


def test_heartbeat_loss_degrades_then_recovers(tmp_path):
    cluster = start_cluster(tmp_path)
    try:
        agent = cluster.procs["agent1"]
        os.kill(agent.pid, signal.SIGSTOP)  # the agent is frozen: no more heartbeats
        try:
            view = cluster.wait_state("degraded", 10)
            assert "rank 1" in view["reason"] and "missed heartbeats" in view["reason"]
            ready = httpx.get(cluster.url + "/ready")
            assert ready.status_code == 503 and ready.json()["state"] == "degraded"
            metrics = httpx.get(cluster.url + "/metrics").text
            assert 'shardcompute_cluster_state{state="degraded"} 1.0' in metrics
            assert 'rank="1",worker_id="' in metrics and "shardcompute_workers_alive 1.0" in metrics
            dead = next(w for w in view["workers"] if w["rank"] == 1)
            assert not dead["alive"]
            assert (
                f'shardcompute_worker_alive{{host="{dead["facts"]["host"]}",rank="1",'
                f'worker_id="{dead["worker_id"]}"}} 0.0' in metrics
            )
            r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "cluster_not_ready"
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        view = cluster.wait_state("ready", 20)  # it registers again and the group re-forms
        assert view["generation"] == 2
        r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "back"})
        assert r.json()["choices"][0]["text"] == "kcab"
    finally:
        cluster.stop()


def test_worker_killed_mid_request_fails_that_request_promptly(tmp_path):
    cluster = start_cluster(tmp_path, token_delay=0.01)
    try:
        result = {}

        def long_request():
            body = {"model": MODEL, "prompt": "y" * 3000, "max_tokens": 3000}
            result["r"] = httpx.post(cluster.url + "/v1/completions", json=body, timeout=30)

        thread = threading.Thread(target=long_request)
        thread.start()
        wait_for(lambda: cluster.cluster()["in_flight"] == 1, 10, "the request to start")
        os.killpg(cluster.procs["agent1"].pid, signal.SIGKILL)  # agent and its engine
        thread.join(15)
        assert not thread.is_alive()
        r = result["r"]
        assert r.status_code == 502 and "missed heartbeats" in r.json()["error"]["message"]
        assert cluster.cluster()["state"] == "degraded"
        cluster.start_agent("replacement")
        assert cluster.wait_state("ready", 20)["generation"] == 2
    finally:
        cluster.stop()

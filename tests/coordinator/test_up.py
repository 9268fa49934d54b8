"""`shardcompute up` starts a working local cluster, and leaves no process behind: after
SIGINT, and after answering --prompt with the real engine."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from local_cluster import FAKE_ENGINE

from processes import (
    Processes,
    alive,
    chat_replies,
    descendants,
    free_port,
    wait_for,
)

QUESTION = "What is the capital of France?"
MAX_TOKENS = 16


def test_up_serves_then_sigint_stops_everything(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "shardcompute.coordinator.up", "--workers", "2", "--port",
           str(port), "--engine-command", f"{sys.executable} {FAKE_ENGINE}", "--log-dir",
           str(tmp_path), "--ready-timeout", "30"]  # fmt: skip
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any(x.startswith("ready:") for x in lines):
            lines.append(up.stdout.readline())
            assert lines[-1] or up.poll() is None, "".join(lines)
        assert f"ready: http://127.0.0.1:{port}/v1" in "".join(lines)
        assert up.stdout.readline().strip() == f"dashboard: http://127.0.0.1:{port}/"
        assert "<title>ShardCompute</title>" in httpx.get(f"http://127.0.0.1:{port}/").text
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "smollm2-135m", "prompt": "up"},
            timeout=10,
        )
        assert r.json()["choices"][0]["text"] == "pu"

        def all_started():
            found = descendants(up.pid)
            return found if len(found) >= 5 else None

        procs = wait_for(all_started, 10, "coordinator, 2 agents and 2 engines")
        os.kill(up.pid, signal.SIGINT)
        start = time.monotonic()
        assert up.wait(10) == 0
        wait_for(
            lambda: not any(alive(p) for p in procs),
            10 - (time.monotonic() - start),
            "every child to exit",
        )
        assert "stopping" in up.stdout.read()
    finally:
        if up.poll() is None:  # a failed assertion: still let up clean up its children
            up.send_signal(signal.SIGINT)
            try:
                up.wait(10)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(5)


def test_up_prompt_answers_like_the_dense_model_then_stops(tmp_path, greedy_chat_reply):
    expected = greedy_chat_reply(QUESTION, MAX_TOKENS)
    procs = Processes(tmp_path)
    cmd = [sys.executable, "-m", "shardcompute.coordinator.up", "--workers", "2", "--port",
           str(free_port()), "--prompt", QUESTION, "--max-tokens", str(MAX_TOKENS),
           "--log-dir", str(tmp_path / "up-logs"), "--ready-timeout", "120"]  # fmt: skip
    try:
        output = procs.run("up", cmd, timeout=180)  # asserts exit code 0
        assert chat_replies(output) == [expected], output
        assert "ready: http://127.0.0.1:" in output and "stopping" in output
        wait_for(lambda: not procs.leftovers(), 5, "every child of up to exit")
    finally:
        procs.stop()


def test_up_refuses_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "shardcompute.coordinator.up", "--port", str(port),
               "--prompt", QUESTION]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in out.stdout

"""`shardcompute up` starts a working local cluster, and SIGINT leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from local_cluster import FAKE_ENGINE, free_port, wait_for


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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

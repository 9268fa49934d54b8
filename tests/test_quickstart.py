"""The README's quick start, run as written, each command a real process on loopback:
download, shard, coordinator, two workers, one chat turn, a benchmark.

The commands are read from README.md, so the two cannot drift. The test swaps in its own
interpreter, free ports, a temp shard dir, and fewer, shorter requests."""

import json
import secrets
import shlex
import sys
from pathlib import Path

import httpx

from processes import Processes, chat_replies, child_env, free_port, wait_for
from shardcompute.model.download import CACHE_ENV, cache_dir
from shardcompute.protocol import CLUSTER_TOKEN_ENV

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quick start (cluster, step by step)"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


def quickstart_commands() -> list[list[str]]:
    """The command lines of the section's first bash block, split as a shell would."""
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def localized(argv: list[str], **flags: object) -> list[str]:
    """`argv` run by this interpreter, with each `--flag`'s value set (appended if absent)."""
    programs = {
        "python": [sys.executable],
        "shardcompute": [sys.executable, "-m", "shardcompute.cli"],
    }
    out = [*programs[argv[0]], *argv[1:]]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_readme_quickstart_runs_as_written(tmp_path, smollm2_gguf, greedy_chat_reply):
    download, shard, coordinator, worker0, worker1, chat, bench = quickstart_commands()
    assert [c[1] for c in (download, shard)] == ["download", "shard"]
    assert [c[1] for c in (coordinator, worker0, bench)] == [
        "scripts/start_coordinator.py",
        "scripts/start_worker.py",
        "scripts/benchmark.py",
    ]
    assert chat[1:3] == ["-m", "shardcompute.client.chat"]
    expected = greedy_chat_reply(QUESTION, MAX_TOKENS)
    port, shards, report = free_port(), tmp_path / "shards", tmp_path / "bench.json"
    url = f"http://127.0.0.1:{port}"
    # The fixture's model cache makes the download a no-op offline; a token of our own
    # leaves ~/.shardcompute alone.
    env = {CACHE_ENV: str(cache_dir()), CLUSTER_TOKEN_ENV: secrets.token_urlsafe(16)}
    procs = Processes(tmp_path, child_env(**env))
    try:
        procs.run("download", localized(download), timeout=120, cwd=ROOT)
        procs.run("shard", localized(shard, output=shards), timeout=120, cwd=ROOT)
        procs.spawn("coordinator", localized(coordinator, port=port), cwd=ROOT)
        for name, worker in (("worker0", worker0), ("worker1", worker1)):
            cmd = localized(worker, coordinator_url=url, port=free_port(), shard_dir=shards)
            procs.spawn(name, cmd, cwd=ROOT)
        procs.wait(lambda: is_ready(url), 120, "the cluster to be ready")

        cmd = localized(chat, coordinator_url=url, max_tokens=MAX_TOKENS)
        output = procs.run("chat", cmd, timeout=120, input=f"{QUESTION}\n/quit\n", cwd=ROOT)
        assert chat_replies(output) == [expected], output

        few = dict(num_requests=4, concurrency=2, max_tokens=8, json=report)
        output = procs.run("benchmark", localized(bench, coordinator_url=url, **few), 180, cwd=ROOT)
        check_report(json.loads(report.read_text()), requests=4, max_tokens=8)
        assert "TTFT" in output and "errors: 0" in output

        procs.stop()
        wait_for(lambda: not procs.leftovers(), 10, "every process to exit")
    finally:
        procs.stop()


def check_report(report: dict, requests: int, max_tokens: int) -> None:
    assert (report["model"], report["requests"], report["errors"]) == ("smollm2-135m", requests, 0)
    assert all(r["ok"] for r in report["results"])
    assert 0 < report["completion_tokens"] <= requests * max_tokens
    assert report["aggregate_tokens_per_second"] > 0
    for key in ("ttft_seconds", "latency_seconds"):
        assert 0 < report[key]["p50"] <= report[key]["p99"]

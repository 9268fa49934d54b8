"""A coordinator and two worker agents (real processes, loopback) serving the fake engine,
driven through the official openai client, raw HTTP, the chat client and the benchmark."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from local_cluster import API_KEY, wait_for

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(secured_cluster):
    with openai.OpenAI(
        base_url=secured_cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=20
    ) as c:
        yield c


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], temperature=0
    )
    assert r.choices[0].message.content == "ereht olleh"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.completion_tokens == 11 and r.usage.total_tokens > 11


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "cba"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3


def test_completions_both_ways_and_length_limit(client):
    r = client.completions.create(model=MODEL, prompt="stressed", max_tokens=50)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("desserts", "stop")
    r = client.completions.create(model=MODEL, prompt="stressed", max_tokens=3)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("des", "length")
    parts = client.completions.create(model=MODEL, prompt="drawer", stream=True, max_tokens=9)
    assert "".join(p.choices[0].text for p in parts) == "reward"


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_four_concurrent_requests_all_complete(client):
    prompts = [f"request number {i} " * 3 for i in range(4)]

    def ask(p):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=200
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [p[::-1] for p in prompts]


def test_api_key_required_and_401_logged(secured_cluster):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    url = secured_cluster.url + "/v1/chat/completions"
    missing = httpx.post(url, json=body)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(secured_cluster.url + "/v1/models").status_code == 401
    with openai.OpenAI(base_url=secured_cluster.url + "/v1", api_key="bad", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    log = (secured_cluster.tmp / "coordinator.log").read_text()
    assert "401 POST /v1/chat/completions from 127.0.0.1: wrong API key" in log


def test_worker_without_cluster_token_is_refused(secured_cluster):
    url = secured_cluster.url + "/internal/v1/workers/register"
    body = {"facts": {"host": "h", "platform": "p"}, "address": "127.0.0.1"}
    assert httpx.post(url, json=body).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401 and "wrong cluster token" in wrong.text
    poll = httpx.post(secured_cluster.url + "/internal/v1/work/next", json={})
    assert poll.status_code == 401
    env = {**secured_cluster.env, "SHARDCOMPUTE_SECURITY__CLUSTER_TOKEN": "guess"}
    agent = secured_cluster.start_agent("intruder", env=env)
    assert agent.wait(30) == 2
    assert "wrong cluster token" in (secured_cluster.tmp / "intruder.log").read_text()


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=2"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-9"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("{not json", 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_4xx_json_naming_the_field(secured_cluster, body, status, needle):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(secured_cluster.url + "/v1/chat/completions", **kw, headers=headers)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_cluster_json_and_metrics(secured_cluster, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=20)
    view = secured_cluster.cluster()
    assert view["state"] == "ready" and view["world_size"] == 2
    assert sorted(w["rank"] for w in view["workers"]) == [0, 1]
    assert all(
        w["alive"] and w["loaded"] and w["facts"]["memory_bytes"] > 0 for w in view["workers"]
    )
    assert all(w["facts"]["mlx_device"] for w in view["workers"])
    text = httpx.get(secured_cluster.url + "/metrics", headers=secured_cluster.auth()).text
    assert 'shardcompute_cluster_state{state="ready"} 1.0' in text
    assert 'shardcompute_requests_total{endpoint="completions",outcome="ok"}' in text
    assert "shardcompute:time_to_first_token_seconds_count" in text
    assert "shardcompute_queue_depth 0.0" in text
    rank0 = next(w for w in view["workers"] if w["rank"] == 0)
    assert f'shardcompute_worker_memory_bytes{{host="{rank0["facts"]["host"]}",rank="0"' in text
    assert rank0["metrics"]["tokens_processed"] > 0 and rank0["metrics"]["steps"] > 0


def rank0_tokens(cluster) -> int:
    view = cluster.cluster()
    return next(w for w in view["workers"] if w["rank"] == 0)["metrics"]["tokens_processed"]


def test_client_going_away_frees_its_slot_and_stops_the_engine(secured_cluster, client):
    before = rank0_tokens(secured_cluster)
    body = {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 2000, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", secured_cluster.url + "/v1/completions", json=body, headers=headers, timeout=10
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # generation has started; now hang up
    wait_for(lambda: secured_cluster.cluster()["in_flight"] == 0, 10, "the slot to free")
    r = client.completions.create(model=MODEL, prompt="next", max_tokens=10)
    assert r.choices[0].text == "txen"
    assert rank0_tokens(secured_cluster) - before < 1000  # the engine was told to stop


def test_chat_client_with_piped_stdin(secured_cluster):
    script = "hello\n/reset\n\nsecond turn\n/quit\nnever sent\n"
    out = subprocess.run(
        [sys.executable, "-m", "shardcompute.client.chat", "--coordinator-url",
         secured_cluster.url, "--api-key", API_KEY, "--temperature", "0"],
        input=script, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "olleh" in out.stdout and "nrut dnoces" in out.stdout
    assert "(history cleared)" in out.stdout and "tok/s" in out.stdout
    assert "reves ton" not in out.stdout


def test_chat_client_shows_server_errors(secured_cluster):
    out = subprocess.run(
        [sys.executable, "-m", "shardcompute.client.chat", "--coordinator-url",
         secured_cluster.url, "--api-key", API_KEY, "--model", "nope"],
        input="hi\nagain\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.count("error:") == 2
    assert "model 'nope' is not served here" in out.stdout and "Traceback" not in out.stderr


def test_benchmark_reports_and_writes_json(secured_cluster, tmp_path):
    report_file = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--coordinator-url", secured_cluster.url,
         "--num-requests", "6", "--concurrency", "3", "--prompt-tokens", "48",
         "--max-tokens", "12", "--api-key", API_KEY, "--json", str(report_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TTFT" in out.stdout and "aggregate" in out.stdout
    report = json.loads(report_file.read_text())
    assert (report["requests"], report["errors"]) == (6, 0)
    assert report["completion_tokens"] == 6 * 12
    for key in ("ttft_seconds", "latency_seconds", "decode_tokens_per_second"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"}
        assert report[key]["p50"] > 0
    assert report["aggregate_tokens_per_second"] > 0


def test_benchmark_sweeps_concurrency_beside_a_peer(secured_cluster, tmp_path):
    """One run: two levels against the cluster and against a peer (the same cluster again,
    as an OpenAI-compatible server would be), a table, JSON per server and level, a plot."""
    report_file, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    out = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--coordinator-url", secured_cluster.url,
         "--concurrency", "1,2", "--prompt-tokens", "4", "--max-tokens", "6",
         "--peer-url", secured_cluster.url, "--peer-name", "twin", "--api-key", API_KEY,
         "--json", str(report_file), "--plot", str(plot)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "concurrency sweep" in out.stdout and "twin" in out.stdout
    sweeps = json.loads(report_file.read_text())
    assert set(sweeps) == {"shardcompute", "twin"}
    for reports in sweeps.values():
        assert [r["settings"]["concurrency"] for r in reports] == [1, 2]
        assert [r["requests"] for r in reports] == [2, 4]  # 2 x concurrency by default
        assert all(r["errors"] == 0 and r["itl_seconds"]["p50"] > 0 for r in reports)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("levels", ["0,2", "1,x"])
def test_benchmark_refuses_bad_levels(levels):
    out = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--concurrency", levels],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "concurrency" in out.stderr and "Traceback" not in out.stderr


def test_engine_crash_fails_its_request_alone_then_cluster_recovers(secured_cluster, client):
    generation = secured_cluster.cluster()["generation"]
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "__crash__"}]
        )
    assert err.value.status_code in (502, 503)
    view = secured_cluster.wait_state("ready", 30)
    assert view["generation"] > generation
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}])
    assert r.choices[0].message.content == "ko"

"""A corpus of bad requests against a real cluster: a coordinator and two workers running the
real engine on SmolLM2. Every case of issue 11 (and more) gets a 4xx with an OpenAI-style
error body naming the problem within 2 s; no engine restarts; the next normal request gets
the dense model's greedy text; the coordinator never loaded MLX. Then schemathesis fuzzes the
live OpenAPI document: no 5xx and no response that breaks the document."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from local_cluster import API_KEY, REAL_MODEL, LocalCluster, start_real_cluster

from processes import child_env, descendants, wait_for

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
CONTEXT = 8192  # SmolLM2's
ANSWER_WITHIN = 2.0  # seconds, for every case of the corpus
HI = [{"role": "user", "content": "hi"}]
LONG = "The quick brown fox jumps over the lazy dog. " * 1000  # about 10k tokens


@dataclass(frozen=True)
class Case:
    """One bad request and what must come back."""

    name: str
    body: Any  # JSON-encoded unless `raw` is set
    status: int = 400
    param: str | None = None  # the error's `param`, when the case has one
    needle: str = ""  # a piece of the error message
    path: str = CHAT
    method: str = "POST"
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None


def chat(**fields) -> dict:
    return {"model": REAL_MODEL, "messages": HI, **fields}


def completion(**fields) -> dict:
    return {"model": REAL_MODEL, "prompt": "hello", **fields}


def said(content: Any, role: str = "user") -> dict:
    return chat(messages=[{"role": role, "content": content}])


OVER = "context_length_exceeded"
CORPUS = [
    # Issue 11, finding 1: seeds that crashed both engines.
    Case("seed -1", chat(seed=-1), param="seed", needle="greater than or equal to 0 (got -1)"),
    Case("seed 2^64", chat(seed=2**64), param="seed", needle="less than or equal to"),
    Case("seed 10^30", chat(seed=10**30), param="seed", needle=str(10**30)),
    Case("completion seed -1", completion(seed=-1), path=COMPLETIONS, param="seed"),
    Case("seed string", chat(seed="42"), param="seed", needle="valid integer"),
    Case("seed float", chat(seed=1.5), param="seed", needle="valid integer"),
    # Finding 3: lone UTF-16 surrogates, in every kind of field.
    Case("surrogate content", said("\ud800"), param="messages.0.content", needle="U+D800"),
    Case("surrogate system", said("ok \udfff", "system"), param="messages.0.content"),
    Case("surrogate 3rd message", chat(messages=[*HI, {"role": "assistant", "content": "a"},
         {"role": "user", "content": "b\udbff"}]), param="messages.2.content"),
    Case("surrogate text part", said([{"type": "text", "text": "\ud800"}]),
         param="messages.0.content", needle="lone UTF-16 surrogate"),
    Case("surrogate prompt", completion(prompt="\ud800"), path=COMPLETIONS, param="prompt"),
    Case("surrogate prompt list", completion(prompt=["x\udc00"]), path=COMPLETIONS, param="prompt"),
    Case("surrogate stop", chat(stop="\ud800"), param="stop.0", needle="U+D800"),
    Case("surrogate stop list", completion(stop=["ok", "\udc00"]), path=COMPLETIONS,
         param="stop.1"),
    Case("surrogate model", chat(model="\ud800"), param="model", needle="U+D800"),
    Case("surrogate role", said("x", "\ud800"), param="messages.0.role"),
    # Finding 4: client errors that came back as 502 engine_error.
    Case("prompt over context", completion(prompt=LONG), path=COMPLETIONS, param="prompt",
         code=OVER, needle=f"context is {CONTEXT} tokens"),
    Case("chat over context", said(LONG), param="messages", code=OVER),
    Case("max_tokens 10^9", completion(max_tokens=10**9), path=COMPLETIONS, param="max_tokens",
         code=OVER, needle="max_tokens=1000000000"),
    Case("chat max_tokens 10^9", chat(max_tokens=10**9), param="max_tokens", code=OVER),
    Case("max_completion_tokens 10^9", chat(max_completion_tokens=10**9), param="max_tokens",
         code=OVER),
    Case("max_tokens = context", completion(max_tokens=CONTEXT), path=COMPLETIONS, code=OVER,
         needle="at most 8191 tokens"),
    Case("max_tokens 10^5", chat(max_tokens=100_000), code=OVER),
    Case("max_tokens 2^63", completion(max_tokens=2**63), path=COMPLETIONS, code=OVER),
    Case("max_tokens 10^30", completion(max_tokens=10**30), path=COMPLETIONS, code=OVER),
    Case("empty prompt", completion(prompt=""), path=COMPLETIONS, param="prompt",
         needle="at least 1 character"),
    Case("empty prompt in list", completion(prompt=[""]), path=COMPLETIONS, param="prompt"),
    Case("no prompt in list", completion(prompt=[]), path=COMPLETIONS, param="prompt",
         needle="exactly one prompt"),
    Case("two prompts", completion(prompt=["a", "b"]), path=COMPLETIONS, param="prompt"),
    Case("token-id prompt", completion(prompt=[[1, 2]]), path=COMPLETIONS, param="prompt"),
    Case("no messages", chat(messages=[]), param="messages", needle="at least 1 item"),
    Case("messages missing", {"model": REAL_MODEL}, param="messages", needle="Field required"),
    Case("prompt missing", {"model": REAL_MODEL}, path=COMPLETIONS, param="prompt"),
    Case("model missing", {"messages": HI}, param="model", needle="Field required"),
    Case("model empty", chat(model=""), param="model"),
    # Finding 9: loose types.
    Case("max_tokens string", chat(max_tokens="10"), param="max_tokens", needle='(got "10")'),
    Case("max_tokens float", chat(max_tokens=1208.0), param="max_tokens", needle="1208.0"),
    Case("max_tokens bool", chat(max_tokens=True), param="max_tokens"),
    Case("max_tokens 0", chat(max_tokens=0), param="max_tokens", needle="greater than or equal"),
    Case("max_tokens negative", completion(max_tokens=-5), path=COMPLETIONS, param="max_tokens"),
    Case("stream yes", chat(stream="yes"), param="stream", needle='valid boolean (got "yes")'),
    Case("stream 1", chat(stream=1), param="stream", needle="valid boolean"),
    Case("temperature string", chat(temperature="0.7"), param="temperature"),
    Case("temperature bool", chat(temperature=True), param="temperature"),
    Case("top_p string", completion(top_p="1"), path=COMPLETIONS, param="top_p"),
    Case("top_k float", chat(top_k=1.5), param="top_k", needle="valid integer"),
    Case("top_k negative", chat(top_k=-1), param="top_k"),
    Case("n string", chat(n="1"), param="n"),
    Case("messages string", chat(messages="hi"), param="messages", needle="valid list"),
    Case("message string", chat(messages=["hi"]), param="messages.0"),
    Case("content number", said(42), param="messages.0.content"),
    Case("prompt number", completion(prompt=123), path=COMPLETIONS, param="prompt"),
    Case("stop number", chat(stop=5), param="stop"),
    Case("include_usage yes", chat(stream=True, stream_options={"include_usage": "yes"}),
         param="stream_options.include_usage"),
    Case("image part", said([{"type": "image_url", "image_url": {"url": "x"}}]),
         param="messages.0.content", needle="text part"),
    Case("role tool", said("x", "tool"), param="messages.0.role"),
    Case("role robot", said("x", "robot"), param="messages.0.role"),
    # NaN and infinity, and out of range.
    Case("temperature NaN", None, raw=b'{"model":"smollm2-135m","messages":[{"role":"user",'
         b'"content":"hi"}],"temperature":NaN}', param="temperature", needle="finite number"),
    Case("temperature Infinity", None, raw=b'{"model":"smollm2-135m","prompt":"hi",'
         b'"temperature":Infinity}', path=COMPLETIONS, param="temperature", needle="finite"),
    Case("top_p -Infinity", None, raw=b'{"model":"smollm2-135m","prompt":"hi","top_p":'
         b'-Infinity}', path=COMPLETIONS, param="top_p", needle="finite"),
    Case("temperature 1e400", None, raw=b'{"model":"smollm2-135m","prompt":"hi",'
         b'"temperature":1e400}', path=COMPLETIONS, param="temperature", needle="finite"),
    Case("temperature 2.5", chat(temperature=2.5), param="temperature", needle="2"),
    Case("temperature negative", chat(temperature=-0.1), param="temperature"),
    Case("top_p 0", chat(top_p=0), param="top_p", needle="greater than 0"),
    Case("top_p 1.5", completion(top_p=1.5), path=COMPLETIONS, param="top_p"),
    # Fields we do not implement, with values that would change the output.
    Case("logit_bias", chat(logit_bias={"1": 5}), param="logit_bias", needle="not supported"),
    Case("logprobs", chat(logprobs=True), param="logprobs", needle="not supported"),
    Case("top_logprobs", chat(top_logprobs=5), param="top_logprobs"),
    Case("completion logprobs", completion(logprobs=3), path=COMPLETIONS, param="logprobs"),
    Case("echo", completion(echo=True), path=COMPLETIONS, param="echo", needle="not echoed"),
    Case("best_of", completion(best_of=2), path=COMPLETIONS, param="best_of"),
    Case("suffix", completion(suffix="x"), path=COMPLETIONS, param="suffix"),
    Case("n 2", chat(n=2), param="n", needle="only n=1"),
    Case("completion n 3", completion(n=3), path=COMPLETIONS, param="n"),
    Case("presence_penalty", chat(presence_penalty=0.5), param="presence_penalty"),
    Case("frequency_penalty", completion(frequency_penalty=1), path=COMPLETIONS,
         param="frequency_penalty"),
    Case("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), param="tools"),
    Case("tool_choice", chat(tool_choice="auto"), param="tool_choice"),
    Case("functions", chat(functions=[{"name": "f"}]), param="functions"),
    Case("response_format", chat(response_format={"type": "json_object"}),
         param="response_format", needle="plain text"),
    # Stop lists.
    Case("huge stop list", chat(stop=["x"] * 1000), param="stop", needle="at most 4 items"),
    Case("five stops", completion(stop=list("abcde")), path=COMPLETIONS, param="stop"),
    Case("empty stop", chat(stop=""), param="stop.0", needle="at least 1 character"),
    Case("empty stop in list", chat(stop=["a", ""]), param="stop.1"),
    # Bodies that are not a JSON object, or not JSON at all.
    Case("not JSON", None, raw=b"{not json", needle="not valid JSON"),
    Case("empty body", None, raw=b"", needle="JSON object"),
    Case("array body", None, raw=b"[]", needle="JSON object"),
    Case("null body", None, raw=b"null", needle="JSON object"),
    Case("number body", None, raw=b"42", needle="JSON object"),
    Case("trailing garbage", None, raw=b'{"model": "x"} x', needle="not valid JSON"),
    Case("not UTF-8", None, raw=b'{"model": "\xff\xfe"}', needle="UTF-8"),
    Case("nested 100k deep", None, raw=b"[" * 100_000, needle="JSON"),
    Case("text/plain", None, raw=json.dumps(chat()).encode(),
         headers={"Content-Type": "text/plain"}, needle="Content-Type: application/json"),
    Case("form encoded", None, raw=b"model=smollm2-135m&prompt=hi", path=COMPLETIONS,
         headers={"Content-Type": "application/x-www-form-urlencoded"}, needle="JSON object"),
    # Routes, methods, model and credentials.
    Case("GET a POST route", None, status=405, method="GET", needle="Method Not Allowed"),
    Case("PUT /v1/models", None, status=405, method="PUT", path="/v1/models"),
    Case("DELETE /cluster", None, status=405, method="DELETE", path="/cluster"),
    Case("unknown route", chat(), status=404, path="/v1/nope", needle="Not Found"),
    Case("unknown model", chat(model="gpt-4"), status=404, param="model", code="model_not_found"),
    Case("no API key", chat(), status=401, headers={"Authorization": ""}, needle="missing API"),
    Case("wrong API key", chat(), status=401, headers={"Authorization": "Bearer sk-guess"},
         needle="wrong API key", code="invalid_api_key"),
]  # fmt: skip


@pytest.fixture(scope="module")
def expected(greedy_chat_reply) -> str:
    """The dense model's greedy reply: computed first, while no engine competes for the CPU."""
    return greedy_chat_reply(QUESTION, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_gguf, expected) -> Iterator[LocalCluster]:
    """Two workers running the real engine, behind an API key."""
    cluster = start_real_cluster(
        tmp_path_factory.mktemp("bad"),
        smollm2_gguf,
        api_key=API_KEY,
        SHARDCOMPUTE_COORDINATOR__MAX_QUEUED_REQUESTS="1",  # a second waiting request is a 429
        SHARDCOMPUTE_ENGINE__MAX_BATCH_SIZE="1",  # ... behind one running: the engine takes no more
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def engine_pids(cluster: LocalCluster) -> set[int]:
    """The engine processes under the two agents."""
    below = set().union(*(descendants(cluster.procs[f"agent{r}"].pid) for r in (0, 1)))
    return {pid for pid in below if b"shardcompute.worker.engine" in cmdline(pid)}


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def before(cluster) -> dict:
    """The cluster's generation and engine processes before the corpus."""
    pids = engine_pids(cluster)
    assert len(pids) == 2, cluster.logs()
    return {"generation": cluster.cluster()["generation"], "engines": pids}


def send(cluster: LocalCluster, case: Case) -> httpx.Response:
    headers = {**cluster.auth(), "Content-Type": "application/json", **case.headers}
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    if case.body is None and case.raw is None:
        content = None
    return httpx.request(
        case.method, cluster.url + case.path, content=content, headers=headers, timeout=10
    )


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_request_gets_a_4xx_naming_the_problem(cluster, before, case):
    start = time.monotonic()
    r = send(cluster, case)
    elapsed = time.monotonic() - start
    assert r.status_code == case.status, r.text
    assert elapsed < ANSWER_WITHIN, f"{elapsed:.2f}s"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert case.needle in error["message"], error["message"]
    if case.param is not None:
        assert error["param"] == case.param and error["message"].startswith(case.param), error
    if case.code is not None:
        assert error["code"] == case.code
    if case.status == 405:
        assert r.headers["allow"]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 60 and len({c.name for c in CORPUS}) == len(CORPUS)


def test_no_engine_restarted_during_the_corpus(cluster, before):
    view = cluster.cluster()
    assert (view["state"], view["generation"]) == ("ready", before["generation"])
    assert all(w["alive"] and w["loaded"] for w in view["workers"]), view["workers"]
    assert engine_pids(cluster) == before["engines"]


def test_a_normal_request_after_the_corpus_gets_the_greedy_text(cluster, expected):
    body = chat(messages=[{"role": "user", "content": QUESTION}], temperature=0)
    r = httpx.post(
        cluster.url + CHAT,
        json=body | {"max_tokens": MAX_TOKENS},
        headers=cluster.auth(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert expected and r.json()["choices"][0]["message"]["content"] == expected


def test_without_max_tokens_a_chat_may_use_the_rest_of_the_context(cluster):
    # Greedy SmolLM2 ends this reply by itself, long before the context does.
    body = chat(messages=[{"role": "user", "content": QUESTION}], temperature=0)
    r = httpx.post(cluster.url + CHAT, json=body, headers=cluster.auth(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"


def test_a_full_queue_answers_429_with_retry_after(cluster):
    url, headers = cluster.url + COMPLETIONS, cluster.auth()
    # Greedy, this prompt counts on far past 500 tokens: the engine stays busy until we hang up.
    count = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    long = completion(prompt=count, max_tokens=500, temperature=0, stream=True)
    short = completion(max_tokens=2)
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", url, json=long, headers=headers, timeout=60) as running:
            lines = running.iter_lines()  # held: a dropped iterator would hang up on the stream
            next(line for line in lines if line.startswith("data: {"))
            waiting = pool.submit(httpx.post, url, json=short, headers=headers, timeout=60)
            wait_for(lambda: cluster.cluster()["queue_depth"] == 1, 20, "a waiting request")
            full = httpx.post(url, json=short, headers=headers, timeout=10)
        # Hanging up on the running request lets the waiting one through.
        assert waiting.result().status_code == 200
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert "coordinator.max_queued_requests=1" in error["message"]


def test_the_coordinator_never_loaded_mlx(cluster, before):
    """After validating the whole corpus: MLX in each engine's memory map, not in the
    coordinator's (the check finds MLX where it is)."""
    maps = lambda pid: Path(f"/proc/{pid}/maps").read_text()  # noqa: E731
    assert all("libmlx" in maps(pid) for pid in before["engines"])
    assert "libmlx" not in maps(cluster.procs["coordinator"].pid)


# --- schemathesis against the live document ------------------------------------------------

SCHEMATHESIS_SECONDS = 130
# The door refuses some requests the document cannot describe as invalid: 1208.0 where an
# integer is due (JSON Schema counts it as one), a prompt and max_tokens over the context.
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path-regex = "^/v1/(chat/)?completions$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "429"]
checks.max_response_time = 60.0
"""


def run_schemathesis(cluster: LocalCluster, tmp: Path) -> tuple[dict, Counter]:
    """Run `st run` on /openapi.json with every check; its JSON report and the responses
    counted by (status, "METHOD path")."""
    config, report, statuses = tmp / "schemathesis.toml", tmp / "report.json", tmp / "statuses.log"
    config.write_text(SCHEMATHESIS_CONFIG)
    statuses.touch()
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
           "run", f"{cluster.url}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
           "--checks", "all", "--max-time", str(SCHEMATHESIS_SECONDS), "--max-examples", "20",
           "--generation-codec", "utf-8", "--request-timeout", "60", "--seed", "11",
           "--report", "json", "--report-json-path", str(report), "--no-color"]  # fmt: skip
    env = child_env(
        SCHEMATHESIS_HOOKS="schemathesis_hooks", SHARDCOMPUTE_TEST_STATUS_LOG=str(statuses)
    )
    env["PYTHONPATH"] = f"{Path(__file__).parent}:{env['PYTHONPATH']}"
    out = subprocess.run(  # in tmp: schemathesis keeps a cache in its working directory
        cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=SCHEMATHESIS_SECONDS + 90
    )
    assert report.is_file(), out.stdout[-5000:] + out.stderr[-3000:]
    counts = Counter(tuple(line.split(" ", 1)) for line in statuses.read_text().splitlines())
    return {**json.loads(report.read_text()), "stdout": out.stdout}, counts


def test_schemathesis_finds_no_5xx_and_no_schema_violation(cluster, before, tmp_path):
    report, responses = run_schemathesis(cluster, tmp_path)
    by_status, by_route = Counter(), Counter()
    for (status, route), n in responses.items():
        by_status[status] += n
        by_route[route] += n
    server_errors = sum(n for status, n in by_status.items() if status.startswith("5"))
    print(
        f"[schemathesis] {report['test_cases']['generated']} cases, "
        f"{sum(by_status.values())} requests, statuses {dict(sorted(by_status.items()))}, "
        f"{server_errors} 5xx, failures {report['failures']}, errors {report['errors']}"
    )
    assert server_errors == 0, report["stdout"][-6000:]
    assert report["failures"] == [] and report["errors"] == [], report["stdout"][-6000:]
    assert report["operations"]["tested"] == 7
    assert all(by_route[f"POST {path}"] >= 20 for path in (CHAT, COMPLETIONS)), by_route
    # Generated requests reached the engine, not only the door.
    assert responses["200", f"POST {CHAT}"] > 3 and responses["200", f"POST {COMPLETIONS}"] > 3
    assert cluster.cluster()["generation"] == before["generation"]

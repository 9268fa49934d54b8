"""Continuous batching on a real 2-worker cluster (SmolLM2, world size 2: 2+1 KV heads):
requests that run together each get exactly the text they get alone, whether they arrive
together or late, and one request cancelled, refused or failing leaves the others unchanged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from local_cluster import REAL_MODEL as MODEL
from local_cluster import LocalCluster, start_real_cluster, wait_for

from shardcompute.worker.serving import FAULT_ENV

FAULT_WORD = "__batch_fault__"
KV_BUDGET = 4096  # 8 rows x 512 positions: the batch below fits; one 5000-token answer does not
STORY = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his "
    "father had, and lit the great lamp that swept the dark water. Ships passed far out, "
    "their lights small as stars, and none of them knew his name. "
)
# Prompts from 5 to about 300 tokens, answers capped from 16 to 64 tokens.
REQUESTS = [
    ("The capital of France is", 16),
    ("Write a short poem about the sea.", 64),
    ("List five animals that live in the desert:", 24),
    ("Q: What is 12 times 12?\nA:", 32),
    (STORY * 3 + "What did the keeper do each evening?", 40),
    (STORY * 6 + "Summarize the story in one sentence:", 48),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_gguf) -> Iterator[LocalCluster]:
    env = {FAULT_ENV: FAULT_WORD, "SHARDCOMPUTE_ENGINE__MAX_KV_TOKENS": str(KV_BUDGET)}
    c = start_real_cluster(tmp_path_factory.mktemp("batching"), smollm2_gguf, **env)
    try:
        yield c
    finally:
        c.stop()


def body(prompt: str, max_tokens: int, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def complete(cluster: LocalCluster, b: dict) -> dict:
    r = httpx.post(cluster.url + "/v1/completions", json=b, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(cluster: LocalCluster, b: dict) -> str:
    return complete(cluster, b)["choices"][0]["text"]


class Alone:
    """Each request's text when it runs by itself (measured once, shared by the tests)."""

    def __init__(self, cluster: LocalCluster):
        self.cluster, self.texts, self.usage = cluster, {}, {}

    def __call__(self, b: dict) -> str:
        key = json.dumps(b, sort_keys=True)
        if key not in self.texts:
            r = complete(self.cluster, b)
            self.texts[key], self.usage[key] = r["choices"][0]["text"], r["usage"]
        return self.texts[key]


@pytest.fixture(scope="module")
def alone(cluster) -> Alone:
    return Alone(cluster)


def together(cluster: LocalCluster, bodies: list[dict]) -> list[str]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: text_of(cluster, b), bodies))


def batch_metrics(cluster: LocalCluster) -> str | None:
    """/metrics, once its batch-size histogram has seen a step of more than one row."""
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    counts = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith("shardcompute:batch_size_bucket")
    )
    at_most_one = float(counts.get('shardcompute:batch_size_bucket{le="1.0"}', 0))
    every = float(counts.get('shardcompute:batch_size_bucket{le="+Inf"}', 0))
    return text if every > at_most_one else None


def running(cluster: LocalCluster) -> int:
    """Requests in rank 0's running batch, as its engine last reported."""
    rank0 = next(w for w in cluster.cluster()["workers"] if w["rank"] == 0)
    return rank0["metrics"]["running"]


class Stream:
    """A streamed completion read on its own thread, that can hang up part way."""

    def __init__(self, cluster: LocalCluster, b: dict):
        self.cluster, self.body = cluster, {**b, "stream": True}
        self.chunks: list[str] = []
        self.hang_up = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        url = self.cluster.url + "/v1/completions"
        with httpx.stream("POST", url, json=self.body, timeout=300) as r:
            for line in r.iter_lines():
                if self.hang_up.is_set():
                    return
                if line.startswith("data: {"):
                    self.chunks.append(json.loads(line[6:])["choices"][0]["text"])

    @property
    def text(self) -> str:
        self.thread.join(300)
        return "".join(self.chunks)


def test_a_batch_gives_every_request_its_text_alone(cluster, alone):
    bodies = [body(p, n) for p, n in REQUESTS]
    seeded = body("Tell me a story about a dragon.", 32, temperature=0.9, seed=1234)
    bodies.append(seeded)
    want = [alone(b) for b in bodies]
    prompts = [alone.usage[json.dumps(b, sort_keys=True)]["prompt_tokens"] for b in bodies]
    assert min(prompts) == 5 and 280 <= max(prompts) <= 320, prompts
    assert together(cluster, bodies) == want
    # vLLM's serving metrics, under shardcompute: names; the batch was seen more than 1 wide.
    text = wait_for(lambda: batch_metrics(cluster), 10, "the engine's batch-size report")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"shardcompute:{name} " in text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert f"shardcompute:{name}_count" in text
    assert "shardcompute:request_queue_time_seconds_count" in text


LONG = [
    "Count from one to fifty: one, two,",
    "The alphabet, letter by letter: A, B,",
    STORY + "Continue the story:",
    "Write a long letter to a friend about your summer.",
]


def test_a_request_arriving_mid_batch_joins_it(cluster, alone):
    """Four requests decoding, then a fifth: it joins the running batch (the batch grows to
    five), and none of the five texts changes."""
    first = [body(p, 64) for p in LONG]
    late = body(REQUESTS[0][0] + " located in", 24)
    want = [alone(b) for b in [*first, late]]
    streams = [Stream(cluster, b) for b in first]
    wait_for(lambda: all(s.chunks for s in streams) and running(cluster) == 4, 120, "4 running")
    late_text = text_of(cluster, late)
    assert [s.text for s in streams] + [late_text] == want


def test_a_cancelled_row_frees_its_slot_and_the_others_do_not_change(cluster, alone):
    """A client hangs up mid-batch on a request that would count on for 1000 tokens: the
    others finish unchanged, and its row is freed (the batch empties long before 1000)."""
    keep = [body(p, 64) for p in LONG[:2]]
    want = [alone(b) for b in keep]
    streams = [Stream(cluster, b) for b in keep]
    gone = Stream(cluster, body("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", 1000))
    wait_for(lambda: len(gone.chunks) >= 3 and running(cluster) == 3, 120, "three running")
    gone.hang_up.set()  # the client disconnects mid-stream
    assert [s.text for s in streams] == want
    wait_for(lambda: running(cluster) == 0, 60, "the cancelled row freed")
    assert len(gone.chunks) < 500


def test_a_request_too_large_for_the_kv_budget_is_refused_with_the_numbers(cluster, alone):
    b = body(REQUESTS[2][0], 24)
    want = alone(b)
    stream = Stream(cluster, b)
    r = httpx.post(cluster.url + "/v1/completions", json=body("Hello there", 5000), timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "kv_budget_exceeded" and error["param"] == "max_tokens"
    assert "5000" in error["message"] and f"budget of {KV_BUDGET}" in error["message"]
    assert stream.text == want


def test_a_failing_row_fails_alone(cluster, alone):
    """Rank 0's host-side work for one request fails mid-generation (the fault knob): that
    request ends with an error, and the rest of the batch finishes unchanged."""
    others = [body(p, n) for p, n in REQUESTS[1:4]]
    want = [alone(b) for b in others]
    streams = [Stream(cluster, b) for b in others]
    time.sleep(0.2)
    r = httpx.post(
        cluster.url + "/v1/completions",
        json=body(f"Say something. {FAULT_WORD}:stream", 32),
        timeout=60,
    )
    assert r.status_code >= 500 and "injected fault at 'stream'" in r.text
    assert [s.text for s in streams] == want
    assert text_of(cluster, others[0]) == want[0]  # and the engine serves on

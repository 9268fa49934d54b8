"""Credentials on every route of a real coordinator process (no workers needed): with an API
key set, nothing but /health and /ready answers without one. Each route is tried with no
credential, a wrong one and the right one; failed attempts are logged at a bounded rate."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest
from local_cluster import API_KEY, CLUSTER_TOKEN, LocalCluster

METRICS_TOKEN = "scrape-me"
CHAT = {"model": "dummy:tinyllama-1.1b", "messages": [{"role": "user", "content": "hi"}]}
POLL = {"worker_id": "w", "generation": 1, "wait_seconds": 0.1}

# (method, path, body, credential it needs, status with the right credential). No worker has
# registered, so the right credential meets an empty cluster: 503, 404, 409 are past auth.
API_ROUTES = [
    ("GET", "/v1/models", None, "api", 200),
    ("POST", "/v1/chat/completions", CHAT, "api", 503),
    ("POST", "/v1/completions", {"model": CHAT["model"], "prompt": "x"}, "api", 503),
    ("GET", "/cluster", None, "api", 200),
    ("GET", "/openapi.json", None, "api", 200),
    ("GET", "/metrics", None, "metrics", 200),
]
INTERNAL_ROUTES = [
    ("POST", "/internal/v1/workers/register", {"facts": {"host": "h", "platform": "p"}}, 400),
    ("POST", "/internal/v1/workers/w/heartbeat", {}, 404),
    ("POST", "/internal/v1/workers/w/loaded", {"generation": 1, "rank": 0}, 404),
    ("POST", "/internal/v1/workers/w/metrics", {"generation": 1, "metrics": {}}, 404),
    ("POST", "/internal/v1/work/next", POLL, 503),  # a generation this coordinator has not seen
    ("POST", "/internal/v1/work/events", {"posts": []}, 200),
    ("GET", "/internal/v1/work/r/cancelled", None, 200),
]


def start_coordinator(tmp, metrics_token: str | None) -> LocalCluster:
    """A coordinator alone, serving a dummy model (no tokenizer to load)."""
    cluster = LocalCluster(tmp, api_key=API_KEY)
    with cluster.config.open("a") as f:
        if metrics_token:
            f.write(f"  metrics_token: {metrics_token}\n")
        f.write(f"model:\n  name: {CHAT['model']}\n")
    try:
        cluster.start_coordinator()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module", params=["metrics token", "API key only"])
def coordinator(request, tmp_path_factory) -> Iterator[tuple[LocalCluster, str]]:
    """A coordinator with an API key, and with or without a metrics token of its own."""
    token = METRICS_TOKEN if request.param == "metrics token" else None
    cluster = start_coordinator(tmp_path_factory.mktemp("auth"), token)
    yield cluster, token or API_KEY
    cluster.stop()


def call(cluster: LocalCluster, method: str, path: str, body, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, cluster.url + path, json=body, headers=headers, timeout=10)


def refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and what in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path, body, needs, ok", API_ROUTES)
def test_public_routes(coordinator, method, path, body, needs, ok):
    cluster, metrics_token = coordinator
    right = metrics_token if needs == "metrics" else API_KEY
    what = "metrics token" if right == METRICS_TOKEN else "API key"
    refused(call(cluster, method, path, body, None), f"missing {what}")
    refused(call(cluster, method, path, body, "guess"), f"wrong {what}")
    if right != API_KEY:  # the API key does not open what has a token of its own
        refused(call(cluster, method, path, body, API_KEY), f"wrong {what}")
    answer = call(cluster, method, path, body, right)
    assert answer.status_code == ok
    if ok == 503:  # no workers yet: not ready, and says when to retry
        assert answer.headers["retry-after"] == "5"


@pytest.mark.parametrize("method, path, body, ok", INTERNAL_ROUTES)
def test_internal_routes_need_the_cluster_token(coordinator, method, path, body, ok):
    cluster, _ = coordinator
    refused(call(cluster, method, path, body, None), "missing cluster token")
    refused(call(cluster, method, path, body, API_KEY), "wrong cluster token")
    assert call(cluster, method, path, body, CLUSTER_TOKEN).status_code == ok


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"posts": [{"events": []}]}, "request_id"),
        (
            {"posts": [{"request_id": "r", "events": [{"completion_tokens": -1}]}]},
            "completion_tokens",
        ),
        ({"posts": "all of them"}, "posts"),
        ({"posts": [], "version": 99}, "version"),
    ],
)
def test_a_bad_event_post_is_a_4xx_naming_the_field(coordinator, body, needle):
    """Events for several requests in one post (the engine's EventPosts): a malformed one is
    refused with the field named, and the coordinator goes on answering."""
    cluster, _ = coordinator
    answer = call(cluster, "POST", "/internal/v1/work/events", body, CLUSTER_TOKEN)
    assert 400 <= answer.status_code < 500 and needle in answer.text, answer.text
    # Events for requests it does not hold: every one of them is to stop.
    posts = {"posts": [{"request_id": r, "events": [{"text": "x"}]} for r in ("gone", "lost")]}
    answer = call(cluster, "POST", "/internal/v1/work/events", posts, CLUSTER_TOKEN)
    assert answer.status_code == 200 and answer.json()["cancelled"] == ["gone", "lost"]


@pytest.mark.parametrize("path, ok", [("/health", 200), ("/ready", 503)])
def test_health_and_ready_stay_open(coordinator, path, ok):
    cluster, _ = coordinator
    for token in (None, "guess", API_KEY):
        assert call(cluster, "GET", path, None, token).status_code == ok


def test_the_document_declares_what_is_enforced(coordinator):
    cluster, metrics_token = coordinator
    doc = call(cluster, "GET", "/openapi.json", None, API_KEY).json()
    schemes = {p: op.get("security") for p, ops in doc["paths"].items() for op in ops.values()}
    metrics_scheme = "apiKey" if metrics_token == API_KEY else "metricsToken"
    assert schemes == {
        "/v1/models": [{"apiKey": []}],
        "/v1/chat/completions": [{"apiKey": []}],
        "/v1/completions": [{"apiKey": []}],
        "/health": None,
        "/ready": None,
        "/cluster": [{"apiKey": []}],
        "/metrics": [{metrics_scheme: []}],
    }
    assert not any(p.startswith("/internal") for p in doc["paths"])


def test_failed_attempts_are_logged_at_a_bounded_rate(coordinator):
    cluster, _ = coordinator
    log = cluster.tmp / "coordinator.log"
    before = log.read_text().count("401 ")
    with httpx.Client(base_url=cluster.url, timeout=10) as http:
        for i in range(200):
            http.get("/cluster", headers={"Authorization": f"Bearer guess{i}"})
    logged = log.read_text().count("401 ") - before
    assert logged <= 5, f"{logged} lines for 200 failed attempts"


def test_a_model_the_coordinator_cannot_read_stops_it_with_the_reason(tmp_path):
    """The door needs the model's tokenizer: without it the coordinator does not start."""
    cluster = LocalCluster(tmp_path)
    absent = tmp_path / "absent.gguf"
    cmd = [sys.executable, "-m", "shardcompute.coordinator", "--config", str(cluster.config),
           "--set", f"model.path={absent}"]  # fmt: skip
    try:
        assert cluster.spawn("coordinator", cmd).wait(60) == 2
    finally:
        cluster.stop()
    log = cluster.log("coordinator")
    assert f"error: model '{absent}' not found" in log and "Traceback" not in log, log

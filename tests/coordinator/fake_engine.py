"""A stand-in engine for control-plane tests: speaks the coordinator's engine protocol and
answers every request with its input reversed, one character per token.

Run by the worker agent as `python fake_engine.py --assignment PATH`. Knobs (env):
FAKE_ENGINE_TOKEN_DELAY seconds per token (default 0.002), FAKE_ENGINE_CRASH_WORD: a prompt
containing it makes the engine exit mid-request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

from shardcompute.http_client import http_client
from shardcompute.protocol import (
    CLUSTER_TOKEN_ENV,
    Assignment,
    CancelledRequests,
    EventPosts,
    GenerationEvent,
    GenerationRequest,
    LoadedReport,
    MetricsReport,
    RequestEvents,
    WorkBatch,
    WorkerMetrics,
    WorkPoll,
    decode,
)

TOKEN_DELAY = float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", "0.002"))
CRASH_WORD = os.environ.get("FAKE_ENGINE_CRASH_WORD", "__crash__")


def check_launch(a: Assignment) -> None:
    """The agent must set MLX_RANK and MLX_HOSTFILE as mx.distributed expects them."""
    hostfile = json.loads(open(os.environ["MLX_HOSTFILE"]).read())
    assert int(os.environ["MLX_RANK"]) == a.rank, "MLX_RANK does not match the assignment"
    assert hostfile == [[h] for h in a.hostfile], f"bad hostfile {hostfile}"


def reply_text(req: GenerationRequest) -> str:
    """The reversed last user message (chat) or prompt (completion)."""
    source = req.prompt if req.kind == "completion" else req.messages[-1].content
    return source[::-1]


def serve_one(http: httpx.Client, req: GenerationRequest, totals: WorkerMetrics) -> None:
    """Stream the reply one character per event; stop early when told it was cancelled."""
    if CRASH_WORD in (req.prompt or json.dumps([m.content for m in req.messages or []])):
        os._exit(7)
    text, prompt_tokens = reply_text(req), len(req.prompt or "") or 5
    n = min(len(text), req.max_tokens)
    for i, ch in enumerate(text[:n]):
        time.sleep(TOKEN_DELAY)
        last = i == n - 1
        finish = ("stop" if n == len(text) else "length") if last else None
        event = GenerationEvent(
            text=ch,
            token_ids=[ord(ch)],
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=i + 1,
        )
        r = post_events(http, req.request_id, event)
        totals.tokens_processed += 1
        totals.steps += 1
        if req.request_id in decode(CancelledRequests, r.content).cancelled:
            return
    if n == 0:
        event = GenerationEvent(finish_reason="stop", prompt_tokens=prompt_tokens)
        post_events(http, req.request_id, event)


def post_events(http: httpx.Client, request_id: str, event: GenerationEvent) -> httpx.Response:
    posts = EventPosts(posts=[RequestEvents(request_id=request_id, events=[event])])
    return http.post("/work/events", content=posts.model_dump_json())


def poll_forever(http: httpx.Client, a: Assignment) -> None:
    """Rank 0: take requests until the coordinator says our generation is over."""
    totals = WorkerMetrics(memory_bytes=1000 + a.rank, collective_seconds=0.5)
    poll = WorkPoll(worker_id=a.worker_id, generation=a.generation, wait_seconds=1.0)
    while True:
        r = http.post("/work/next", content=poll.model_dump_json())
        if r.status_code == 409:
            return
        r.raise_for_status()
        for req in decode(WorkBatch, r.content).requests:  # one at a time: max_requests=1
            serve_one(http, req, totals)
            report = MetricsReport(generation=a.generation, metrics=totals)
            http.post(f"/workers/{a.worker_id}/metrics", content=report.model_dump_json())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--assignment", required=True)
    a = decode(Assignment, open(p.parse_args().assignment).read())
    check_launch(a)
    http = http_client(
        a.coordinator_url + "/internal/v1",
        ca_file=a.tls_ca,
        token=os.environ[CLUSTER_TOKEN_ENV],
        headers={"content-type": "application/json"},
    )
    loaded = LoadedReport(generation=a.generation, rank=a.rank, load_seconds=0.01)
    http.post(f"/workers/{a.worker_id}/loaded", content=loaded.model_dump_json()).raise_for_status()
    if a.rank == 0:
        poll_forever(http, a)
    else:
        parent = os.getppid()
        while os.getppid() == parent:  # followers idle until the agent replaces us
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine child process: load this rank's shard, then serve the coordinator's work queue.

Run by the worker agent as `python -m shardcompute.worker.engine --assignment PATH` with
MLX_RANK / MLX_HOSTFILE set. SPMD: rank 0 alone talks to the work queue and decides; every
loop it broadcasts one control message ({"op": "idle" | "generate" | "exit"}) and all ranks
act on it, so every rank runs the same collectives in the same order.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.engine.generate import generate_step, stream_generate
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.rank_main import encode_prompt, load_spec, stop_ids, tokenizer_for
from shardcompute.engine.sampling import SamplingParams
from shardcompute.model.llama import Model
from shardcompute.protocol import (
    CLUSTER_TOKEN_ENV,
    Assignment,
    CancelStatus,
    EventBatch,
    GenerationEvent,
    GenerationRequest,
    LoadedReport,
    MetricsReport,
    WorkerMetrics,
    WorkPoll,
    decode,
)

log = logging.getLogger("shardcompute.engine")

POLL_SECONDS = 1.0  # how long followers wait in a broadcast; bounds the reaction to SIGTERM
FLUSH_SECONDS = 0.05  # batch text deltas into one event post at most this often


class GenerationOver(Exception):
    """The coordinator says our generation is no longer current (HTTP 409)."""


@dataclass
class Totals:
    """Running counters behind WorkerMetrics."""

    tokens_processed: int = 0
    steps: int = 0


class Queue:
    """Rank 0's HTTP client for the internal work-queue routes."""

    def __init__(self, a: Assignment, token: str):
        self.a = a
        self.http = httpx.Client(
            base_url=a.coordinator_url.rstrip("/") + "/internal/v1",
            headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
            timeout=POLL_SECONDS + 10.0,
        )

    def post(self, path: str, message) -> httpx.Response:
        r = self.http.post(path, content=message.model_dump_json())
        if r.status_code == 409:
            raise GenerationOver(r.text[:200])
        r.raise_for_status()
        return r

    def next_request(self) -> GenerationRequest | None:
        """The next request, or None after POLL_SECONDS without one."""
        poll = WorkPoll(
            worker_id=self.a.worker_id, generation=self.a.generation, wait_seconds=POLL_SECONDS
        )
        r = self.post("/work/next", poll)
        return None if r.status_code == 204 else decode(GenerationRequest, r.content)

    def events(self, request_id: str, events: list[GenerationEvent]) -> bool:
        """Post events; True when the request was cancelled (or can no longer be delivered)."""
        try:
            r = self.post(f"/work/{request_id}/events", EventBatch(events=events))
            return decode(CancelStatus, r.content).cancelled
        except httpx.HTTPError as e:
            log.warning("posting events for %s failed: %s; stopping it", request_id, e)
            return True


# --- rank 0: turning a request into a broadcast message -------------------------------------


def prompt_ids_for(tokenizer, req: GenerationRequest) -> list[int]:
    """Token ids of the chat-templated conversation, or of the raw completion prompt."""
    if req.kind == "completion":
        return encode_prompt(tokenizer, req.prompt or "", chat=False)
    messages = [m.model_dump() for m in req.messages or []]
    return encode_prompt(tokenizer, messages, chat=True)


def plan_request(tokenizer, model: Model, req: GenerationRequest) -> dict:
    """The "generate" control message; raises ValueError for a request we cannot run."""
    ids = prompt_ids_for(tokenizer, req)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    limit = model.args.max_position_embeddings
    if len(ids) + req.max_tokens > limit:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )
    params = SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=tuple(req.stop),
        stop_token_ids=stop_ids(tokenizer, model),
    )
    return {"op": "generate", "prompt_ids": ids, "params": params.model_dump(mode="json")}


def next_message(queue: Queue, tokenizer, model: Model, pending: list) -> dict:
    """Rank 0: poll once; the control message to broadcast. `pending` gets the request."""
    try:
        req = queue.next_request()
    except GenerationOver:
        return {"op": "exit"}
    except httpx.HTTPError as e:
        log.warning("polling for work failed: %s", e)
        time.sleep(POLL_SECONDS)
        return {"op": "idle"}
    if req is None:
        return {"op": "idle"}
    try:
        msg = plan_request(tokenizer, model, req)
    except Exception as e:  # a bad request fails alone; the engine keeps serving
        log.warning("request %s refused: %s", req.request_id, e)
        queue.events(req.request_id, [GenerationEvent(finish_reason="error", error=str(e))])
        return {"op": "idle"}
    pending.append(req)
    return msg


# --- running one request --------------------------------------------------------------------


def stream_to_queue(
    queue: Queue, model: Model, tokenizer, req: GenerationRequest, ids: list[int], params
) -> int:
    """Rank 0: generate, posting batched text events; returns the completion token count."""
    cancelled = [False]
    batch: list[GenerationEvent] = []
    last_post = time.monotonic()
    n = 0
    for r in stream_generate(model, tokenizer, ids, params, should_cancel=lambda: cancelled[0]):
        n = r.generation_tokens
        finish = r.finish_reason
        if finish is not None and cancelled[0]:
            finish = "cancelled"
        event = GenerationEvent(
            text=r.text,
            token_ids=[r.token] if r.token is not None else [],
            finish_reason=finish,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=n,
        )
        batch.append(event)
        if finish is not None or time.monotonic() - last_post >= FLUSH_SECONDS:
            if queue.events(req.request_id, merge(batch)):
                cancelled[0] = True
            batch, last_post = [], time.monotonic()
    return n


def merge(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """One event carrying the batch's text and ids; counts and finish from the last one."""
    last = events[-1]
    return [
        last.model_copy(
            update={
                "text": "".join(e.text for e in events),
                "token_ids": [t for e in events for t in e.token_ids],
            }
        )
    ]


def run_generate(msg: dict, ctx: EngineContext, req: GenerationRequest | None) -> None:
    """Every rank: run one request; rank 0 streams it, the others follow silently."""
    params = SamplingParams(**msg["params"])
    ids = msg["prompt_ids"]
    if ctx.comm.rank == 0:
        assert req is not None
        try:
            n = stream_to_queue(ctx.queue, ctx.model, ctx.tokenizer, req, ids, params)
        except Exception as e:
            # Rank 0's host-side failure: the stop flag already ended the other ranks' loop,
            # or generate_step's finally drained the step in flight.
            log.exception("request %s failed", req.request_id)
            ctx.queue.events(req.request_id, [GenerationEvent(finish_reason="error", error=str(e))])
            n = 0
    else:
        n = sum(1 for _ in generate_step(ctx.model, ids, params))
    ctx.totals.tokens_processed += len(ids) + n
    ctx.totals.steps += n
    ctx.report_metrics()


# --- the loop -------------------------------------------------------------------------------


@dataclass
class EngineContext:
    """What every iteration of the serve loop needs."""

    a: Assignment
    comm: Collectives
    model: Model
    tokenizer: object
    queue: Queue
    totals: Totals

    def metrics(self) -> WorkerMetrics:
        seconds = sum(self.comm.stats()["seconds"].values())
        return WorkerMetrics(
            memory_bytes=mx.get_active_memory(),
            peak_memory_bytes=mx.get_peak_memory(),
            tokens_processed=self.totals.tokens_processed,
            collective_seconds=seconds,
            steps=self.totals.steps,
        )

    def report_metrics(self) -> None:
        report = MetricsReport(generation=self.a.generation, metrics=self.metrics())
        try:
            self.queue.post(f"/workers/{self.a.worker_id}/metrics", report)
        except (httpx.HTTPError, GenerationOver) as e:
            log.warning("metrics report failed: %s", e)


def serve(ctx: EngineContext, should_exit: Callable[[], bool]) -> None:
    """Until rank 0 says exit, or any rank was told to stop: one control message a loop."""
    while True:
        pending: list[GenerationRequest] = []
        msg = None
        if ctx.comm.rank == 0:
            msg = next_message(ctx.queue, ctx.tokenizer, ctx.model, pending)
        msg = ctx.comm.broadcast_object(msg)
        if msg["op"] == "generate":
            run_generate(msg, ctx, pending[0] if pending else None)
        # Any rank's SIGTERM ends every rank together, at the same point of the loop.
        wants_exit = mx.array([float(msg["op"] == "exit" or should_exit())])
        if ctx.comm.all_sum(wants_exit).item() > 0:
            return


def spec_of(a: Assignment) -> ModelSpec:
    """Which weights this rank loads: pre-made shards, or the model path/name sliced here."""
    return ModelSpec(
        model=a.model_path or a.model_name,
        shard_dir=a.shard_dir,
        dtype=a.dtype,
        weights=tuple(a.plan_weights),
    )


def run(a: Assignment, token: str) -> None:
    """Join the group, load the shard, report loaded, and serve until told to stop."""
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    start = time.perf_counter()
    comm = Collectives(init_group(a.backend, a.world_size))
    spec = spec_of(a)
    model = load_spec(spec, comm)
    tokenizer = tokenizer_for(spec) if comm.rank == 0 else None
    queue = Queue(a, token)
    ctx = EngineContext(a, comm, model, tokenizer, queue, Totals())
    loaded = LoadedReport(
        generation=a.generation,
        rank=a.rank,
        load_seconds=time.perf_counter() - start,
        metrics=ctx.metrics(),
    )
    queue.post(f"/workers/{a.worker_id}/loaded", loaded)
    log.info("rank %d of %d loaded %s", comm.rank, comm.size, spec.model)
    serve(ctx, lambda: stop[0])
    log.info("rank %d exiting", comm.rank)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="shardcompute.worker.engine")
    p.add_argument("--assignment", required=True, help="Assignment JSON written by the agent")
    args = p.parse_args(argv)
    a = decode(Assignment, Path(args.assignment).read_text())
    token = os.environ.get(CLUSTER_TOKEN_ENV)
    if not token:
        print(f"error: ${CLUSTER_TOKEN_ENV} is not set", file=sys.stderr)
        return 2
    run(a, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine child process: load this rank's shard, then serve the coordinator's work queue.

Run by the worker agent as `python -m shardcompute.worker.engine --assignment PATH` with
MLX_RANK / MLX_HOSTFILE set. SPMD: rank 0 alone talks to the work queue and decides; every
loop it broadcasts one control message ({"op": "idle" | "generate" | "exit"}) and all ranks
act on it, so every rank runs the same collectives in the same order.

Failures keep that order. Rank 0's host-side work on a request (posting events, a fault) that
fails becomes the generation's stop flag, so the request ends with an error on every rank at
the same step and serving goes on. A failure inside the generation itself (the model, a
collective) cannot be matched on the other ranks, so the engine exits and the agent and the
coordinator replace the group. A watchdog ends an engine whose collectives stop making
progress (a lost peer can leave MLX's ring waiting forever).
"""

from __future__ import annotations

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.engine.generate import GenerationResponse, generate_step, stream_generate
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.rank_main import encode_prompt, load_spec, stop_ids, tokenizer_for
from shardcompute.http_client import http_client
from shardcompute.model.llama import Model, collectives_per_forward
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
FAULT_ENV = "SHARDCOMPUTE_ENGINE_FAULT_WORD"
FAULT_AT_TOKEN = 3  # where the `stream` fault strikes: mid-generation, tokens already out
WATCHDOG_EXIT_CODE = 3


class GenerationOver(Exception):
    """The coordinator says our generation is no longer current (HTTP 409)."""


class EngineBroken(Exception):
    """The generation failed where the other ranks cannot follow; this engine must exit."""


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection knob (see Faults)."""


@dataclass
class Totals:
    """Running counters behind WorkerMetrics."""

    tokens_processed: int = 0
    steps: int = 0


class Queue:
    """Rank 0's HTTP client for the internal work-queue routes."""

    def __init__(self, a: Assignment, token: str):
        self.a = a
        self.http = http_client(
            a.coordinator_url.rstrip("/") + "/internal/v1",
            ca_file=a.tls_ca,
            token=token,
            timeout=POLL_SECONDS + 10.0,
            headers={"content-type": "application/json"},
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
        except (httpx.HTTPError, GenerationOver, ValueError) as e:
            # A stale generation is noticed by the next poll, which ends the loop in step.
            log.warning("posting events for %s failed: %s; stopping it", request_id, e)
            return True


# --- rank 0: turning a request into a broadcast message -------------------------------------


def prompt_ids_for(tokenizer, req: GenerationRequest) -> list[int]:
    """Token ids of the chat-templated conversation, or of the raw completion prompt."""
    if req.prompt_ids is not None:  # tokenized and checked at the coordinator's door
        return req.prompt_ids
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
    except (httpx.HTTPError, ValueError) as e:  # unreachable, or a reply we cannot read
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


# --- rank 0's host side of one request -------------------------------------------------------


def request_text(req: GenerationRequest) -> str:
    """The prompt, or every message's content: what the fault knob looks for."""
    return req.prompt if req.kind == "completion" else "\n".join(m.content for m in req.messages)


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests; off unless $SHARDCOMPUTE_ENGINE_FAULT_WORD is set.

    Then a request whose text contains `<word>:start` makes rank 0 raise InjectedFault just
    after the request was broadcast, and `<word>:stream` at generated token FAULT_AT_TOKEN.
    """

    word: str | None = None

    @classmethod
    def from_env(cls) -> Faults:
        return cls(os.environ.get(FAULT_ENV) or None)

    def check(self, req: GenerationRequest, point: str, tokens: int = 0) -> None:
        if self.word is None or (point == "stream" and tokens < FAULT_AT_TOKEN):
            return
        if f"{self.word}:{point}" in request_text(req):
            raise InjectedFault(f"injected fault at {point!r} (${FAULT_ENV}={self.word})")


class RequestStream:
    """Rank 0's host side of one request: posts its events in batches. A failure here ends
    the request through the stop flag, so every rank still runs the same steps."""

    def __init__(self, queue: Queue, req: GenerationRequest, faults: Faults):
        self.queue, self.req, self.faults = queue, req, faults
        self.cancelled = False
        self.error: str | None = None
        self.batch: list[GenerationEvent] = []
        self.last_post = time.monotonic()

    def should_stop(self) -> bool:
        """stream_generate's `should_cancel`: the client went away, or we failed."""
        return self.cancelled or self.error is not None

    def guard(self, work: Callable, *args) -> None:
        """Run host-side work; a failure stops the request, never the serve loop."""
        try:
            work(*args)
        except Exception as e:
            if self.error is None:
                log.exception("request %s failed; stopping it on every rank", self.req.request_id)
                self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self.faults.check(self.req, "start")

    def add(self, r: GenerationResponse) -> None:
        """Batch one response as an event; post the batch when due, or when it is the last."""
        if self.error is not None:
            return
        self.faults.check(self.req, "stream", r.generation_tokens)
        finish = "cancelled" if r.finish_reason and self.cancelled else r.finish_reason
        event = GenerationEvent(
            text=r.text,
            token_ids=[r.token] if r.token is not None else [],
            finish_reason=finish,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.generation_tokens,
        )
        self.batch.append(event)
        if finish is not None or time.monotonic() - self.last_post >= FLUSH_SECONDS:
            if self.queue.events(self.req.request_id, merge(self.batch)):
                self.cancelled = True
            self.batch, self.last_post = [], time.monotonic()

    def fail(self, message: str) -> None:
        """End the request with an error event."""
        event = GenerationEvent(finish_reason="error", error=message)
        self.queue.events(self.req.request_id, [event])


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


def lead(ctx: EngineContext, req: GenerationRequest, ids: list[int], params) -> int:
    """Rank 0: generate `req`, streaming it to the queue; returns the completion token count."""
    stream = RequestStream(ctx.queue, req, ctx.faults)
    stream.guard(stream.start)  # a failure here still runs the steps, stopped at the first
    n = 0
    try:
        gen = stream_generate(
            ctx.model,
            ctx.tokenizer,
            ids,
            params,
            should_cancel=ctx.watchdog.petting(stream.should_stop),
        )
        for r in gen:
            n = r.generation_tokens
            stream.guard(stream.add, r)
    except Exception as e:
        # The followers are at a step we can no longer match: only a new group is safe.
        stream.fail(f"the engine failed mid-generation and is restarting: {type(e).__name__}: {e}")
        raise EngineBroken(f"request {req.request_id}: {e}") from e
    if stream.error is not None:
        stream.fail(f"the engine failed this request: {stream.error}")
    return n


def run_generate(msg: dict, ctx: EngineContext, req: GenerationRequest | None) -> None:
    """Every rank: run one request; rank 0 streams it, the others follow silently."""
    params = SamplingParams(**msg["params"])
    ids = msg["prompt_ids"]
    if ctx.comm.rank == 0:
        assert req is not None
        n = lead(ctx, req, ids, params)
    else:
        n = 0
        for _ in generate_step(ctx.model, ids, params):
            n += 1
            ctx.watchdog.pet()
    ctx.totals.tokens_processed += len(ids) + n
    ctx.totals.steps += n
    ctx.report_metrics()


# --- the loop -------------------------------------------------------------------------------


class Watchdog:
    """Exits the process when the serve loop makes no progress for `timeout` seconds.

    MLX's ring has no timeouts: after a peer is lost, a collective can wait forever. Progress
    is one loop turn or one generated token, so `timeout` must exceed the slowest step. The
    watch starts at the first progress, the first broadcast, which every rank reaches only
    once all have loaded (ranks load at different speeds).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last = 0.0
        self._thread: threading.Thread | None = None

    def pet(self) -> None:
        """Note progress (the first time, start watching)."""
        self.last = time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def petting(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """`should_stop`, noting progress each time a generation step asks it."""

        def petted() -> bool:
            self.pet()
            return should_stop()

        return petted

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            stalled = time.monotonic() - self.last
            if stalled > self.timeout:
                log.error(
                    "no progress for %.1fs (collective_timeout_seconds=%s): a peer is gone "
                    "or stuck; exiting",
                    stalled,
                    self.timeout,
                )
                logging.shutdown()
                os._exit(WATCHDOG_EXIT_CODE)


@dataclass
class EngineContext:
    """What every iteration of the serve loop needs."""

    a: Assignment
    comm: Collectives
    model: Model
    tokenizer: object
    queue: Queue
    totals: Totals
    faults: Faults
    watchdog: Watchdog

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
        ctx.watchdog.pet()
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
    # Trace the compiled decode step (and, on a fresh machine, build its kernels) now, on
    # every rank together, rather than in the first request's time to first token.
    for _ in generate_step(model, [0], SamplingParams(max_tokens=2)):
        pass
    tokenizer = tokenizer_for(spec) if comm.rank == 0 else None
    queue = Queue(a, token)
    watchdog = Watchdog(a.collective_timeout_seconds)
    ctx = EngineContext(a, comm, model, tokenizer, queue, Totals(), Faults.from_env(), watchdog)
    loaded = LoadedReport(
        generation=a.generation,
        rank=a.rank,
        load_seconds=time.perf_counter() - start,
        metrics=ctx.metrics(),
        plan=model.plan.to_dict(),  # for the dashboard
        collectives_per_token=collectives_per_forward(model.args),
        dtype=model.policy.describe(),
    )
    try:
        queue.post(f"/workers/{a.worker_id}/loaded", loaded)
    except (GenerationOver, httpx.HTTPStatusError) as e:  # replaced while loading
        log.info("rank %d of generation %d is no longer wanted: %s", a.rank, a.generation, e)
        return
    log.info(
        "rank %d of %d loaded %s as %s",
        comm.rank,
        comm.size,
        spec.model,
        model.policy.describe(),
    )
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
    try:
        run(a, token)
    except EngineBroken as e:
        log.exception("rank %d exiting: %s", a.rank, e)
        # Not a normal interpreter exit: a step may still be in flight on MLX's stream, waiting
        # on a lost peer, and tearing MLX down would wait for it forever.
        logging.shutdown()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

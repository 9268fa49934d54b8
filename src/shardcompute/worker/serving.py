"""Rank 0's serving side: requests from the coordinator's queue into the leader, and each
request's tokens back to the coordinator as text. Threads of their own, so HTTP never holds
up a step:
- the poller takes up to the free rows' worth of requests per poll, and learns which requests
  the coordinator cancelled (their clients went away);
- the poster turns tokens into text (incremental detokenization, stop strings) and posts each
  request's events at most every FLUSH_SECONDS.
A request whose host-side work fails (preparing it, its text, posting it) fails alone: it gets
an error event and leaves the batch at the next step. Nothing here imports MLX.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shardcompute.engine.leader import EngineLeader
from shardcompute.engine.scheduler import Event, Request, Sampling
from shardcompute.engine.text import StreamingDetokenizer, cut_at_stop
from shardcompute.model.tokenizer import encode_chat, encode_text
from shardcompute.model_spec import ModelArgs
from shardcompute.protocol import GenerationEvent, GenerationRequest
from shardcompute.worker.queue_client import CoordinatorAway, GenerationOver, QueueClient

log = logging.getLogger("shardcompute.engine")

FLUSH_SECONDS = 0.05  # a request's text deltas go out in one post at most this often
FULL_WAIT_SECONDS = 0.25  # every row held: how often cancellations are collected
FAULT_ENV = "SHARDCOMPUTE_ENGINE_FAULT_WORD"
FAULT_AT_TOKEN = 3  # where the `stream` fault strikes: mid-generation, tokens already out
MAX_SEED = (1 << 63) - 1


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection knob (see Faults)."""


def request_text(req: GenerationRequest) -> str:
    """The prompt, or every message's content: what the fault knob looks for."""
    return req.prompt if req.kind == "completion" else "\n".join(m.content for m in req.messages)


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests; off unless $SHARDCOMPUTE_ENGINE_FAULT_WORD is set.

    Then a request whose text contains `<word>:start` fails while rank 0 prepares it, and
    `<word>:stream` at generated token FAULT_AT_TOKEN, while its text is being made.
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


@dataclass
class Preparer:
    """A coordinator's request as a scheduler request. The coordinator checked it at the door;
    everything that reaches MLX is checked again here, so no request can take the engine down."""

    tokenizer: object
    args: ModelArgs
    stop_token_ids: frozenset[int]
    faults: Faults = field(default_factory=Faults)
    clock: Callable[[], float] = time.monotonic

    def __call__(self, req: GenerationRequest) -> Request:
        self.faults.check(req, "start")
        ids = self._prompt_ids(req)
        vocab, context = self.args.vocab_size, self.args.max_position_embeddings
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        if len(ids) + req.max_tokens > context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                f"model's context of {context} tokens"
            )
        return Request(req.request_id, ids, self._sampling(req), arrival=self.clock())

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.prompt_ids is not None:  # tokenized and checked at the coordinator's door
            return list(req.prompt_ids)
        if req.kind == "completion":
            return encode_text(self.tokenizer, req.prompt or "")
        return encode_chat(self.tokenizer, [m.model_dump() for m in req.messages or []])

    def _sampling(self, req: GenerationRequest) -> Sampling:
        if not math.isfinite(req.temperature) or not 0 < req.top_p <= 1:
            raise ValueError(f"temperature={req.temperature}, top_p={req.top_p}: out of range")
        seed = req.seed
        if seed is None:  # the plan carries rank 0's draw to every rank
            seed = secrets.randbits(63) if req.temperature > 0 else 0
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside 0..{MAX_SEED}")
        return Sampling(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=min(req.top_k, self.args.vocab_size),
            top_p=req.top_p,
            seed=seed,
            stop_token_ids=self.stop_token_ids,
        )


@dataclass
class Stream:
    """One request's text on its way out: deltas batched into posts."""

    req: GenerationRequest
    detok: StreamingDetokenizer
    prompt_tokens: int
    tokens: int = 0
    batch: list[GenerationEvent] = field(default_factory=list)
    last_post: float = 0.0
    done: bool = False
    queue_seconds: float | None = None


class ServingIO:
    """The poller and poster threads of rank 0 (see the module docstring)."""

    def __init__(
        self,
        leader: EngineLeader,
        client: QueueClient,
        prepare: Preparer,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.leader, self.client, self.prepare, self.clock = leader, client, prepare, clock
        self.over = threading.Event()  # our generation is over: every rank should exit
        self._outbox: queue.SimpleQueue[list[Event]] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._row_freed = threading.Event()  # a request ended: the poller may take another
        self._threads = [
            threading.Thread(target=self._poll_loop, name="poller", daemon=True),
            threading.Thread(target=self._post_loop, name="poster", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def sink(self, events: list[Event]) -> None:
        """The leader's events, from the step loop's thread: handed to the poster."""
        self._outbox.put(events)

    def stop(self, message: str) -> None:
        """End: every request still open gets an error event with `message`."""
        self.over.set()
        with self._lock:
            open_ = [s for s in self._streams.values() if not s.done]
        for s in open_:
            self._post_final(s, GenerationEvent(finish_reason="error", error=message))

    # --- the poller ---------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self.over.is_set():
            free = self._free_rows()
            if free == 0 and self._row_freed.wait(FULL_WAIT_SECONDS):
                self._row_freed.clear()  # a request ended: take its row's successor at once
                continue
            try:  # every row held: no new requests, but the cancellations, right away
                batch = self.client.poll(free) if free else self.client.poll(0, wait_seconds=0)
            except GenerationOver:
                self.over.set()  # replaced: the step loop ends every rank together
                return
            except CoordinatorAway as e:
                log.warning("polling for work failed: %s; retrying", e)
                time.sleep(1.0)
                continue
            except Exception:  # a reply we cannot read: log it, keep serving
                log.exception("polling for work failed")
                time.sleep(1.0)
                continue
            for req in batch.requests:
                self._take(req)
            for request_id in batch.cancelled:
                self.leader.abort(request_id, "cancelled")

    def _free_rows(self) -> int:
        """Rows no request holds or waits for: every request taken and not yet ended counts,
        whether it runs, waits in the scheduler or is still on its way to it."""
        with self._lock:
            held = len(self._streams)
        return max(0, self.leader.scheduler.config.max_batch_size - held)

    def _take(self, req: GenerationRequest) -> None:
        try:
            request = self.prepare(req)
        except Exception as e:  # a bad request fails alone; the engine keeps serving
            log.warning("request %s refused: %s", req.request_id, e)
            error = GenerationEvent(finish_reason="error", error=str(e))
            self.client.post_events({req.request_id: [error]})
            return
        stream = Stream(req, StreamingDetokenizer(self.prepare.tokenizer), len(request.prompt))
        with self._lock:
            self._streams[req.request_id] = stream
        self.leader.submit(request)

    # --- the poster ----------------------------------------------------------------------------

    def _post_loop(self) -> None:
        while not self.over.is_set():
            try:
                events = self._outbox.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                events = []
            for event in events:
                self._on_event(event)
            self._flush(due_only=True)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            stream = self._streams.get(event.request_id)
        if stream is None or stream.done:
            return
        try:
            self._add(stream, event)
        except Exception as e:
            log.exception("request %s failed; stopping it", event.request_id)
            message = f"the engine failed this request: {type(e).__name__}: {e}"
            self.leader.abort(event.request_id, "error", message)
            self._post_final(stream, GenerationEvent(finish_reason="error", error=message))

    def _add(self, stream: Stream, event: Event) -> None:
        """One scheduler event as text: a delta, and on the last one why it ended."""
        if event.queue_seconds is not None:
            stream.queue_seconds = event.queue_seconds
        if event.token is None:  # cancelled or failed: no token comes with it
            final = GenerationEvent(finish_reason=event.finish_reason, error=event.error)
            self._post_final(stream, final)
            return
        stream.tokens += 1
        self.prepare.faults.check(stream.req, "stream", stream.tokens)
        finish = event.finish_reason
        if event.token in self.prepare.stop_token_ids:  # no text: what is held back goes out
            delta = stream.detok.flush()
        else:
            delta = stream.detok.add(event.token)
            delta, hit = cut_at_stop(stream.detok.text, delta, stream.req.stop)
            if hit:  # the text ends before the stop string; the row leaves at the next step
                finish = "stop"
                self.leader.abort(stream.req.request_id, "stop")
            elif finish is not None:
                delta += stream.detok.flush()
        stream.batch.append(self._event(stream, delta, [event.token], finish))
        if finish is not None:
            self._post_final(stream, None)

    def _event(self, stream: Stream, text: str, ids: list[int], finish: str | None):
        first = stream.tokens == 1
        return GenerationEvent(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.tokens,
            queue_seconds=stream.queue_seconds if first else None,
        )

    def _flush(self, due_only: bool) -> None:
        """Post, in one request to the coordinator, every stream's batched events (with
        `due_only`, those of streams whose last post is FLUSH_SECONDS old)."""
        now = self.clock()
        with self._lock:
            streams = list(self._streams.values())
        self._post(
            [s for s in streams if s.batch and (not due_only or now - s.last_post >= FLUSH_SECONDS)]
        )

    def _post(self, streams: list[Stream]) -> None:
        if not streams:
            return
        posts = {}
        for stream in streams:
            posts[stream.req.request_id], stream.batch = merge(stream.batch), []
            stream.last_post = self.clock()
        stop = self.client.post_events(posts)
        for stream in streams:
            if stream.req.request_id in stop and not stream.done:
                self.leader.abort(stream.req.request_id, "cancelled")  # its client went away

    def _post_final(self, stream: Stream, final: GenerationEvent | None) -> None:
        """Post what is batched and the last event, then forget the request."""
        if final is not None:
            stream.batch.append(final.model_copy(update={
                "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.tokens,
            }))  # fmt: skip
        stream.done = True
        if stream.batch:
            self._post([stream])
        with self._lock:
            self._streams.pop(stream.req.request_id, None)
        self._row_freed.set()


def merge(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """One event carrying a batch's text and ids; counts, errors and finish from the last, the
    queue time from the first."""
    first, last = events[0], events[-1]
    update = {
        "text": "".join(e.text for e in events),
        "token_ids": [t for e in events for t in e.token_ids],
        "queue_seconds": first.queue_seconds,
    }
    return [last.model_copy(update=update)]

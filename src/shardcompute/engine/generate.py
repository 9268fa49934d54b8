"""Generation in three layers: `generate_step` (token ids, every rank) -> `stream_generate`
(text deltas and timings, rank 0) -> `generate` (a string).

SPMD: every rank runs `generate_step` with the same prompt and the same step count. Each step
ends in one small all-gather that gives every rank the same message [token, stop] (see
`VocabParallelChooser`). `stop` is rank 0's host-side decision (a stop string, a cancelled
request), so all ranks end together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from shardcompute.collectives.group import Collectives
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.sampling import VocabParallelChooser
from shardcompute.model.llama import Model

PREFILL_STEP = 512


def generate_step(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Yield generated token ids; ends at max_tokens, a stop token, or rank 0's stop flag."""
    comm, cache = model.comm, model.make_cache()
    stop_ids = set(params.stop_token_ids)
    if not prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    choose = VocabParallelChooser(params, model.lm_head, shared_seed(comm, params))

    def step(ids: mx.array) -> mx.array:
        """ids (1, L) -> the step message (2,) int32: [token, stop]."""
        flag = int(bool(should_stop and should_stop())) if comm.rank == 0 else 0
        return choose(model.last_hidden(ids, cache), flag)

    prompt = mx.array(prompt_ids, dtype=mx.int32)[None]
    while prompt.shape[1] > PREFILL_STEP:  # chunked prefill bounds peak memory
        mx.eval(model.last_hidden(prompt[:, :PREFILL_STEP], cache))
        prompt = prompt[:, PREFILL_STEP:]
    y = next_y = step(prompt)
    mx.async_eval(y)
    failed = False
    try:
        for n in range(params.max_tokens):
            if n + 1 < params.max_tokens:  # build the next step while this one computes
                next_y = step(y[:1][None])
                mx.async_eval(next_y)
            token, stop = y.tolist()
            if stop:
                return
            yield token
            if token in stop_ids:
                return
            y = next_y
    except BaseException as e:
        failed = not isinstance(e, GeneratorExit)  # GeneratorExit: the consumer stopped early
        raise
    finally:
        # Finish the step in flight on every rank, so none exits with a peer mid-collective.
        # Not after a failure: a lost peer would leave that step waiting forever.
        if not failed:
            mx.eval(next_y)


def shared_seed(comm: Collectives, params: SamplingParams) -> int:
    """The request's seed, or rank 0's random one sent to all: sampling must agree across ranks."""
    if params.seed is not None or params.temperature == 0:
        return params.seed or 0
    seed = int.from_bytes(os.urandom(3), "little") if comm.rank == 0 else 0
    return int(comm.broadcast(mx.array([seed], mx.int32)).item()) if comm.size > 1 else seed


@dataclass
class GenerationResponse:
    """One streamed piece of output, with running counts and rates."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None  # "stop" | "length" | None while running


class StreamingDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        delta, self.text = text[len(self.text) :], text
        return delta


def stream_generate(
    model: Model,
    tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    should_cancel: Callable[[], bool] | None = None,
) -> Iterator[GenerationResponse]:
    """Rank 0's view: text deltas as they come; the last response has finish_reason set.

    Stop strings and cancellation end the request on every rank through the stop flag.
    """
    detok, stopping, text = StreamingDetokenizer(tokenizer), [False], ""

    def should_stop() -> bool:
        return stopping[0] or bool(should_cancel and should_cancel())

    start = time.perf_counter()
    prompt_tps, gen_start, n, finish = 0.0, start, 0, "length"
    for token in generate_step(model, prompt_ids, params, should_stop):
        if stopping[0]:
            continue  # tokens already in flight when we decided to stop
        if n == 0:
            gen_start = time.perf_counter()
            prompt_tps = len(prompt_ids) / (gen_start - start)
        n += 1
        if token in params.stop_token_ids:
            finish = "stop"  # generate_step ends here by itself, on every rank
            continue
        delta = detok.add(token)
        text += delta
        delta, hit = _cut_at_stop(text, delta, params.stop)
        if hit:
            stopping[0], finish = True, "stop"
        gen_tps = (n - 1) / max(time.perf_counter() - gen_start, 1e-9)
        yield GenerationResponse(delta, token, len(prompt_ids), prompt_tps, n, gen_tps)
    gen_tps = (n - 1) / max(time.perf_counter() - gen_start, 1e-9) if n > 1 else 0.0
    tail = "" if finish == "stop" and stopping[0] else detok.flush()
    yield GenerationResponse(tail, None, len(prompt_ids), prompt_tps, n, gen_tps, finish)


def _cut_at_stop(text: str, delta: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Trim `delta` so the emitted text ends before the first stop string, if one appeared."""
    for s in stops:
        at = text.find(s, max(0, len(text) - len(delta) - len(s)))
        if at != -1:
            keep = at - (len(text) - len(delta))
            return delta[: max(keep, 0)], True
    return delta, False


def generate_tokens(
    model: Model, prompt_ids: Sequence[int], max_tokens: int = 64, temperature: float = 0.0, **kw
) -> list[int]:
    """All generated ids at once (every rank calls this with the same arguments)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return list(generate_step(model, prompt_ids, params))


def generate(model: Model, tokenizer, prompt: str, params: SamplingParams) -> str:
    """Generated text for a raw-text prompt (single process, or rank 0 with followers)."""
    ids = tokenizer.encode(prompt)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, params))

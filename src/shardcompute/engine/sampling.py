"""Sampling parameters and samplers: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, Field

Sampler = Callable[[mx.array], mx.array]  # logits (B, vocab) -> token ids (B,)


class SamplingParams(BaseModel):
    """What to generate and how. Crosses process boundaries as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(64, ge=0)
    temperature: float = Field(0.0, ge=0.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k cut
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text


def make_sampler(params: SamplingParams) -> Sampler:
    """Greedy when temperature is 0; otherwise a seeded categorical over the kept tokens."""
    if params.temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = [mx.random.key(seed)]

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / params.temperature
        if params.top_k:
            logits = _top_k(logits, params.top_k)
        if params.top_p < 1.0:
            logits = _top_p(logits, params.top_p)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logits, key=sub)

    return sample


def _top_k(logits: mx.array, k: int) -> mx.array:
    k = min(k, logits.shape[-1])
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]
    return mx.where(logits < kth, -mx.inf, logits)


def _top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    sorted_logits = mx.where(before >= p, -mx.inf, sorted_logits)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(sorted_logits, inverse, axis=-1)

"""Samplers: greedy, temperature, top-k, top-p, seeded, and the vocab-parallel chooser."""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx

from shardcompute.engine.params import SamplingParams

Sampler = Callable[[mx.array], mx.array]  # logits (B, vocab) -> token ids (B,)


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


class VocabParallelChooser:
    """Picks the next token from a vocab-parallel LM head with one small collective.

    Greedy and plain temperature sampling never gather the logits: each rank takes the argmax
    of its slice (for temperature T, of logits/T plus Gumbel noise: the Gumbel-max trick, an
    exact sample from softmax(logits/T)), and every rank gathers one row per rank of
    [best value, its vocabulary index, stop flag] and keeps the best. The noise is drawn over
    the whole vocabulary from the shared seed and sliced, so every rank, at any world size,
    adds the same noise to the same token. top-k/top-p need the whole distribution: the logits
    are gathered and rank 0's choice goes in the same row format. The result is the step
    message [token, stop] (int32) that every rank sees identically.
    """

    def __init__(self, params: SamplingParams, head, seed: int):
        self.params, self.head = params, head
        self.start, self.end = head.out_range
        self.vocab = sum(head.vocab_sizes)
        if self.vocab >= 1 << 24:
            raise ValueError(f"vocabulary of {self.vocab} tokens: indices must fit float32")
        self.sharded = params.top_k == 0 and params.top_p == 1.0
        self.key = mx.random.key(seed)
        if not self.sharded:
            self.full_sampler = make_sampler(params.model_copy(update={"seed": seed}))

    def __call__(self, h: mx.array, stop_flag: int) -> mx.array:
        """h (1, 1, hidden) -> message (2,) int32: [token, stop]."""
        local = self.head.local_logits(h)[0, -1].astype(mx.float32)  # (local_vocab,)
        flag = mx.array([float(stop_flag)])
        if self.sharded:
            if self.params.temperature > 0:
                self.key, sub = mx.random.split(self.key)
                noise = mx.random.gumbel((self.vocab,), key=sub)[self.start : self.end]
                local = local / self.params.temperature + noise
            best = mx.argmax(local)
            row = mx.concatenate([local[best][None], (best + self.start)[None], flag])
        else:
            token = self.full_sampler(self.head.gather(local[None]))
            row = mx.concatenate([mx.zeros((1,)), token.astype(mx.float32), flag])
        rows = self.head.comm.all_gather(row[None], axis=0)  # (world, 3)
        # First maximum: ranks hold ascending vocab ranges, so ties go to the lowest index.
        pick = mx.argmax(rows[:, 0]) if self.sharded else 0
        return mx.stack([rows[pick, 1], rows[0, 2]]).astype(mx.int32)

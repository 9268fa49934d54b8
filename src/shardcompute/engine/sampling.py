"""Samplers: greedy, temperature, top-k, top-p, seeded, and the vocab-parallel chooser."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class RowSampler:
    """One row's rule for choosing tokens, and its own random stream: a row draws the same
    tokens whatever else is in the batch, and at any world size."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    key: mx.array | None = None

    @classmethod
    def joining(cls, temperature: float, top_k: int, top_p: float, seed: int, skip: int = 0):
        """A fresh row, or a preempted one that already drew `skip` tokens."""
        row = cls(temperature, top_k, top_p, mx.random.key(seed))
        for _ in range(skip):
            row.next_key()
        return row

    @property
    def sharded(self) -> bool:
        """Whether the choice needs only each rank's slice of the logits (no top-k/top-p)."""
        return self.temperature == 0 or (self.top_k == 0 and self.top_p == 1.0)

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


class VocabParallelChooser:
    """Picks each row's next token from a vocab-parallel LM head with one small collective.

    Greedy and plain temperature sampling never gather the logits: each rank takes the argmax
    of its slice (for temperature T, of logits/T plus Gumbel noise: the Gumbel-max trick, an
    exact sample from softmax(logits/T)), and every rank gathers, per row, [best value, its
    vocabulary index] from every rank and keeps the best. A row's noise is drawn over the whole
    vocabulary from its own stream and sliced, so every rank, at any world size and batch,
    adds the same noise to the same token. Rows with top-k/top-p need the whole distribution:
    the logits are gathered, every rank samples the same token from them, and rank 0's entry
    is taken. Every rank gets the same tokens.
    """

    def __init__(self, head):
        self.head = head
        self.start, self.end = head.out_range
        self.vocab = sum(head.vocab_sizes)
        if self.vocab >= 1 << 24:
            raise ValueError(f"vocabulary of {self.vocab} tokens: indices must fit float32")

    def __call__(self, h: mx.array, rows: list[RowSampler]) -> mx.array:
        """h (R, 1, hidden): the rows' last hidden states -> their tokens (R,) int32."""
        # The logits are upcast to float32 here, for sampling, and nowhere else.
        local = self.head.local_logits(h)[:, -1].astype(mx.float32)  # (R, local_vocab)
        adjusted = local
        if any(row.temperature > 0 and row.sharded for row in rows):
            adjusted = mx.stack([self._sharded(local[i], row) for i, row in enumerate(rows)])
        best = mx.argmax(adjusted, axis=-1)
        value = mx.take_along_axis(adjusted, best[:, None], axis=-1)[:, 0]
        index = (best + self.start).astype(mx.float32)
        full = [i for i, row in enumerate(rows) if not row.sharded]
        if full:  # the same on every rank: every rank samples from the same gathered logits
            logits = self.head.gather(local)
            drawn = mx.stack([_sample_full(logits[i], rows[i]) for i in full])
            index[mx.array(full)] = drawn.astype(mx.float32)
        msg = mx.stack([value, index], axis=-1)  # (R, 2)
        every = self.head.comm.all_gather(msg[None], axis=0)  # (world, R, 2)
        # First maximum: ranks hold ascending vocab ranges, so ties go to the lowest index.
        pick = mx.argmax(every[:, :, 0], axis=0)
        if full:
            pick[mx.array(full)] = 0
        return every[pick, mx.arange(len(rows)), 1].astype(mx.int32)

    def _sharded(self, local: mx.array, row: RowSampler) -> mx.array:
        if row.temperature == 0 or not row.sharded:
            return local
        noise = mx.random.gumbel((self.vocab,), key=row.next_key())[self.start : self.end]
        return local / row.temperature + noise


def _sample_full(logits: mx.array, row: RowSampler) -> mx.array:
    """One row's top-k/top-p sample from the whole vocabulary's logits (vocab,)."""
    logits = logits / row.temperature
    if row.top_k:
        logits = _top_k(logits, row.top_k)
    if row.top_p < 1.0:
        logits = _top_p(logits, row.top_p)
    return mx.random.categorical(logits, key=row.next_key())

"""Tokens to text as they come: incremental detokenization and stop strings. No MLX.

Each new token decodes only a short window of the tokens before it, so a long answer costs
the same per token at its end as at its start (decoding the whole list each time made the
thousandth token cost a thousand times the first).
"""

from __future__ import annotations

from collections.abc import Sequence


class StreamingDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8.

    The window starts at `prefix`, a few tokens back: decoders that mark word starts (a
    leading space) need the token before to render the next one as it reads in the whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # window start; tokens before `read` are in the text
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix, len(self.tokens))
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # an incomplete UTF-8 sequence, or nothing visible yet
        delta = now[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is held back, decoded as it is."""
        before = self._decode(self.prefix, self.read)
        delta = self._decode(self.prefix, len(self.tokens))[len(before) :]
        self.prefix = self.read = len(self.tokens)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)


def cut_at_stop(text: str, delta: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Trim `delta` (the end of `text`) so the emitted text ends before the first stop string,
    if one appeared; and whether one did."""
    for s in stops:
        at = text.find(s, max(0, len(text) - len(delta) - len(s)))
        if at != -1:
            keep = at - (len(text) - len(delta))
            return delta[: max(keep, 0)], True
    return delta, False

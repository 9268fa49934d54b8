"""The shape of the batched KV cache, in plain arithmetic: shared by the scheduler (which
budgets it, without MLX) and the cache (which allocates it), so the two cannot disagree.

Rows come in powers of two (a decode step is compiled once per row bucket) and positions in
steps of CAPACITY_STEP (once per capacity). A decode step writes every row of its bucket at
that row's length, the rows that do not decode included (their write is never read), so the
capacity keeps one position free past the longest row.
"""

from __future__ import annotations

from collections.abc import Mapping

CAPACITY_STEP = 256
WINDOW_STEP = 64  # the finest step of a decode step's attention window


def row_bucket(rows: int) -> int:
    """The smallest power of two holding `rows` rows (0 for none)."""
    return 0 if rows <= 0 else 1 << (rows - 1).bit_length()


def kv_shape(lengths: Mapping[int, int]) -> tuple[int, int]:
    """(rows, capacity) of buffers holding rows at these lengths (slot -> positions)."""
    if not lengths:
        return 0, 0
    rows = row_bucket(max(lengths) + 1)
    capacity = -(-(max(lengths.values()) + 1) // CAPACITY_STEP) * CAPACITY_STEP
    return rows, capacity


def attention_window(positions: int, capacity: int) -> int:
    """How many positions of the buffers a decode step attends over when its longest row
    holds `positions`: rounded up to a step of WINDOW_STEP, or of the largest power of two
    within an eighth of the length if larger. A step then reads and exponentiates at most an
    eighth past the rows' ends, and the number of distinct windows (each one trace of the step)
    grows with the logarithm of the length: 8 per doubling."""
    step = max(WINDOW_STEP, 1 << max(0, (positions // 8).bit_length() - 1))
    return min(capacity, -(-positions // step) * step)


def kv_tokens(lengths: Mapping[int, int]) -> int:
    """Positions allocated for rows at these lengths: what the KV budget counts."""
    rows, capacity = kv_shape(lengths)
    return rows * capacity


def fit_shape(current: tuple[int, int], needs: Mapping[int, int], budget: int) -> tuple[int, int]:
    """The cache's next (rows, capacity) for rows at lengths `needs`: grown when needed, shrunk
    when a dimension is at least twice what is needed (not sooner, so a row that comes and goes
    does not copy the cache each time), and never over `budget` positions."""
    need_rows, need_capacity = kv_shape(needs)
    rows, capacity = current

    def settle(have: int, need: int) -> int:
        return have if need <= have < 2 * need else need

    rows, capacity = settle(rows, need_rows), settle(capacity, need_capacity)
    return (rows, capacity) if rows * capacity <= budget else (need_rows, need_capacity)

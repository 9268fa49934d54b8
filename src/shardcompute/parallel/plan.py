"""The partition plan: which slice of every split dimension each rank holds.

Computed from the model's sizes, the world size and optional per-rank weights. Splits land on
whole KV-head groups (with their query heads), and on quantization-group boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import lcm

from shardcompute.errors import PlanError
from shardcompute.model_spec import ModelArgs

Range = tuple[int, int]


def split_units(total: int, weights: Sequence[float], unit: int, what: str) -> list[Range]:
    """Split `total` into contiguous ranges proportional to `weights`, in multiples of `unit`.

    Largest-remainder rounding; ties go to the lower rank. Every rank gets at least one unit.
    """
    if total % unit:
        raise PlanError(f"cannot split {what}={total} into multiples of {unit}")
    n_units, n_ranks = total // unit, len(weights)
    if n_units < n_ranks:
        raise PlanError(
            f"cannot split {what}={total} ({n_units} units of {unit}) across {n_ranks} ranks: "
            "every rank needs at least one unit"
        )
    wsum = float(sum(weights))
    ideal = [n_units * w / wsum for w in weights]
    counts = [max(1, int(q)) for q in ideal]
    while sum(counts) > n_units:  # minimums pushed us over: take from the most over-served
        r = max(range(n_ranks), key=lambda i: (counts[i] - ideal[i], -i))
        counts[r] -= 1
    order = sorted(range(n_ranks), key=lambda i: (-(ideal[i] - counts[i]), i))
    for r in order[: n_units - sum(counts)]:
        counts[r] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c * unit))
        start += c * unit
    return ranges


@dataclass(frozen=True)
class RankSlices:
    """One rank's share of each split dimension, as [start, end) ranges."""

    rank: int
    kv_heads: Range  # KV heads; the rank's query heads are these groups' heads
    heads: Range  # query heads
    intermediate: Range  # MLP hidden units
    hidden: Range  # embedding columns (the embedding all-gathers along hidden)
    vocab: Range  # LM-head rows (the LM head all-gathers along vocab)

    @property
    def local_num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def local_num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def local_intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]


@dataclass(frozen=True)
class PartitionPlan:
    """Slices for every rank of a world, and the weights they came from."""

    world_size: int
    weights: tuple[float, ...]
    ranks: tuple[RankSlices, ...]

    def __getitem__(self, rank: int) -> RankSlices:
        return self.ranks[rank]

    def sizes(self, field: str) -> list[int]:
        """Each rank's extent of one split dimension, e.g. sizes('vocab')."""
        return [getattr(r, field)[1] - getattr(r, field)[0] for r in self.ranks]

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "weights": list(self.weights),
            "ranks": [asdict(r) for r in self.ranks],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PartitionPlan:
        ranks = tuple(
            RankSlices(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
            for r in d["ranks"]
        )
        return cls(int(d["world_size"]), tuple(float(w) for w in d["weights"]), ranks)


def parse_weights(text: str | None, world_size: int) -> tuple[float, ...]:
    """Parse `--weights 2,1`; None means even."""
    if not text:
        return (1.0,) * world_size
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise PlanError(f"--weights {text!r}: expected comma-separated numbers") from None
    if len(weights) != world_size:
        raise PlanError(
            f"--weights {text!r} has {len(weights)} entries for world size {world_size}"
        )
    if any(w <= 0 for w in weights):
        raise PlanError(f"--weights {text!r}: every weight must be positive")
    return weights


def make_plan(
    args: ModelArgs,
    world_size: int,
    weights: Sequence[float] | None = None,
    quant_group: int = 1,
) -> PartitionPlan:
    """Compute the plan. `quant_group` is the quantization group size (1 for float weights)."""
    if world_size < 1:
        raise PlanError(f"world size must be at least 1, got {world_size}")
    weights = tuple(weights) if weights else (1.0,) * world_size
    if len(weights) != world_size:
        raise PlanError(f"{len(weights)} plan weights for world size {world_size}")
    if world_size > args.num_key_value_heads:
        raise PlanError(
            f"world size {world_size} exceeds num_key_value_heads={args.num_key_value_heads}: "
            "attention is split by whole KV heads, so at most "
            f"{args.num_key_value_heads} ranks can share this model"
        )
    # o_proj's input columns are split at head boundaries and must stay on quant groups.
    group_cols = args.n_rep * args.head_dim
    kv_unit = lcm(group_cols, quant_group) // group_cols
    kv = split_units(args.num_key_value_heads, weights, kv_unit, "num_key_value_heads")
    inter = split_units(args.intermediate_size, weights, quant_group, "intermediate_size")
    hidden = split_units(args.hidden_size, weights, quant_group, "hidden_size")
    vocab = split_units(args.vocab_size, weights, 1, "vocab_size")
    ranks = tuple(
        RankSlices(
            rank=r,
            kv_heads=kv[r],
            heads=(kv[r][0] * args.n_rep, kv[r][1] * args.n_rep),
            intermediate=inter[r],
            hidden=hidden[r],
            vocab=vocab[r],
        )
        for r in range(world_size)
    )
    return PartitionPlan(world_size, weights, ranks)

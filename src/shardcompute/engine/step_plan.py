"""The one message between ranks: rank 0's plan for the next step, typed and versioned.

Every rank runs what the plan says, in the same order (SPMD): which rows decode, which rows join
(with their sampling parameters) or leave, which prompt chunks are prefilled, and the KV shape.
On the wire a plan is a fixed-size int32 header, plus a JSON payload only when rows join or
leave or prompts are prefilled; a step that changes nothing (plain decoding) costs one small
collective. The header is summed over ranks, so the same collective carries each follower's
wish to exit (its SIGTERM) to everyone. No MLX here: the scheduler builds plans in plain Python.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shardcompute.errors import ShardComputeError

PLAN_VERSION = 1
KINDS = ("run", "idle", "exit")
# header: version, kind, step, payload bytes, idle ms, exit votes, kv rows, kv capacity, flags...
HEADER_FIELDS = 8


class PlanError(ShardComputeError):
    """A plan header or payload that this rank cannot read (another version, or corrupt)."""


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RowJoin(_Part):
    """A request takes a row: how its tokens are chosen. A preempted request coming back has
    drawn `skip` tokens already, so a seeded row continues its random stream, and decodes from
    `last_token` once its prompt and earlier tokens are prefilled again."""

    slot: int = Field(ge=0)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=1 << 63)
    skip: int = Field(0, ge=0)
    last_token: int | None = Field(None, ge=0)


class PrefillChunk(_Part):
    """Prompt tokens for one row, stored after what the row holds; `last` ends the prompt, and
    the row's first token is chosen from it."""

    slot: int = Field(ge=0)
    tokens: list[int] = Field(min_length=1)
    last: bool = False


class Changes(_Part):
    """The payload: what differs from plain decoding. Leaves are applied first, then joins."""

    leaves: list[int] = []
    joins: list[RowJoin] = []
    prefill: list[PrefillChunk] = []


class StepPlan(_Part):
    """What every rank does next."""

    version: int = PLAN_VERSION
    step: int = Field(0, ge=0)
    kind: Literal["run", "idle", "exit"] = "run"
    decode: list[int] = []  # slots that decode one token each
    changes: Changes = Changes()
    idle_seconds: float = Field(0.0, ge=0)  # kind "idle": every rank waits this long
    kv_rows: int = Field(0, ge=0)  # the KV cache's shape for this step (see kv_layout)
    kv_capacity: int = Field(0, ge=0)

    def payload(self) -> bytes:
        """The JSON payload, or b"" when nothing changes."""
        empty = not (self.changes.leaves or self.changes.joins or self.changes.prefill)
        return b"" if empty else self.changes.model_dump_json().encode()

    def header(self, slots: int, payload: bytes, exit_votes: int = 0) -> list[int]:
        """The fixed-size int32 header: HEADER_FIELDS, then one decode flag per slot."""
        flags = [0] * slots
        for s in self.decode:
            flags[s] = 1
        fields = [
            self.version,
            KINDS.index(self.kind),
            self.step,
            len(payload),
            round(self.idle_seconds * 1000),
            exit_votes,
            self.kv_rows,
            self.kv_capacity,
        ]
        return fields + flags

    @classmethod
    def from_wire(cls, header: list[int], payload: bytes) -> StepPlan:
        """The plan a (summed) header and its payload describe."""
        version, kind, step, _, idle_ms, _, rows, capacity = header[:HEADER_FIELDS]
        if version != PLAN_VERSION or not 0 <= kind < len(KINDS):
            raise PlanError(f"step plan version {version}, kind {kind}: this rank speaks "
                            f"version {PLAN_VERSION}")  # fmt: skip
        changes = Changes.model_validate_json(payload) if payload else Changes()
        decode = [s for s, flag in enumerate(header[HEADER_FIELDS:]) if flag]
        return cls(
            step=step,
            kind=KINDS[kind],
            decode=decode,
            changes=changes,
            idle_seconds=idle_ms / 1000,
            kv_rows=rows,
            kv_capacity=capacity,
        )


def exit_votes(header: list[int]) -> int:
    return header[5]


def payload_length(header: list[int]) -> int:
    return header[3]

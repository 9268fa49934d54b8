"""Per-request sampling parameters: a message that crosses processes as JSON (no MLX here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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

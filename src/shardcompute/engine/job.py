"""What a rank is asked to do, as a versioned JSON message (no pickle between processes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shardcompute.dtypes import DtypeRequest
from shardcompute.engine.params import SamplingParams

JOB_VERSION = 2


def dtype_request(value: Any) -> Any:
    """A bare dtype name ("bfloat16") is a request for that dtype with default options."""
    return {"dtype": value} if isinstance(value, str) else value


class ModelSpec(BaseModel):
    """Which weights a rank loads, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None  # short name, HF dir, .gguf path, or dummy:NAME
    shard_dir: str | None = None  # pre-made shards (then `model` is only for the tokenizer)
    dtype: DtypeRequest = DtypeRequest()
    weights: tuple[float, ...] | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _as_request(cls, value: Any) -> Any:
        return dtype_request(value)


class GenerateJob(BaseModel):
    """One `shardcompute generate` run, handed to every rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = JOB_VERSION
    world_size: int = Field(1, ge=1)
    backend: str = "ring"
    spec: ModelSpec
    prompt: str
    chat: bool = False
    params: SamplingParams = SamplingParams()

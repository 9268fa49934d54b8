"""What a rank is asked to do, as a versioned JSON message (no pickle between processes)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shardcompute.engine.sampling import SamplingParams

JOB_VERSION = 1


class ModelSpec(BaseModel):
    """Which weights a rank loads, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None  # short name, HF dir, .gguf path, or dummy:NAME
    shard_dir: str | None = None  # pre-made shards (then `model` is only for the tokenizer)
    dtype: str = "auto"
    weights: tuple[float, ...] | None = None


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

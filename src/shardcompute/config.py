"""Cluster configuration: a YAML file, then SHARDCOMPUTE_* env vars, then CLI flags.

Keys are dotted paths (`coordinator.port`). An env var names one with a double underscore
between section and key: SHARDCOMPUTE_COORDINATOR__PORT=9000. Every bad value raises
ConfigError naming its key and where the value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardcompute.dtypes import ComputeDtype, DtypeRequest
from shardcompute.errors import ConfigError

ENV_PREFIX = "SHARDCOMPUTE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorConfig(_Section):
    """Where the coordinator listens and how it judges worker health."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    heartbeat_interval_seconds: float = Field(2.0, gt=0)
    heartbeat_timeout_seconds: float = Field(10.0, gt=0)
    max_queued_requests: int = Field(64, ge=1)
    request_timeout_seconds: float = Field(600.0, gt=0)
    max_engine_restarts: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> CoordinatorConfig:
        # A timeout shorter than one interval would declare healthy workers dead.
        if self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise ValueError(
                f"coordinator.heartbeat_timeout_seconds={self.heartbeat_timeout_seconds} must "
                f"exceed coordinator.heartbeat_interval_seconds={self.heartbeat_interval_seconds}"
            )
        return self


class WorkerConfig(_Section):
    """Ports and timeouts of the engines' collective group."""

    collective_port_base: int = Field(29500, ge=1, le=65535)
    # An engine whose steps make no progress for max(this, 5 x its p99 step time) is stalled:
    # its requests fail, the cluster is degraded and the group replaced (worker/watchdog.py).
    stall_seconds: float = Field(8.0, gt=0)


class EngineConfig(_Section):
    """How the engine batches requests: rank 0's scheduler."""

    max_batch_size: int = Field(8, ge=1, le=64)  # requests decoding together
    # KV-cache positions (rows x capacity) in all; None: kv_memory_fraction of free memory.
    max_kv_tokens: int | None = Field(None, ge=256)
    kv_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    # Prompt tokens prefilled per step, in all; None: 256 on the CPU (every running request's
    # step waits for the chunk: 512 tokens hold them for seconds there), 2048 on a GPU.
    prefill_chunk: int | None = Field(None, ge=16)


class ParallelismConfig(_Section):
    """How many ranks and which mx.distributed backend connects them."""

    tensor_parallel_size: int = Field(2, ge=1)
    topology: Literal["ring", "mpi", "nccl", "jaccl", "any"] = "ring"


class ModelConfig(_Section):
    """Which model the cluster serves and how its weights are split."""

    name: str = Field("smollm2-135m", min_length=1)
    path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16", "quantized"] = "auto"
    bits: Literal[4, 8] | None = None  # quantized: None is the checkpoint's own, else 4
    group_size: Literal[32, 64, 128] | None = None  # quantized: None is the checkpoint's, else 64
    compute_dtype: ComputeDtype | None = None  # quantized: None is bf16 on GPUs, f32 on the CPU
    reduce_dtype: ComputeDtype | None = None  # all-reduce payloads; None: the compute dtype
    allow_tf32: bool = False  # float32 matmuls may run as TF32 on CUDA
    # "even", "memory" (proportional to each worker's reported memory) or explicit weights.
    weights: Literal["even", "memory"] | list[float] = "even"
    shard_dir: str | None = None

    @field_validator("bits", "group_size", mode="before")
    @classmethod
    def _env_int(cls, value: Any) -> Any:
        # Env vars and flags give "8"; the file gives 8.
        return int(value) if isinstance(value, str) and value.isdigit() else value

    def dtype_request(self) -> DtypeRequest:
        """The dtype keys as the request every rank resolves on its own device."""
        keys = ("dtype", "bits", "group_size", "compute_dtype", "reduce_dtype", "allow_tf32")
        return DtypeRequest(**{k: getattr(self, k) for k in keys})

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weight_list(cls, value: Any) -> Any:
        # Env vars and flags give "2,1"; the file gives a YAML list.
        if isinstance(value, str) and value not in ("even", "memory"):
            try:
                return [float(w) for w in value.split(",")]
            except ValueError:
                raise ValueError("expected 'even', 'memory' or numbers like 2,1") from None
        return value

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(w <= 0 for w in value)):
            raise ValueError(f"weights must be positive numbers, got {value}")
        return value


class SecurityConfig(_Section):
    """Shared secrets: workers present the cluster token, API clients the API key, and a
    metrics scraper the metrics token (else the API key, when one is set).

    With tls_cert and tls_key the coordinator serves HTTPS; agents (and their engines) verify
    it against tls_ca, a path on their own machine.
    """

    cluster_token: str | None = None
    cluster_token_file: str = "~/.shardcompute/cluster_token"
    api_key: str | None = None
    metrics_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @model_validator(mode="after")
    def _cert_needs_key(self) -> SecurityConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "security.tls_cert and security.tls_key go together: "
                f"got tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}"
            )
        return self


class ClusterConfig(_Section):
    """The whole configuration, frozen once loaded."""

    coordinator: CoordinatorConfig = CoordinatorConfig()
    worker: WorkerConfig = WorkerConfig()
    engine: EngineConfig = EngineConfig()
    parallelism: ParallelismConfig = ParallelismConfig()
    model: ModelConfig = ModelConfig()
    security: SecurityConfig = SecurityConfig()

    @model_validator(mode="after")
    def _weights_match_world(self) -> ClusterConfig:
        weights, size = self.model.weights, self.parallelism.tensor_parallel_size
        if isinstance(weights, list) and len(weights) != size:
            raise ValueError(
                f"model.weights has {len(weights)} entries but "
                f"parallelism.tensor_parallel_size={size}"
            )
        return self


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Load the config file (built-in defaults when None), apply env vars, then `overrides`.

    `overrides` maps dotted keys to values, e.g. {"coordinator.port": 9000}; None values are
    skipped so unset CLI flags leave the file alone.
    """
    data = _read_file(Path(path)) if path is not None else {}
    sources = {key: f"file {path}" for key in _flatten(data)}
    for key, (value, source) in _env_overrides(os.environ if env is None else env).items():
        _set(data, key, value)
        sources[key] = source
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, value)
            sources[key] = "command line"
    return _validate(data, sources)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    # Only SECTION__KEY names are config; other SHARDCOMPUTE_* vars belong to other tools.
    found = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            found[key] = (value, f"env {name}")
    return found


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys.extend(_flatten(v, key + ".") if isinstance(v, Mapping) else [key])
    return keys


def _validate(data: dict[str, Any], sources: Mapping[str, str]) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, sources)) from None


def _describe(error: ValidationError, sources: Mapping[str, str]) -> str:
    """One line per problem: the dotted key, what is wrong, the value and where it came from."""
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"] if not str(p).isdigit()]
        key = ".".join(loc) or "config"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key}")
            continue
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error" and isinstance(item["input"], dict):
            # A check across keys of a section: its message names them.
            lines.append(f"config: {msg}")
            continue
        source = next(
            (src for k, src in sources.items() if k == key or k.startswith(f"{key}.")),
            "defaults",
        )
        lines.append(f"config key {key}: {msg} (got {item['input']!r} from {source})")
    return "; ".join(lines)


def resolve_cluster_token(security: SecurityConfig, create: bool) -> str | None:
    """The configured cluster token, else the one in the token file.

    On one machine the coordinator creates the file (`create=True`) and workers read it, so
    a local cluster is protected without the user handling a secret.
    """
    if security.cluster_token:
        return security.cluster_token
    path = Path(security.cluster_token_file).expanduser()
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    if not create:
        return None
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token

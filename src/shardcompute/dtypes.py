"""The one dtype policy: what a user asks for (`DtypeRequest`), and what a rank runs
(`DtypePolicy`), decided here and nowhere else. Plain Python: no MLX import at module level.

The compute dtype (float32, bfloat16 or float16) is the dtype of every activation, the KV
cache, the RoPE tables, norm weights, quantization scales and biases, and every collective
payload. Logits are upcast to float32 for sampling, and only there. Quantized weights carry a
compute dtype too: bfloat16 on a GPU, as mlx-lm runs them; float32 on the CPU, where MLX's
bf16 kernels are slow (SmolLM2 4-bit decode: 4.9 tok/s with float32, 0.6 with bfloat16).

float32 means IEEE float32 on every backend: MLX's CUDA backend multiplies float32 in TF32
unless MLX_ENABLE_TF32=0, so every rank process that computes in float32 gets that in its
environment before MLX loads (see `policy_env`), unless `allow_tf32` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shardcompute.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES, "quantized")
BITS_CHOICES = (4, 8)
GROUP_CHOICES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP = 4, 64  # mlx-lm's default affine quantization
QUANTIZED_COMPUTE = {"gpu": "bfloat16", "cpu": "float32"}  # by device, unless asked
TF32_ENV = "MLX_ENABLE_TF32"

ComputeDtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class QuantSpec:
    """MLX affine quantization of one weight: `group_size` columns share a scale and bias."""

    group_size: int
    bits: int

    @classmethod
    def infer(cls, weight, scales, in_features: int) -> QuantSpec:
        """Read the spec off packed shapes: weight (out, in*bits/32), scales (out, in/group).

        `in_features` is needed: the shapes alone cannot tell 4-bit/group-32 from 2-bit/group-64.
        """
        packed, groups = weight.shape[-1], scales.shape[-1]
        bits, group = packed * 32 // in_features, in_features // max(groups, 1)
        if packed * 32 != bits * in_features or group * groups != in_features:
            raise ValueError(
                f"quantized shapes {tuple(weight.shape)}/{tuple(scales.shape)} do not fit "
                f"{in_features} input features"
            )
        return cls(group, bits)

    def packed_cols(self, cols: int) -> int:
        return cols * self.bits // 32

    def describe(self) -> str:
        return f"{self.bits}-bit, group {self.group_size}"


def main_quant(quant: Mapping[str, QuantSpec]) -> QuantSpec | None:
    """The quantization most quantized weights of a module map have (None if none is)."""
    specs = list(quant.values())
    return max(set(specs), key=specs.count) if specs else None


class DtypeRequest(BaseModel):
    """What the user asked for (flags, config, job files). Crosses processes as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16", "quantized"] = "auto"
    bits: Literal[4, 8] | None = None  # None: the checkpoint's own, else DEFAULT_BITS
    group_size: Literal[32, 64, 128] | None = None  # None: the checkpoint's own, else 64
    compute_dtype: ComputeDtype | None = None  # quantized only; None: by device
    reduce_dtype: ComputeDtype | None = None  # all-reduce payloads; None: the compute dtype
    allow_tf32: bool = False


@dataclass(frozen=True)
class DtypePolicy:
    """What one rank runs in, resolved from a request on a device."""

    compute: ComputeDtype
    quantized: bool = False
    bits: int | None = None  # as asked; see `target_quant`
    group_size: int | None = None
    reduce: ComputeDtype | None = None
    allow_tf32: bool = False
    reason: str = ""  # why `auto` chose this, for status lines

    @property
    def name(self) -> str:
        return "quantized" if self.quantized else self.compute

    @property
    def reduce_dtype(self) -> ComputeDtype:
        return self.reduce or self.compute

    @property
    def tf32_off(self) -> bool:
        """Whether this policy needs MLX_ENABLE_TF32=0 (IEEE float32 matmuls)."""
        return self.compute == "float32" and not self.allow_tf32

    def target_quant(self, checkpoint_quant: QuantSpec | None) -> QuantSpec | None:
        """The quantization weights end up in: None for float weights. A quantized checkpoint
        keeps its own groups (GGUF Q4_0/Q4_1/Q8_0: 32) unless bits or group size was asked."""
        if not self.quantized:
            return None
        base = checkpoint_quant or QuantSpec(DEFAULT_GROUP, DEFAULT_BITS)
        return QuantSpec(self.group_size or base.group_size, self.bits or base.bits)

    def describe(self) -> str:
        """e.g. "bfloat16", "quantized (bfloat16 compute)", "float32, TF32 off"."""
        text = f"quantized ({self.compute} compute)" if self.quantized else self.compute
        if self.reduce and self.reduce != self.compute:
            text += f", all-reduce in {self.reduce}"
        if self.compute == "float32":
            text += ", TF32 allowed" if self.allow_tf32 else ", TF32 off"
        return text + (f" ({self.reason})" if self.reason else "")


def resolve(request: DtypeRequest | str, device: Device) -> DtypePolicy:
    """The policy a rank on `device` runs. `auto` is float32 on the CPU (MLX's quantized and
    bf16 CPU matmuls have no fast path) and quantized (bf16 compute) on a GPU."""
    if isinstance(request, str):
        request = DtypeRequest(dtype=request)
    dtype, reason = request.dtype, ""
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "quantized"
        reason = (
            "auto: on the CPU, MLX's quantized and bf16 matmul have no fast path"
            if device == "cpu"
            else "auto: on a GPU, quantized weights stream the fewest bytes"
        )
    quantized = dtype == "quantized"
    _check_quant_flags(request, quantized)
    compute = (request.compute_dtype or QUANTIZED_COMPUTE[device]) if quantized else dtype
    return DtypePolicy(
        compute=compute,
        quantized=quantized,
        bits=request.bits,
        group_size=request.group_size,
        reduce=request.reduce_dtype,
        allow_tf32=request.allow_tf32,
        reason=reason,
    )


def _check_quant_flags(request: DtypeRequest, quantized: bool) -> None:
    if quantized:
        return
    given = [
        f"{name}={value}"
        for name, value in (("bits", request.bits), ("group_size", request.group_size))
        if value is not None
    ]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to dtype 'quantized', not {request.dtype!r}")
    if request.compute_dtype not in (None, request.dtype):
        raise ConfigError(
            f"compute_dtype={request.compute_dtype} applies to dtype 'quantized'; "
            f"dtype {request.dtype!r} computes in {request.dtype}"
        )


def policy_env(policy: DtypePolicy, env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a rank process running `policy`: TF32 off for float32 unless allowed."""
    out = dict(env)
    apply_tf32(policy, out)
    return out


def apply_tf32(policy: DtypePolicy, env: MutableMapping[str, str]) -> None:
    """Set (or, with allow_tf32, remove) MLX_ENABLE_TF32=0 in `env`, e.g. os.environ before
    MLX loads."""
    if policy.tf32_off:
        env[TF32_ENV] = "0"
    else:
        env.pop(TF32_ENV, None)


def tf32_state(env: Mapping[str, str]) -> str:
    """What is in force in a process with `env`: "off" or "allowed"."""
    return "off" if env.get(TF32_ENV) == "0" else "allowed"


def mx_dtype(name: str):
    """The MLX dtype of a compute dtype name (imports MLX: call it in a rank only)."""
    import mlx.core as mx

    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]

"""Frozen model architecture config, under the checkpoint's (HF) names.

Global sizes only: per-rank sizes are derived by the partition plan and named `local_*`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from shardcompute.errors import ModelFormatError

# HF `architectures` entry -> our model_type. All are the Llama block with small variations.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` values we read.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


class ModelArgs(BaseModel):
    """The sizes and constants of a Llama-family checkpoint."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: str = "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (Llama convention)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelArgs:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.model_type == "qwen2":
            object.__setattr__(self, "qkv_bias", True)
        return self

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from a HF `config.json` dict; raise ModelFormatError for unsupported models."""
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known and model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ModelFormatError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        fields = dict(config)
        rope = config.get("rope_parameters")  # transformers 5 layout
        if isinstance(rope, dict):
            fields.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                fields.setdefault("rope_scaling", rope)
        fields["model_type"] = known[0] if known else model_type
        fields.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        if fields.get("head_dim") is None:
            fields.pop("head_dim", None)
        return _validated(fields, source)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> ModelArgs:
        """Build from GGUF metadata: plain Python values (`gguf_file.read_metadata`, MLX-free)
        or MLX scalars (`mx.load(path, return_metadata=True)`)."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ModelFormatError(
                f"{source}: unsupported GGUF architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            return value.item() if hasattr(value, "item") else value

        heads = get("attention.head_count")
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        fields = {
            "model_type": arch,
            "hidden_size": get("embedding_length"),
            "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv", heads),
            "vocab_size": vocab,
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": get("rope.freq_base", 10000.0),
            "max_position_embeddings": get("context_length", 4096),
            "bos_token_id": _meta_int(meta, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _meta_int(meta, "tokenizer.ggml.eos_token_id"),
        }
        key_len = get("attention.key_length")
        if key_len:
            fields["head_dim"] = key_len
        return _validated(fields, source)


def _meta_int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return None if value is None else int(value.item() if hasattr(value, "item") else value)


def _validated(fields: dict[str, Any], source: str) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise ModelFormatError(f"{source}: invalid model config: {problems}") from None


# Real configs for `--dummy-weights NAME`: random weights at realistic sizes for benchmarks.
DUMMY_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        rope_theta=1000000.0,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
}


def dummy_args(name: str) -> ModelArgs:
    """The real config of a well-known model, for random-weight runs."""
    if name not in DUMMY_CONFIGS:
        raise ModelFormatError(
            f"unknown dummy model {name!r}; known: {', '.join(sorted(DUMMY_CONFIGS))}"
        )
    return ModelArgs(**DUMMY_CONFIGS[name])

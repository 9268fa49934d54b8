"""Open checkpoints (HF safetensors directory, GGUF file, or random `dummy:` weights) as
HF-named tensors that are read when sliced.

All name mapping happens here (`sanitize_*`), including GGUF's Q/K row permutation. A HF
directory's tensors are `LazyTensor`s: a rank reads only its own slices (model/tensor_io.py).
Random weights are `DummyTensor`s, generated per slice (model/dummy.py). A GGUF file is read
whole by MLX (its quantized blocks are converted to MLX's layout as a unit), then sliced: each
rank holds the whole file in memory while it loads, which for a quantized file is its size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from shardcompute.dtypes import QuantSpec, main_quant
from shardcompute.errors import ModelFormatError
from shardcompute.model.dummy import dummy_tensors
from shardcompute.model.gguf_file import load_gguf
from shardcompute.model.tensor_io import open_safetensors
from shardcompute.model_spec import ModelArgs, dummy_args

Tensor = Any  # mx.array, LazyTensor or DummyTensor: has .shape, .dtype and slicing

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Checkpoint:
    """A model's config and its full tensors under HF names (read when sliced)."""

    args: ModelArgs
    tensors: dict[str, Tensor]
    source: str
    quant: dict[str, QuantSpec] = field(default_factory=dict)

    def __post_init__(self):
        self.quant = quant_map(self.tensors, self.args, self.source)

    @property
    def main_quant(self) -> QuantSpec | None:
        """The quantization most of the quantized weights have (None for a float checkpoint)."""
        return main_quant(self.quant)


def in_features(prefix: str, args: ModelArgs) -> int:
    """The full input width of the linear/embedding module at `prefix`."""
    if prefix.endswith("o_proj"):
        return args.num_attention_heads * args.head_dim
    if prefix.endswith("down_proj"):
        return args.intermediate_size
    return args.hidden_size


def quant_map(tensors: dict[str, Tensor], args: ModelArgs, source: str) -> dict[str, QuantSpec]:
    """Module path -> QuantSpec for every quantized weight (one that has `.scales`)."""
    out = {}
    for name, scales in tensors.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            try:
                out[prefix] = QuantSpec.infer(
                    tensors[f"{prefix}.weight"], scales, in_features(prefix, args)
                )
            except (KeyError, ValueError) as e:
                raise ModelFormatError(f"{source}: tensor {prefix}: {e}") from None
    return out


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a `.gguf` file or a HF directory (config.json + safetensors)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_dir():
        return read_hf_dir(path)
    raise ModelFormatError(f"{path}: not a .gguf file or a directory with config.json")


def read_gguf(path: Path) -> Checkpoint:
    if not path.is_file():
        raise ModelFormatError(f"{path}: GGUF file not found")
    tensors, meta = load_gguf(path)  # checks the file first: a corrupt header crashes MLX
    args = ModelArgs.from_gguf_metadata(meta, str(path))
    tied = "output.weight" not in tensors
    args = args.model_copy(update={"tie_word_embeddings": tied})
    return Checkpoint(args, sanitize_gguf(tensors, args), str(path))


def _unpermute_rope_rows(t: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's interleaved-RoPE row order (per head: pairs -> halves)."""
    rows = t.shape[0]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def sanitize_gguf(tensors: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """GGUF names -> HF names; Q/K rows back to the HF half-split RoPE layout."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk":
            layer, base, suffix = parts[1], parts[2], ".".join(parts[3:])
            new = f"model.layers.{layer}.{GGUF_NAMES.get(base, base)}.{suffix}"
        else:
            new = f"{GGUF_NAMES.get(parts[0], parts[0])}.{'.'.join(parts[1:])}"
        # llama.cpp permutes Q/K for llama-arch models only; qwen2 is stored as in HF.
        if args.model_type != "qwen2" and base_is(parts, "attn_q"):
            t = _unpermute_rope_rows(t, args.num_attention_heads)
        elif args.model_type != "qwen2" and base_is(parts, "attn_k"):
            t = _unpermute_rope_rows(t, args.num_key_value_heads)
        out[new] = t
    return tie_lm_head(out, args)


def base_is(parts: list[str], base: str) -> bool:
    return parts[0] == "blk" and len(parts) > 2 and parts[2] == base


def tie_lm_head(tensors: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """With tied embeddings the LM head reads the embedding table (sliced by vocab rows)."""
    if args.tie_word_embeddings or "lm_head.weight" not in tensors:
        for name in [n for n in tensors if n.startswith("model.embed_tokens.")]:
            tensors[name.replace("model.embed_tokens.", "lm_head.")] = tensors[name]
    return tensors


def read_hf_dir(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(f"{path}: no config.json (expected a HF model directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{config_file}: invalid JSON ({e})") from None
    args = ModelArgs.from_hf_config(config, str(config_file))
    tensors: dict[str, Tensor] = {}
    for file in safetensors_files(path):
        tensors.update(open_safetensors(file))
    return Checkpoint(args, sanitize_hf(tensors, args), str(path))


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's files: from the sharded index if there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise ModelFormatError(f"{path}: missing safetensors files {missing or '(none found)'}")
    return files


def sanitize_hf(tensors: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Drop buffers HF sometimes saves; alias a tied LM head."""
    out = {k: v for k, v in tensors.items() if "rotary_emb.inv_freq" not in k}
    return tie_lm_head(out, args)


def dummy_checkpoint(name: str, dtype: mx.Dtype, seed: int = 0) -> Checkpoint:
    """A well-known config with random weights in `dtype`, generated per slice."""
    args = dummy_args(name)
    tensors = tie_lm_head(dict(dummy_tensors(args, seed, dtype)), args)
    return Checkpoint(args, tensors, f"dummy:{name}")

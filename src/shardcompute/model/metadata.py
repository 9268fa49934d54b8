"""What the control plane knows of a model, read without MLX: its sizes and its tokenizer.

The coordinator validates requests against these (prompt tokens + max_tokens within the
context) and tokenizes them for the engine. Sources, as the engines read them: a `.gguf`
file, a HF directory, a short name from the model cache, a shard directory (its
`manifest.json` and `tokenizer/`), or `dummy:NAME` (a real config, a byte-level tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardcompute.errors import ModelFormatError
from shardcompute.model.download import resolve_model
from shardcompute.model.tokenizer import ByteTokenizer, load_tokenizer, read_gguf_metadata
from shardcompute.model_spec import ModelArgs, dummy_args

DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class ModelInfo:
    """A model's architecture and tokenizer; `source` says where they were read."""

    args: ModelArgs
    tokenizer: Any  # a transformers fast tokenizer, or ByteTokenizer for dummy models
    source: str

    @property
    def context_length(self) -> int:
        """Positions the model can attend to: prompt and completion together."""
        return self.args.max_position_embeddings


def read_model_info(model: str, shard_dir: str | Path | None = None) -> ModelInfo:
    """The args and tokenizer of `model` (path, short name or dummy:NAME), or of the shards in
    `shard_dir` when given; raises ModelFormatError (or ShardComputeError) naming the source."""
    if model.startswith(DUMMY_PREFIX):
        return ModelInfo(dummy_args(model[len(DUMMY_PREFIX) :]), ByteTokenizer(), model)
    if shard_dir is not None:
        shard_dir = Path(shard_dir)
        args, saved = shard_args(shard_dir), shard_dir / "tokenizer"
        tokenizer = load_tokenizer(saved if saved.is_dir() else resolve_model(model))
        return ModelInfo(args, tokenizer, str(shard_dir))
    path = resolve_model(model)
    return ModelInfo(checkpoint_args(path), load_tokenizer(path), str(path))


def checkpoint_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of a `.gguf` file (its metadata) or a HF directory (its config.json)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return ModelArgs.from_gguf_metadata(read_gguf_metadata(path), str(path))
    config = _read_json(path / "config.json")
    return ModelArgs.from_hf_config(config, str(path / "config.json"))


def shard_args(shard_dir: Path) -> ModelArgs:
    """The ModelArgs recorded in a shard directory's manifest.json."""
    manifest = _read_json(shard_dir / "manifest.json")
    if not isinstance(manifest.get("args"), dict):
        raise ModelFormatError(f"{shard_dir / 'manifest.json'}: no model args (not a manifest)")
    try:
        return ModelArgs(**manifest["args"])
    except ValueError as e:
        raise ModelFormatError(f"{shard_dir / 'manifest.json'}: invalid model args: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

"""The peer in `shardcompute bench --compare`: mlx-lm on the same model, same shapes, same
device, in a process of its own (so its set-up is its own).

- A real checkpoint: `export_hf_dir` writes our dense model (after GGUF un-permutation and
  dequantization) as an HF directory mlx-lm loads, timed with `stream_generate`, EOS banned.
- Random weights (`dummy:NAME`): mlx-lm's own model class is built from the same config with
  its own random weights, in bf16 or 4-bit (group 64) as mlx-lm quantizes, and timed with
  `generate_step`. No export: an 8B comparison costs seconds, not a 32 GB file.
Each prints one JSON row per shape.
"""

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU process sets up its BLAS before MLX)
# isort: on

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from shardcompute.runtime import compute_description


def export_hf_dir(model_src: str, out: Path) -> Path:
    """config.json + model.safetensors (float32) + tokenizer files, once per output dir."""
    from shardcompute.engine.job import ModelSpec
    from shardcompute.engine.rank_main import tokenizer_for
    from shardcompute.model.loader import load_model

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_src, "float32", fuse=False)
    weights = dict(tree_flatten(model.parameters()))
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    config = model.args.model_dump(exclude={"qkv_bias"}, exclude_none=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer_for(ModelSpec(model=model_src)).save_pretrained(str(out))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def time_mlx_lm(model_dir: str, prompt_tokens: int, max_tokens: int, trials: int, seed: int):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(model_dir)
    eos = list(tokenizer.eos_token_ids)

    def ban_eos(tokens, logits):
        logits[..., eos] = -float("inf")
        return logits

    vocab = model.args.vocab_size
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_tokens).tolist()
    results = []
    for _ in range(trials + 1):  # the first is the warm-up
        *_, last = stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, logits_processors=[ban_eos]
        )
        if last.generation_tokens != max_tokens:
            raise RuntimeError(f"mlx-lm made {last.generation_tokens} tokens, not {max_tokens}")
        results.append((last.prompt_tps, last.generation_tps))
    return _row(results[1:])


def random_mlx_lm_model(name: str, dtype: str, bits: int, group_size: int) -> nn.Module:
    """mlx-lm's model class for a dummy config, its own random weights, in bf16 or quantized."""
    from mlx_lm.utils import _get_classes

    from shardcompute.model_spec import DUMMY_CONFIGS

    config = {"model_type": "llama", **DUMMY_CONFIGS[name]}
    config.setdefault("rms_norm_eps", 1e-5)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if dtype == "quantized":
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def time_generate_step(model: nn.Module, prompt_tokens: int, max_tokens: int, trials: int):
    """mlx-lm's `generate_step` (greedy; it never stops by itself): (prefill, decode) tok/s."""
    from mlx_lm.generate import generate_step

    vocab = model.args.vocab_size
    prompt = mx.array(np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist())
    results = []
    for _ in range(trials + 1):  # the first is the warm-up
        start = time.perf_counter()
        for n, _ in enumerate(generate_step(prompt, model, max_tokens=max_tokens), 1):
            if n == 1:
                first = time.perf_counter()
        decode = (max_tokens - 1) / (time.perf_counter() - first)
        results.append((prompt_tokens / (first - start), decode))
    return _row(results[1:])


def _row(results: list[tuple[float, float]]) -> dict:
    return {
        "prefill_tok_s": statistics.median(p for p, _ in results),
        "decode_tok_s": statistics.median(d for _, d in results),
        "blas": compute_description(),
        "mlx_lm_version": _version("mlx-lm"),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardcompute.bench.mlx_lm_peer")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-dir", help="an HF export of a real checkpoint (float32)")
    which.add_argument("--dummy", help="a dummy config name: mlx-lm's own random model")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "quantized"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, nargs="+", required=True)
    p.add_argument("--max-tokens", type=int, nargs="+", required=True)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = random_mlx_lm_model(a.dummy, a.dtype, a.bits, a.group_size) if a.dummy else None
    for prompt_tokens in a.prompt_tokens:
        for max_tokens in a.max_tokens:
            if model is None:
                row = time_mlx_lm(a.model_dir, prompt_tokens, max_tokens, a.trials, a.seed)
            else:
                row = time_generate_step(model, prompt_tokens, max_tokens, a.trials)
            row.update(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

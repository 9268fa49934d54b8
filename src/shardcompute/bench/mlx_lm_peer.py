"""The peer in `shardcompute bench --compare`: mlx-lm on the same weights, same shapes.

`export_hf_dir` writes our dense model (after GGUF un-permutation and dequantization) as an
HF directory mlx-lm loads; `main` (run in its own process, so its BLAS set-up is its own)
times mlx-lm's `stream_generate` with EOS banned and prints one JSON row per shape.
"""

# isort: off
import shardcompute  # noqa: F401  (first: sets up the BLAS before mlx.core)
# isort: on

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from shardcompute import _blas


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
    results = results[1:]
    return {
        "prefill_tok_s": statistics.median(p for p, _ in results),
        "decode_tok_s": statistics.median(d for _, d in results),
        "blas": _blas.loaded.describe() if _blas.loaded else "MLX's bundled BLAS",
        "mlx_lm_version": _version("mlx-lm"),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardcompute.bench.mlx_lm_peer")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt-tokens", type=int, nargs="+", required=True)
    p.add_argument("--max-tokens", type=int, nargs="+", required=True)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for prompt_tokens in a.prompt_tokens:
        for max_tokens in a.max_tokens:
            row = time_mlx_lm(a.model_dir, prompt_tokens, max_tokens, a.trials, a.seed)
            row.update(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

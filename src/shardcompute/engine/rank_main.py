"""The per-rank program behind `shardcompute generate`: load the shard, then follow rank 0.

Rank 0 tokenizes, broadcasts the prompt ids, streams text to stdout and ends with a timing
line; the other ranks run the same steps silently.
"""

from __future__ import annotations

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import os
import sys
from pathlib import Path

import mlx.core as mx

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.dtypes import TF32_ENV, tf32_state
from shardcompute.engine.generate import generate_step, stream_generate
from shardcompute.engine.job import GenerateJob, ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.errors import ShardComputeError
from shardcompute.model.llama import Model
from shardcompute.model.loader import load_model
from shardcompute.model.tokenizer import ByteTokenizer
from shardcompute.runtime import keep_freed_memory


def load_spec(spec: ModelSpec, comm: Collectives) -> Model:
    model = load_model(spec.model, spec.dtype, comm, spec.weights, spec.shard_dir)
    if mx.default_device() == mx.cpu:
        keep_freed_memory()  # from here on: steps, whose temporaries repeat
    return model


def tokenizer_for(spec: ModelSpec):
    """The tokenizer of the model (or the copy saved beside pre-made shards)."""
    from shardcompute.model.tokenizer import load_tokenizer

    if spec.model and spec.model.startswith("dummy:"):
        return ByteTokenizer()

    if spec.shard_dir and (Path(spec.shard_dir) / "tokenizer").is_dir():
        return load_tokenizer(Path(spec.shard_dir) / "tokenizer")
    from shardcompute.model.download import resolve_model

    return load_tokenizer(resolve_model(spec.model))


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Raw text, or (with `chat`) a user message or a message list through the chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def stop_ids(tokenizer, model: Model) -> tuple[int, ...]:
    ids = set(model.args.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def tf32_report(comm: Collectives) -> list[str]:
    """Every rank's TF32 state ("off" or "allowed"), as its own environment says."""
    mine = mx.array([[float(tf32_state(os.environ) == "off")]])
    return ["off" if flag else "allowed" for flag in comm.all_gather(mine, axis=0)[:, 0].tolist()]


def tf32_line(states: list[str]) -> str:
    """e.g. "TF32 off on 2 of 2 ranks (MLX_ENABLE_TF32=0)"."""
    off = states.count("off")
    if off == len(states):
        return f"TF32 off on {off} of {len(states)} ranks ({TF32_ENV}=0)"
    return f"TF32 allowed on {len(states) - off} of {len(states)} ranks"


def run(job: GenerateJob) -> None:
    comm = Collectives(init_group(job.backend, job.world_size))
    model = load_spec(job.spec, comm)
    tf32 = tf32_report(comm)
    request = None
    if comm.rank == 0:
        tokenizer = tokenizer_for(job.spec)
        ids = encode_prompt(tokenizer, job.prompt, job.chat)
        params = job.params.model_copy(update={"stop_token_ids": stop_ids(tokenizer, model)})
        request = {"prompt_ids": ids, "params": params.model_dump(mode="json")}
    request = comm.broadcast_object(request)
    params = SamplingParams(**request["params"])
    if comm.rank != 0:
        for _ in generate_step(model, request["prompt_ids"], params):
            pass
        return
    last = None
    for last in stream_generate(model, tokenizer, request["prompt_ids"], params):
        print(last.text, end="", flush=True)
    print(
        f"\n[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"world size {comm.size} | dtype {model.policy.describe()} | {tf32_line(tf32)}]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardcompute.engine.rank_main")
    parser.add_argument("--job", required=True, help="GenerateJob JSON file")
    args = parser.parse_args(argv)
    try:
        run(GenerateJob.model_validate_json(Path(args.job).read_text()))
    except ShardComputeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

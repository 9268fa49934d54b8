"""`shardcompute` command line: each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from shardcompute.dtypes import (
    BITS_CHOICES,
    COMPUTE_DTYPES,
    DTYPE_CHOICES,
    GROUP_CHOICES,
    DtypeRequest,
    apply_tf32,
    policy_env,
    resolve,
)
from shardcompute.errors import ShardComputeError

DEFAULT_MODEL = "smollm2-135m"


def add_dtype_flags(p: argparse.ArgumentParser, native: bool = False) -> None:
    """--dtype and its options. With `native`, the default keeps tensors as stored."""
    p.add_argument(
        "--dtype",
        default="native" if native else "auto",
        choices=(("native",) if native else ()) + DTYPE_CHOICES,
        help="native: tensors as stored"
        if native
        else "auto: float32 on the CPU (dequantized at load), quantized (bf16 compute) on GPUs",
    )
    p.add_argument("--bits", type=int, choices=BITS_CHOICES, help="quantized: 4 (default) or 8")
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_CHOICES,
        help="quantized: columns per scale (default 64; GGUF keeps its own 32)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        help="quantized: activations, scales (default: bfloat16 on GPUs, float32 on the CPU)",
    )
    p.add_argument(
        "--reduce-dtype",
        choices=COMPUTE_DTYPES,
        help="dtype of the all-reduce payloads (default: the compute dtype)",
    )
    p.add_argument(
        "--allow-tf32",
        action="store_true",
        help="let float32 matmuls run as TF32 on CUDA (faster, not IEEE float32)",
    )


def dtype_request(args: argparse.Namespace) -> DtypeRequest | None:
    """The request the dtype flags make (None: --dtype native)."""
    if args.dtype == "native":
        return None
    return DtypeRequest(
        dtype=args.dtype,
        bits=args.bits,
        group_size=args.group_size,
        compute_dtype=args.compute_dtype,
        reduce_dtype=args.reduce_dtype,
        allow_tf32=args.allow_tf32,
    )


def add_model_flags(p: argparse.ArgumentParser, native: bool = False) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="short name from the model cache, a HF directory, or a .gguf path",
    )
    p.add_argument(
        "--dummy-weights",
        metavar="NAME",
        help="random weights with a real config (tinyllama-1.1b, llama-3-8b, ...)",
    )
    add_dtype_flags(p, native)
    p.add_argument("--weights", help="per-rank plan weights, e.g. 2,1 (default: even)")


def model_source(args: argparse.Namespace) -> str:
    return f"dummy:{args.dummy_weights}" if args.dummy_weights else args.model


def cmd_generate(args: argparse.Namespace) -> int:
    from shardcompute.engine.job import GenerateJob, ModelSpec
    from shardcompute.engine.launch import launch_local, resolve_backend
    from shardcompute.engine.params import SamplingParams
    from shardcompute.parallel.plan import parse_weights
    from shardcompute.runtime import detect_device

    weights = parse_weights(args.weights, args.world_size) if args.weights else None
    backend = resolve_backend(args.backend)
    request = dtype_request(args)
    policy = resolve(request, detect_device())  # settles the ranks' environment before MLX
    env = policy_env(policy, os.environ)
    job = GenerateJob(
        world_size=args.world_size,
        backend=backend,
        spec=ModelSpec(
            model=model_source(args), shard_dir=args.shard_dir, dtype=request, weights=weights
        ),
        prompt=args.prompt,
        chat=args.chat,
        params=SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ),
    )
    if args.world_size == 1:
        apply_tf32(policy, os.environ)
        from shardcompute.engine.rank_main import run  # this process is the rank: MLX loads now

        run(job)
        return 0
    with tempfile.TemporaryDirectory(prefix="shardcompute-job-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(job.model_dump_json())
        return launch_local(
            ["-m", "shardcompute.engine.rank_main", "--job", str(job_file)],
            args.world_size,
            timeout=args.timeout,
            backend=backend,
            env=env,
        )


def cmd_shard(args: argparse.Namespace) -> int:
    from rich.console import Console

    import shardcompute.rank_setup  # noqa: F401  (this process converts tensors: BLAS first)
    from shardcompute.model.loader import shard_checkpoint
    from shardcompute.parallel.plan import parse_weights

    console = Console(stderr=True)
    weights = parse_weights(args.weights, args.world_size) if args.weights else None
    with console.status(f"sharding {model_source(args)} for world size {args.world_size}"):
        manifest = shard_checkpoint(
            model_source(args),
            args.world_size,
            args.output,
            weights,
            dtype_request(args),
            on_rank=lambda r: console.print(f"rank {r}: written"),
        )
    save_tokenizer(model_source(args), Path(args.output))
    print(manifest)
    return 0


def save_tokenizer(model: str, out_dir: Path) -> None:
    """Keep the tokenizer with the shards, so a worker needs nothing else."""
    if model.startswith("dummy:"):
        return
    from shardcompute.model.download import resolve_model
    from shardcompute.model.tokenizer import load_tokenizer

    load_tokenizer(resolve_model(model)).save_pretrained(str(out_dir / "tokenizer"))


def cmd_download(args: argparse.Namespace) -> int:
    from shardcompute.model.download import download_main

    download_main(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardcompute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `shardcompute {name} --help`", add_help=False)

    g = sub.add_parser("generate", help="generate text with N local ranks")
    add_model_flags(g)
    g.add_argument("--prompt", required=True, help="raw text (see --chat)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--world-size", type=int, default=1)
    g.add_argument(
        "--backend",
        default="auto",
        help="mx.distributed backend for the local ranks: auto (mpi if Open MPI is installed, "
        "else ring), ring, mpi",
    )
    g.add_argument("--shard-dir", help="load pre-made shards from this directory")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--timeout", type=float, help="kill every rank after this many seconds")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("shard", help="write one safetensors file per rank and a manifest")
    add_model_flags(s, native=True)
    s.add_argument("--world-size", type=int, required=True)
    s.add_argument("--output", required=True)
    s.set_defaults(func=cmd_shard)

    d = sub.add_parser("download", help="fetch a model into the local cache")
    from shardcompute.model.download import add_download_args

    add_download_args(d)
    d.set_defaults(func=cmd_download)
    return parser


# Subcommands with parsers of their own (the control plane; none of them imports MLX).
DELEGATED = {
    "coordinator": ("shardcompute.coordinator.cli", "coordinator_main"),
    "worker": ("shardcompute.worker.agent", "worker_main"),
    "up": ("shardcompute.coordinator.up", "up_main"),
    "bench": ("shardcompute.bench.engine_bench", "bench_main"),
    "certs": ("shardcompute.certs", "certs_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        module, func = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ShardComputeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`shardcompute` command line: each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from shardcompute.errors import ShardComputeError

DEFAULT_MODEL = "smollm2-135m"


def add_model_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16", "quantized"),
        help="auto: float32 on the CPU (dequantized at load), quantized on GPUs",
    )
    p.add_argument("--weights", help="per-rank plan weights, e.g. 2,1 (default: even)")


def model_source(args: argparse.Namespace) -> str:
    return f"dummy:{args.dummy_weights}" if args.dummy_weights else args.model


def cmd_generate(args: argparse.Namespace) -> int:
    from shardcompute.engine.job import GenerateJob, ModelSpec
    from shardcompute.engine.launch import launch_local, resolve_backend
    from shardcompute.engine.sampling import SamplingParams
    from shardcompute.parallel.plan import parse_weights

    weights = parse_weights(args.weights, args.world_size) if args.weights else None
    backend = resolve_backend(args.backend)
    job = GenerateJob(
        world_size=args.world_size,
        backend=backend,
        spec=ModelSpec(
            model=model_source(args), shard_dir=args.shard_dir, dtype=args.dtype, weights=weights
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
        from shardcompute.engine.rank_main import run

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
        )


def cmd_shard(args: argparse.Namespace) -> int:
    from rich.console import Console

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
    add_model_flags(s)
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

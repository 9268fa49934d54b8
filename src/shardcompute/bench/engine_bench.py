"""`shardcompute bench`: the engine benchmark, no HTTP.

A grid of model x dtype x world size (x prompt length x generation length). Each cell runs
real ranks (`engine_rank.py`) and reports prefill and decode tok/s, TTFT, GB/s streamed per
rank, collectives per token and the time in them, all-reduce latency by size and peak memory.
Beside it: the memory bandwidth of the device the ranks compute on (host RAM from one or more
CPU processes; on a GPU an MLX copy on the device) and the decode bound it implies, and with
`--compare` mlx-lm on the same model and device. Output: a table, JSON rows, a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shardcompute._blas import process_threads
from shardcompute.dtypes import DtypeRequest, policy_env, resolve
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.launch import launch_local, resolve_backend
from shardcompute.errors import ShardComputeError
from shardcompute.runtime import detect_device

console = Console(stderr=True, highlight=False)

BANDWIDTH_SCRIPT = """
import json, sys, time, numpy as np
n = int(sys.argv[1]) // 8
a, b = np.ones(n, np.float32), np.ones(n, np.float32)
rates = []
for _ in range(30):
    t = time.perf_counter(); a @ b; rates.append(2 * a.nbytes / (time.perf_counter() - t))
print(json.dumps(sorted(rates)[len(rates) // 2]))
"""


# Read + write bandwidth of a copy on MLX's default device (a GPU): 2 bytes moved per byte.
DEVICE_BANDWIDTH_SCRIPT = """
import json, sys, time, mlx.core as mx
a = mx.ones((int(sys.argv[1]) // 4,), mx.float32); mx.eval(a)
rates = []
for _ in range(30):
    t = time.perf_counter(); mx.eval(a + 1); rates.append(2 * a.nbytes / (time.perf_counter() - t))
print(json.dumps(sorted(rates)[len(rates) // 2]))
"""


def measure_bandwidth(procs: int, nbytes: int = 1 << 29) -> float:
    """Aggregate read bandwidth (GB/s) of `procs` single-threaded processes at once."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", BANDWIDTH_SCRIPT, str(nbytes // procs)]
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) for _ in range(procs)]
    return sum(float(p.communicate(timeout=300)[0]) for p in running) / 1e9


def measure_device_bandwidth(nbytes: int = 1 << 31) -> float:
    """Copy bandwidth (GB/s, read + write) on MLX's default device, from its own process."""
    cmd = [sys.executable, "-c", DEVICE_BANDWIDTH_SCRIPT, str(nbytes)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ShardComputeError(f"device bandwidth probe failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout) / 1e9


def measure_bandwidths(device: str, world_sizes: list[int], threads: list) -> dict:
    """GB/s by how many cores the ranks keep busy (CPU), or {"gpu": GB/s} on a GPU, where
    every rank of one machine shares the one device's bandwidth."""
    if device == "gpu":
        return {"gpu": measure_device_bandwidth()}
    used = {1} | {cores_used(w, t) for w in world_sizes for t in threads}
    return {n: measure_bandwidth(n) for n in sorted(used)}


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardcompute bench", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="comma list; dummy:NAME for random")
    p.add_argument("--world-sizes", default="1,2", help="comma list, e.g. 1,2,3")
    p.add_argument("--dtype", default="float32", help="comma list: float32,bfloat16,quantized")
    p.add_argument("--prompt-tokens", default="128", help="comma list")
    p.add_argument("--max-tokens", default="64", help="comma list")
    p.add_argument(
        "--threads",
        default="auto",
        help="comma list of BLAS threads per rank; auto: each rank's share of the cores",
    )
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend", default="auto", help="auto (mpi if installed, else ring), ring, mpi"
    )
    p.add_argument("--weights", help="per-rank plan weights for world size 2, e.g. 2,1")
    p.add_argument("--group-size", type=int, help="quantized: columns per scale (default 64)")
    p.add_argument("--allow-tf32", action="store_true", help="float32 matmuls as TF32 on CUDA")
    p.add_argument("--reduce-dtype", help="all-reduce payloads in this dtype (e.g. float32)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also time mlx-lm on the same device (installs it): an HF export of a real "
        "checkpoint, or for dummy:NAME mlx-lm's own random model in bf16 and 4-bit",
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write a PNG of decode tok/s against world size here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per grid cell")
    return p


def dtype_request(args, dtype: str) -> DtypeRequest:
    """One grid dtype with the bench's quantization and TF32 flags."""
    quantized = dtype == "quantized"
    return DtypeRequest(
        dtype=dtype,
        group_size=args.group_size if quantized else None,
        reduce_dtype=args.reduce_dtype,
        allow_tf32=args.allow_tf32,
    )


def grid(world_sizes: list[int], threads: list[int | None]) -> list[tuple[int, int | None]]:
    """(world size, BLAS threads per rank) cells, without repeating the default share."""
    cells = []
    for ws in world_sizes:
        for t in threads:
            if t is None or None not in threads or t != rank_threads(ws):
                cells.append((ws, t))
    return cells


def run_cell(job, timeout: float, device: str) -> list[dict]:
    """Launch one cell's ranks, with the dtype policy's environment; rank 0's rows."""
    env = policy_env(resolve(job.spec.dtype, device), os.environ)
    with tempfile.TemporaryDirectory(prefix="shardcompute-bench-") as tmp:
        job_file, out = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_file.write_text(job.model_dump_json())
        argv = ["-m", "shardcompute.bench.engine_rank", "--job", str(job_file), "--out", str(out)]
        launch_local(argv, job.world_size, timeout=timeout, backend=job.backend, env=env)
        return json.loads(out.read_text())


def rank_threads(world_size: int, threads: int | None = None) -> int:
    """BLAS threads per rank: as asked, else OPENBLAS_NUM_THREADS, else the rank's share."""
    return threads or process_threads(world_size)


def cores_used(world_size: int, threads: int | None = None) -> int:
    """Cores the ranks of one local group keep busy."""
    return min(os.cpu_count() or 1, world_size * rank_threads(world_size, threads))


def add_bound(rows: list[dict], bandwidth: dict) -> None:
    """The decode bound: each rank streams its weights once per token at its share of the
    bandwidth of the cores in use (all of them, at every world size, on one machine), or of
    the one GPU the ranks share."""
    for row in rows:
        ws = row["world_size"]
        key = "gpu" if "gpu" in bandwidth else cores_used(ws, row.get("blas_threads"))
        share = bandwidth[key] / ws
        row["bandwidth_gb_s_per_rank"] = share
        row["bound_tok_s"] = min(share * 1e9 / b for b in row["streamed_bytes_per_rank"])


def ensure_mlx_lm() -> None:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        console.print("installing mlx-lm for --compare")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "mlx-lm"], check=True)


def run_peer(args, peer_args: list[str], env: dict) -> list[dict]:
    """One mlx-lm process over the bench's shapes; its JSON rows."""
    cmd = [sys.executable, "-m", "shardcompute.bench.mlx_lm_peer", *peer_args]
    cmd += ["--prompt-tokens", *args.prompt_tokens.split(",")]
    cmd += ["--max-tokens", *args.max_tokens.split(","), "--trials", str(args.trials)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise ShardComputeError(f"mlx-lm run failed: {done.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines()]


def compare_mlx_lm(args, model: str, device: str) -> list[dict]:
    """mlx-lm rows for `model` on the same device. A real checkpoint: an HF export in
    float32, with the system OpenBLAS (its usual set-up) and with our sgemv routing (the same
    BLAS lever we use). Random weights: mlx-lm's own model of the config, bf16 and 4-bit."""
    ensure_mlx_lm()
    if model.startswith("dummy:"):
        rows = []
        for dtype in ("bfloat16", "quantized"):
            peer = ["--dummy", model.split(":", 1)[1], "--dtype", dtype, "--group-size", "64"]
            for row in run_peer(args, peer, dict(os.environ)):
                label = "bfloat16" if dtype == "bfloat16" else "quantized (4-bit, group 64)"
                rows.append({**row, "model": f"{model} (mlx-lm)", "dtype": label})
        return [{**r, "world_size": 1, "backend": "none"} for r in rows]
    from shardcompute.bench.mlx_lm_peer import export_hf_dir
    from shardcompute.model.download import cache_dir

    model_dir = export_hf_dir(model, cache_dir() / "hf-export" / Path(model).name)
    variants = (("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")) if device == "cpu" else [("0", "1")]
    rows = []
    for route, threads in variants:
        env = {**os.environ, "SHARDCOMPUTE_GEMV_ROUTE": route, "OPENBLAS_NUM_THREADS": threads}
        for row in run_peer(args, ["--model-dir", str(model_dir)], env):
            row.update(model=f"{model} (mlx-lm)", world_size=1, dtype="float32")
            row.update(backend="none", blas_threads=int(threads))
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    t = Table(title="shardcompute bench")
    for col in ("model", "dtype", "ws", "BLAS", "P/T", "prefill tok/s", "decode tok/s", "bound"):
        t.add_column(col)
    for col in ("GB/s per rank", "coll/tok", "coll ms/tok", "share", "peak MB/rank"):
        t.add_column(col)
    for r in rows:
        coll = r.get("collective_s_per_token")
        share = coll / r["profiled_step_s"] if coll is not None else None
        t.add_row(
            str(r["model"]),
            str(r["dtype"]),
            str(r["world_size"]),
            r.get("blas", ""),
            f"{r['prompt_tokens']}/{r['max_tokens']}",
            f"{r['prefill_tok_s']:.1f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['bound_tok_s']:.0f}" if "bound_tok_s" in r else "",
            " ".join(f"{g:.1f}" for g in r.get("gb_s_per_rank", [])),
            f"{r['collectives_per_token']:.0f}" if "collectives_per_token" in r else "",
            f"{coll * 1e3:.2f}" if coll is not None else "",
            f"{share:.0%}" if share is not None else "",
            " ".join(f"{m / 2**20:.0f}" for m in r.get("peak_memory_bytes_per_rank", [])),
        )
    Console(highlight=False, width=max(200, console.width)).print(t)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        threads = r.get("threads_asked", "auto")
        label = f"{r['model']} {r['dtype']} P{r['prompt_tokens']} threads/rank {threads}"
        series.setdefault(label, []).append(r)
    for label, rs in series.items():
        rs.sort(key=lambda r: r["world_size"])
        ws = [r["world_size"] for r in rs]
        line = ax.plot(ws, [r["decode_tok_s"] for r in rs], "o-", label=label)[0]
        if all("bound_tok_s" in r for r in rs):
            bounds = [r["bound_tok_s"] for r in rs]
            ax.plot(ws, bounds, "x--", color=line.get_color(), alpha=0.6, label=f"{label} bound")
    ax.set_xlabel("world size")
    ax.set_ylabel("decode tok/s")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_main(argv: list[str] | None = None) -> int:
    from shardcompute.bench.engine_rank import BenchJob
    from shardcompute.parallel.plan import parse_weights

    args = _parser().parse_args(argv)
    models, dtypes = _csv(args.model), _csv(args.dtype)
    world_sizes = _csv(args.world_sizes, int)
    threads = [None if t == "auto" else int(t) for t in _csv(args.threads)]
    device = detect_device()
    with console.status(f"measuring memory bandwidth ({device})"):
        bandwidth = measure_bandwidths(device, world_sizes, threads)
    for n, gb in bandwidth.items():
        what = "GPU copy (read + write)" if n == "gpu" else f"{n} process(es)"
        console.print(f"memory bandwidth, {what}: {gb:.1f} GB/s")
    rows: list[dict] = []
    try:
        for model in models:
            for dtype in dtypes:
                for ws, t in grid(world_sizes, threads):
                    weights = parse_weights(args.weights, ws) if args.weights and ws == 2 else None
                    job = BenchJob(
                        blas_threads=t,
                        world_size=ws,
                        backend=resolve_backend(args.backend) if ws > 1 else "ring",
                        spec=ModelSpec(
                            model=model, dtype=dtype_request(args, dtype), weights=weights
                        ),
                        prompt_tokens=tuple(_csv(args.prompt_tokens, int)),
                        max_tokens=tuple(_csv(args.max_tokens, int)),
                        trials=args.trials,
                        warmup=args.warmup,
                        seed=args.seed,
                    )
                    with console.status(f"{model} {dtype} world size {ws}"):
                        cell = run_cell(job, args.timeout, device)
                    for row in cell:
                        row["blas_threads"] = rank_threads(ws, t)
                        row["threads_asked"] = "auto" if t is None else t
                    add_bound(cell, bandwidth)
                    rows += cell
                    print_table(cell)
            if args.compare:
                with console.status(f"mlx-lm on {model}"):
                    rows += compare_mlx_lm(args, model, device)
    except ShardComputeError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    for row in rows:
        row["machine_bandwidth_gb_s"] = bandwidth
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot([r for r in rows if "bound_tok_s" in r], args.plot)
    return 0

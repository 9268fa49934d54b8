"""An HTTP load test of the OpenAI API: streamed completions at one or more concurrencies.

`--concurrency 1,2,4,8,16` sweeps the levels in one run. Each level reports time to first
token, inter-token latency (per request: its decode time over its tokens), per-request decode
tokens/s, aggregate tokens/s, latency percentiles and errors; the sweep is a table, JSON and a
PNG of aggregate tok/s and TTFT against concurrency. `--peer-url` runs the same sweep against
another OpenAI-compatible server (e.g. `mlx_lm.server` on the same weights) in the same run.

Prompts count ("k, k+1, k+2, ..."), so greedy answers go on counting to max_tokens instead of
stopping early, and each request starts at its own k, so a server's prompt cache cannot
answer one request from another's prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from shardcompute.client.chat import (
    ServerError,
    api_client,
    chunk_text,
    default_api_key,
    failure_text,
    served_model,
    stream_chunks,
)
from shardcompute.errors import ShardComputeError
from shardcompute.http_client import default_tls_ca


@dataclass
class RequestResult:
    """One request's timings; `error` is set when it failed."""

    ok: bool
    latency_seconds: float
    ttft_seconds: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_tokens_per_second: float | None = None
    itl_seconds: float | None = None  # decode time per token after the first
    error: str | None = None


@dataclass
class BenchSettings:
    """What to send and how many at once."""

    num_requests: int
    concurrency: int = 1
    prompt_tokens: int = 32
    max_tokens: int = 64
    model: str | None = None


def make_prompt(tokens: int, start: int = 1) -> str:
    """About `tokens` tokens of counting from `start`, ending mid-count so the answer counts
    on. A number is counted as a space, one token per digit and a comma, as tokenizers that
    split digits (SmolLM2, Llama 2) see it; the reports use the server's own count."""
    numbers, used, k = [], 0, start
    while not numbers or used + len(str(k)) + 2 <= tokens:
        numbers.append(f"{k},")
        used, k = used + len(str(k)) + 2, k + 1
    return " ".join(numbers)


def run_one(http: httpx.Client, body: dict[str, Any]) -> RequestResult:
    """Send one streamed completion and time it. Without a usage chunk (some servers send
    none), each text chunk counts as a token."""
    start, first, usage, chunks = time.perf_counter(), None, {}, 0
    try:
        for chunk in stream_chunks(http, "/completions", body):
            if chunk_text(chunk):
                chunks += 1
                first = first or time.perf_counter()
            usage = chunk.get("usage") or usage
    except (ServerError, httpx.HTTPError) as e:
        why = failure_text(e, str(http.base_url))
        return RequestResult(False, time.perf_counter() - start, error=why)
    end = time.perf_counter()
    n = usage.get("completion_tokens", chunks)
    decode = (n - 1) / (end - first) if first is not None and n > 1 and end > first else None
    return RequestResult(
        ok=True,
        latency_seconds=end - start,
        ttft_seconds=None if first is None else first - start,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=n,
        decode_tokens_per_second=decode,
        itl_seconds=1 / decode if decode else None,
    )


def run_benchmark(
    url: str, settings: BenchSettings, api_key: str | None = None, tls_ca: str | None = None
) -> dict:
    """Run the load and return the summary (as written to JSON)."""
    with api_client(url, api_key, tls_ca=tls_ca) as http:
        model = settings.model or served_model(http)

        def body(i: int) -> dict[str, Any]:
            return {
                "model": model,
                "prompt": make_prompt(settings.prompt_tokens, start=1 + 1000 * i),
                "max_tokens": settings.max_tokens,
                "temperature": 0.0,
                "stream_options": {"include_usage": True},
            }

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            results = list(pool.map(lambda i: run_one(http, body(i)), range(settings.num_requests)))
        wall = time.perf_counter() - start
    return summarize(results, wall, settings, url, model)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_stats(values: list[float]) -> dict[str, float | None]:
    """The mean and the p50, p90 and p99 of `values` (None for each when empty)."""
    mean = sum(values) / len(values) if values else None
    return {"mean": mean, **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


def summarize(
    results: list[RequestResult], wall: float, settings: BenchSettings, url: str, model: str
) -> dict:
    """Aggregate the per-request results into the report."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "url": url,
        "model": model,
        "settings": asdict(settings),
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error})[:10],
        "wall_seconds": wall,
        "completion_tokens": tokens,
        "aggregate_tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "ttft_seconds": summary_stats([r.ttft_seconds for r in ok if r.ttft_seconds is not None]),
        "decode_tokens_per_second": summary_stats(
            [r.decode_tokens_per_second for r in ok if r.decode_tokens_per_second is not None]
        ),
        "itl_seconds": summary_stats([r.itl_seconds for r in ok if r.itl_seconds is not None]),
        "latency_seconds": summary_stats([r.latency_seconds for r in ok]),
        "results": [asdict(r) for r in results],
    }


def print_report(report: dict, console: Console) -> None:
    """The report as a table: one row per measure, mean and percentiles."""
    s = report["settings"]
    table = Table(
        title=f"{report['requests']} requests, concurrency {s['concurrency']}, "
        f"~{s['prompt_tokens']} prompt tokens, max {s['max_tokens']} tokens ({report['model']})"
    )
    for col in ("measure", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for name, key, fmt in (
        ("TTFT (ms)", "ttft_seconds", lambda v: f"{v * 1000:.1f}"),
        ("inter-token latency (ms)", "itl_seconds", lambda v: f"{v * 1000:.1f}"),
        ("decode tok/s per request", "decode_tokens_per_second", lambda v: f"{v:.1f}"),
        ("latency (s)", "latency_seconds", lambda v: f"{v:.3f}"),
    ):
        st = report[key]
        table.add_row(
            name, *("-" if st[c] is None else fmt(st[c]) for c in ("mean", "p50", "p90", "p99"))
        )
    console.print(table)
    console.print(
        f"aggregate: {report['aggregate_tokens_per_second']:.1f} tok/s "
        f"({report['completion_tokens']} tokens in {report['wall_seconds']:.2f}s); "
        f"errors: {report['errors']}"
    )
    for message in report["error_messages"]:
        console.print(f"  error: {message}", markup=False)


def write_json(path: str, report: dict, console: Console) -> None:
    """Write `report` to `path` as JSON, making its directory, and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    console.print(f"wrote {path}")


def run_sweep(url: str, args: argparse.Namespace, console: Console) -> list[dict]:
    """One report per concurrency level, in order."""
    reports = []
    for c in args.concurrency:
        n = args.num_requests or 2 * c
        settings = BenchSettings(n, c, args.prompt_tokens, args.max_tokens, args.model)
        report = run_benchmark(url, settings, args.api_key, args.tls_ca)
        if len(args.concurrency) == 1:
            print_report(report, console)
        reports.append(report)
    return reports


def sweep_table(sweeps: dict[str, list[dict]], console: Console) -> None:
    """One row per server and concurrency: the figures the sweep is for."""
    table = Table(title="concurrency sweep: streamed completions")
    for col in ("server", "concurrency", "requests", "aggregate tok/s", "TTFT p50 (ms)"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for col in ("TTFT p90 (ms)", "ITL p50 (ms)", "latency p50 (s)", "errors"):
        table.add_column(col, justify="right")
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    for name, reports in sweeps.items():
        for r in reports:
            table.add_row(
                name,
                str(r["settings"]["concurrency"]),
                str(r["requests"]),
                f"{r['aggregate_tokens_per_second']:.1f}",
                ms(r["ttft_seconds"]["p50"]),
                ms(r["ttft_seconds"]["p90"]),
                ms(r["itl_seconds"]["p50"]),
                "-"
                if r["latency_seconds"]["p50"] is None
                else f"{r['latency_seconds']['p50']:.2f}",
                str(r["errors"]),
            )
    console.print(table)


def plot_sweep(sweeps: dict[str, list[dict]], path: str) -> None:
    """Aggregate tok/s and TTFT p50 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for name, reports in sweeps.items():
        c = [r["settings"]["concurrency"] for r in reports]
        rate.plot(c, [r["aggregate_tokens_per_second"] for r in reports], "o-", label=name)
        ttft.plot(c, [r["ttft_seconds"]["p50"] or 0 for r in reports], "o-", label=name)
    for ax, label in ((rate, "aggregate tok/s"), (ttft, "TTFT p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1, got {text!r}")
    return levels


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__)
    p.add_argument("--coordinator-url", default="http://127.0.0.1:8000")
    p.add_argument("--num-requests", type=int, help="per level (default: 2 x concurrency)")
    p.add_argument(
        "--concurrency", type=_levels, default=[1], help="one level, or a sweep like 1,2,4,8,16"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", help="model id (default: the first the server lists)")
    p.add_argument("--api-key", default=default_api_key())
    p.add_argument(
        "--tls-ca",
        default=default_tls_ca(),
        help="verify an https:// coordinator against this CA file",
    )
    p.add_argument("--peer-url", help="also sweep this OpenAI-compatible server (base URL)")
    p.add_argument("--peer-name", default="peer", help="the peer's name in tables and plots")
    p.add_argument("--peer-model", help="the model id the peer serves (default: its first)")
    p.add_argument("--json", help="write the report here as JSON")
    p.add_argument("--plot", help="write a PNG of tok/s and TTFT against concurrency here")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/benchmark.py; exit code 1 when any request failed."""
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    for flag in ("num_requests", "prompt_tokens", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            console.print(f"error: --{flag.replace('_', '-')} must be at least 1")
            return 2
    servers = {"shardcompute": args.coordinator_url}
    if args.peer_url:
        servers[args.peer_name] = args.peer_url
    sweeps: dict[str, list[dict]] = {}
    for name, url in servers.items():
        try:
            model = args.peer_model if name != "shardcompute" and args.peer_model else args.model
            sweeps[name] = run_sweep(
                url, argparse.Namespace(**{**vars(args), "model": model}), console
            )
        except (ServerError, httpx.HTTPError, ShardComputeError) as e:
            why = failure_text(e, url, args.tls_ca)
            console.print(f"error: cannot benchmark {url}: {why}", markup=False)
            return 2
    if len(args.concurrency) > 1 or args.peer_url:
        sweep_table(sweeps, console)
    if args.json:
        only = len(sweeps) == 1 and len(args.concurrency) == 1
        write_json(args.json, sweeps["shardcompute"][0] if only else sweeps, console)
    if args.plot:
        plot_sweep(sweeps, args.plot)
    errors = sum(r["errors"] for reports in sweeps.values() for r in reports)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(bench_main())

"""An HTTP load test of the OpenAI API: N streamed completions at a given concurrency.

Reports time to first token, per-request decode tokens/s, aggregate tokens/s, latency
percentiles and errors, as a table and as JSON.
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
    error: str | None = None


@dataclass
class BenchSettings:
    """What to send and how many at once."""

    num_requests: int
    concurrency: int = 1
    prompt_tokens: int = 32
    max_tokens: int = 64
    model: str | None = None


def make_prompt(tokens: int) -> str:
    """About `tokens` tokens of text: one common word per token for BPE vocabularies."""
    return " ".join(["hello"] * tokens)


def run_one(http: httpx.Client, body: dict[str, Any]) -> RequestResult:
    """Send one streamed completion and time it."""
    start, first, usage = time.perf_counter(), None, {}
    try:
        for chunk in stream_chunks(http, "/completions", body):
            if first is None and chunk_text(chunk):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    except (ServerError, httpx.HTTPError) as e:
        why = failure_text(e, str(http.base_url))
        return RequestResult(False, time.perf_counter() - start, error=why)
    end = time.perf_counter()
    n = usage.get("completion_tokens", 0)
    decode = (n - 1) / (end - first) if first is not None and n > 1 and end > first else None
    return RequestResult(
        ok=True,
        latency_seconds=end - start,
        ttft_seconds=None if first is None else first - start,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=n,
        decode_tokens_per_second=decode,
    )


def run_benchmark(
    url: str, settings: BenchSettings, api_key: str | None = None, tls_ca: str | None = None
) -> dict:
    """Run the load and return the summary (as written to JSON)."""
    with api_client(url, api_key, tls_ca=tls_ca) as http:
        model = settings.model or served_model(http)
        body = {
            "model": model,
            "prompt": make_prompt(settings.prompt_tokens),
            "max_tokens": settings.max_tokens,
            "temperature": 0.0,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            results = list(pool.map(lambda _: run_one(http, body), range(settings.num_requests)))
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__)
    p.add_argument("--coordinator-url", default="http://127.0.0.1:8000")
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", help="model id (default: the first the server lists)")
    p.add_argument("--api-key", default=default_api_key())
    p.add_argument(
        "--tls-ca",
        default=default_tls_ca(),
        help="verify an https:// coordinator against this CA file",
    )
    p.add_argument("--json", help="write the report here as JSON")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/benchmark.py; exit code 1 when any request failed."""
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    for flag in ("num_requests", "concurrency", "prompt_tokens", "max_tokens"):
        if getattr(args, flag) < 1:
            console.print(f"error: --{flag.replace('_', '-')} must be at least 1")
            return 2
    settings = BenchSettings(
        args.num_requests, args.concurrency, args.prompt_tokens, args.max_tokens, args.model
    )
    try:
        report = run_benchmark(args.coordinator_url, settings, args.api_key, args.tls_ca)
    except (ServerError, httpx.HTTPError, ShardComputeError) as e:
        why = failure_text(e, args.coordinator_url, args.tls_ca)
        console.print(f"error: cannot benchmark {args.coordinator_url}: {why}", markup=False)
        return 2
    print_report(report, console)
    if args.json:
        write_json(args.json, report, console)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(bench_main())

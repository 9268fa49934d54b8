#!/usr/bin/env bash
# The accelerator check (issue 9), ready for an offline NVIDIA machine. It runs:
#   1. tests/test_hf_families.py and tests/test_decode.py on the GPU (float32 at 1e-4 of the
#      logit range: the test process sets MLX_ENABLE_TF32=0 before MLX loads);
#   2. `shardcompute bench --compare` on dummy Llama-3-8B at world size 1, bf16 and 4-bit
#      (group 64), beside mlx-lm's own random model of the same config on the same device,
#      and the device's copy bandwidth with the decode bound it implies;
# and writes gpu_check.json (figures), bench.json, tests.log and bench.log to OUT_DIR.
# Where MLX computes on the CPU it says so and skips both parts (exit 0).
#
# MLX's CUDA build travels in two parts (the device tool carries at most 64 MiB a call). Here:
#   bash ../shared/tools/gpu_payload.sh .gpu      # with EXTRA_WHEELS="mlx-lm==0.32.2" for --compare
#   echo /.gpu/ >> .git/info/exclude
# then two device calls, the second within 30 s of the first (the machine must stay warm):
#   carry [".gpu/a"]: mkdir -p /tmp/mc && cp .gpu/a/part_* /tmp/mc/
#   carry [".gpu/b"]: source .gpu/b/install.sh && bash scripts/gpu_check.sh "$OUT"
#
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else out/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-out/gpu_check}}
mkdir -p "$out"
case ":${PYTHONPATH:-}:" in *":$PWD/src:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" ;; esac
export PYTHONUNBUFFERED=1

device=$(python3 -c "import mlx.core as mx; print('cpu' if mx.default_device() == mx.cpu else 'gpu')" 2>&1)
if [ "$device" != gpu ]; then
  echo "gpu_check: MLX computes on the CPU here ($device): skipping the GPU tests and the GPU bench"
  printf '{"device": "cpu", "skipped": true}\n' > "$out/gpu_check.json"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
echo "gpu_check: $(cat "$out/gpu.txt"), mlx $(python3 -c 'import mlx.core as mx; print(mx.__version__)')"

start=$(date +%s)
timeout 180 python3 -m pytest -q -p no:cacheprovider -rA tests/test_hf_families.py tests/test_decode.py \
  > "$out/tests.log" 2>&1
tests_rc=$?
tail -3 "$out/tests.log"
tests_s=$(( $(date +%s) - start ))

timeout 330 python3 -m shardcompute.cli bench --model dummy:llama-3-8b --world-sizes 1 \
  --dtype bfloat16,quantized --prompt-tokens 128 --max-tokens 128 --trials 2 --compare \
  --json "$out/bench.json" > "$out/bench.log" 2>&1
bench_rc=$?
tail -25 "$out/bench.log"

python3 - "$out" "$tests_rc" "$tests_s" "$bench_rc" <<'PY'
import json, re, sys
from pathlib import Path
out, tests_rc, tests_s, bench_rc = Path(sys.argv[1]), *map(int, sys.argv[2:])
log = (out / "tests.log").read_text(errors="replace")
summary = {
    "device": "gpu",
    "gpu": (out / "gpu.txt").read_text().strip(),
    "tests": {"rc": tests_rc, "seconds": tests_s, "summary": (log.strip().splitlines() or [""])[-1],
              "bounds": re.findall(r"\[bound\] (.*)", log)},
    "bench_rc": bench_rc,
}
rows = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else []
ours = {r["dtype"]: r for r in rows if "(mlx-lm)" not in r["model"]}
peer = {("quantized" if "quantized" in r["dtype"] else r["dtype"]): r
        for r in rows if "(mlx-lm)" in r["model"]}
summary["decode"] = {
    dtype: {
        "ours_tok_s": r["decode_tok_s"],
        "mlx_lm_tok_s": peer.get(dtype, {}).get("decode_tok_s"),
        "ratio": r["decode_tok_s"] / peer[dtype]["decode_tok_s"] if dtype in peer else None,
        "bound_tok_s": r.get("bound_tok_s"),
        "bandwidth_gb_s": r.get("machine_bandwidth_gb_s"),
        "prefill_tok_s": r["prefill_tok_s"],
        "peak_memory_bytes": r.get("peak_memory_bytes_per_rank"),
    }
    for dtype, r in ours.items()
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]

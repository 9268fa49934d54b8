#!/usr/bin/env bash
# Set up a fresh machine: OpenBLAS for fast float32 on the CPU, then this package.
# --test also installs what the test suite needs (CPU torch for the HF reference).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: install libopenblas0-pthread for ~35x faster float32 matmul" >&2
  fi
fi

python3 -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # Pinned: this version is a CPU wheel; an unpinned torch pulls GBs of CUDA.
  python3 -m pip install -q "torch==2.13.0"
  python3 -m pip install -q -e ".[test]"
else
  python3 -m pip install -q -e .
fi

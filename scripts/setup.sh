#!/usr/bin/env bash
# Set up a fresh machine, then install this package. On Linux, from Debian where it's missing:
# - libopenblas0-pthread: fallback BLAS for float32 (the scipy-openblas32 wheel comes first)
# - gcc: builds the small library that routes single-row matmuls to sgemv
# - g++: MLX builds the compiled decode step's fused CPU kernels with it, at run time
# - openmpi: the mpi backend, whose shared-memory all-reduce is ~30x faster than ring on loopback
# --test also installs what the test suite needs: CPU torch for the HF reference, and Debian's
# chromium (+ chromium-driver) for the dashboard's browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname)" = Linux ]; then
  missing=()
  ldconfig -p 2>/dev/null | grep -q libopenblas.so.0 || missing+=(libopenblas0-pthread)
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  command -v g++ >/dev/null || missing+=(g++)
  command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
  if [ "${1:-}" = "--test" ]; then
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "note: install ${missing[*]} (the top of scripts/setup.sh says what each is for)" >&2
    fi
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

"""Which implementation each op uses, decided in one place by device.

- RoPE: `mx.fast.rope` (one fused kernel) on a GPU; on the CPU it falls back to ~15 ops per
  call, so cos/sin tables computed once per forward pass were measured faster there.
- RMSNorm and attention use `mx.fast.rms_norm` and `mx.fast.scaled_dot_product_attention` on
  every device, except a float32 prefill chunk's attention and SwiGLU on the CPU: there MLX
  exponentiates one value at a time on one thread (and writes every attention score), and the
  routing library's kernels run them on this process's cores (parallel/host_kernels.py;
  `SHARDCOMPUTE_HOST_KERNELS=0` turns them off).
- The one-token decode step runs as one `mx.compile`d graph. On the CPU, MLX builds a compiled
  graph's fused kernels with g++ at run time: without it, decode runs op by op.
  `SHARDCOMPUTE_COMPILE=0` runs it op by op anywhere.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import mlx.core as mx

from shardcompute.parallel.host_kernels import kernel


@dataclass(frozen=True)
class Kernels:
    fused_rope: bool
    compiled_decode: bool
    host_threads: int = 0  # prefill's attention and SwiGLU in host kernels; 0: in MLX

    @classmethod
    def for_device(cls, device: mx.Device | None = None) -> Kernels:
        on_cpu = (device or mx.default_device()) == mx.cpu
        compiled = os.environ.get("SHARDCOMPUTE_COMPILE", "1") != "0" and (
            not on_cpu or shutil.which("g++") is not None
        )
        host = on_cpu and os.environ.get("SHARDCOMPUTE_HOST_KERNELS", "1") != "0"
        return cls(not on_cpu, compiled, _process_cores() if host and kernel() else 0)


def _process_cores() -> int:
    """The cores this process computes on: its BLAS threads, when the fast BLAS is loaded."""
    from shardcompute import _blas

    return _blas.loaded.threads if _blas.loaded else _blas.process_threads()

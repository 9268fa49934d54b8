"""How a process that computes is set up, decided before MLX loads. No MLX import here.

`import shardcompute` does nothing; a rank process (generate, bench, the worker agent's
engines, tests) calls `prepare_process()` before anything imports mlx.core. On the CPU that
loads the fast BLAS (`_blas`: compiles the small sgemv router once, loads OpenBLAS into the
global symbol table); on a GPU, and in the control plane (coordinator, agent, client), nothing
of the kind happens.

The device is told without importing MLX: `SHARDCOMPUTE_DEVICE=cpu|gpu` if set, else Apple
silicon (Metal) or an installed CUDA build of MLX with an NVIDIA driver present means "gpu".
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

from shardcompute.dtypes import Device

DEVICE_ENV = "SHARDCOMPUTE_DEVICE"


def detect_device() -> Device:
    """ "gpu" where MLX will compute on a GPU, else "cpu" (see the module docstring)."""
    forced = os.environ.get(DEVICE_ENV, "").lower()
    if forced in ("cpu", "gpu"):
        return forced  # type: ignore[return-value]
    if sys.platform == "darwin":
        return "gpu" if platform.machine() == "arm64" else "cpu"
    # The driver check first: it is a few stat calls, the wheel check reads every installed
    # package's metadata (0.1-0.2 s of every rank's start).
    return "gpu" if _nvidia_driver_present() and _mlx_cuda_installed() else "cpu"


def _mlx_cuda_installed() -> bool:
    names = (d.metadata.get("Name", "") for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith("mlx-cuda") for n in names)


def _nvidia_driver_present() -> bool:
    paths = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0")
    return any(Path(p).exists() for p in paths) or shutil.which("nvidia-smi") is not None


def prepare_process(device: Device | None = None):
    """Set up a process that computes, before mlx.core is imported: on the CPU, MLX's kernels
    built for this CPU (`_jit`) and the fast BLAS (returns what `_blas.preload_blas` set up);
    elsewhere nothing (returns None)."""
    if (device or detect_device()) != "cpu":
        return None
    from shardcompute._blas import preload_blas
    from shardcompute._jit import native_jit

    native_jit()
    return preload_blas()


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` for a rank process whose heap asks Linux for transparent huge pages: glibc's
    malloc madvises its memory (the tunable is read at process start, so it goes in the
    child's environment). A decode step streams every weight, and with 4 KiB pages it takes a
    TLB miss every 4 KiB; measured on SmolLM2 f32, 2 cores: 1 row 31.8 -> 29.2 ms, 8 rows 54.8
    -> 51.7 ms. Kept as it is if the tunable is set already, off Linux, or with
    SHARDCOMPUTE_HUGE_PAGES=0."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or env.get("SHARDCOMPUTE_HUGE_PAGES") == "0":
        return env
    if "glibc.malloc.hugetlb" in tunables:
        return env
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))}


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """After loading, on the CPU under glibc: serve allocations from the heap and keep freed
    memory there, instead of mapping large blocks afresh and unmapping them when freed.

    MLX's CPU allocator caches no buffers, so a prefill step's large temporaries (a long
    prompt's attention scores: 37 MB a layer at 4000 tokens) are mapped, faulted in page by
    page, and unmapped again at every layer. In the VMs measured here a fault costs about
    10 us: a 37 MB subtraction took 106 ms this way, and 3 ms from the heap. The cost: this
    process's resident memory stays at its peak working set, as with MLX's GPU buffer cache.
    Returns whether the setting took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("SHARDCOMPUTE_KEEP_FREED") == "0":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def mlx_device() -> Device:
    """The device MLX computes on in this process (imports MLX)."""
    import mlx.core as mx

    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def compute_description() -> str:
    """What does the matmuls here, for benchmark tables: the BLAS on the CPU, else the GPU
    (MLX's own kernels; no BLAS is involved). Imports MLX."""
    import mlx.core as mx

    from shardcompute import _blas

    if mlx_device() == "cpu":
        return _blas.loaded.describe() if _blas.loaded else "MLX's bundled BLAS"
    name = mx.device_info().get("device_name", "GPU")
    return f"GPU {name} (MLX kernels, no BLAS)"

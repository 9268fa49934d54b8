"""Fast float32 matmul for `mlx[cpu]` on Linux, set up before MLX is imported.

MLX's CPU backend does every float32 matmul with `cblas_sgemm`, resolved from the global
symbol table, and the wheel bundles a slow reference BLAS. Two levers, in order of preference:

1. A small routing library (`csrc/gemv_route.c`, compiled once per CPU with the system C
   compiler, for that CPU's vector instructions and with OpenMP, and cached) is loaded
   RTLD_GLOBAL. Its `cblas_sgemm` runs a decode step's projections (1 to 16 activation rows
   against a weight stored as rows) in its own `small_nt` kernel, which reads each weight
   once for all the rows; it sends other single-row products to OpenBLAS's `sgemv`, about
   2-3x faster there than `sgemm`, and all else to `sgemm`. The OpenBLAS behind it is the
   `scipy-openblas32` wheel when installed (a recent release, prefixed symbols), else the
   system's.
   The same library carries a prefill chunk's kernels, used by parallel/host_kernels.py: the
   tiled attention (`csrc/attention.c`, OpenBLAS on its OpenMP threads the same way) and
   SwiGLU's activation (`csrc/swiglu.c`).
2. Without a C compiler: the system OpenBLAS (`libopenblas0-pthread`) loaded RTLD_GLOBAL.

`SHARDCOMPUTE_OPENBLAS=0` skips both; `SHARDCOMPUTE_GEMV_ROUTE=0` skips the router only.
Threads: each process gets its share of the cores, cores // SHARDCOMPUTE_LOCAL_RANKS (the
launchers and the worker agent set that to the number of ranks on this host), unless
OPENBLAS_NUM_THREADS says otherwise. Ranks never oversubscribe the cores: OpenBLAS threads
spin, and on this 2-core machine 2 threads in each of 2 ranks ran 3-13x slower. A gemv uses
the extra threads only when its matrix has at least SHARDCOMPUTE_GEMV_SPLIT elements (default
100k: every weight of a decode step; waking a thread costs more than a tiny gemv saves).
Measured on world size 1 with 2 cores, SmolLM2 f32: decode 21 tok/s on 1 thread, 21 with the
old 4M-element split (only the LM head threaded), 29-30 with the 100k split.
Nothing here imports MLX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
)
CSRC = Path(__file__).parent / "csrc"
ROUTE_SOURCES = tuple(CSRC / f for f in ("gemv_route.c", "attention.c", "swiglu.c"))
ROUTE_HEADERS = (CSRC / "vec.h",)


@dataclass
class BlasSetup:
    """What `preload_blas` put in place, for logs and benchmarks."""

    library: str  # the OpenBLAS doing the work
    routed: bool  # the routing library is in front of it: small_nt, sgemv, transposed sgemm
    handle: ctypes.CDLL | None = None
    threads: int = 1

    def describe(self) -> str:
        if not self.routed:
            how = "sgemm only"
        elif self.handle is not None and self.handle.gemv_route_pooled():
            how = "small_nt + sgemv-routed, one OpenMP pool"
        elif self.handle is not None and self.handle.gemv_route_openmp():
            how = "small_nt + sgemv-routed"
        else:  # the router built without OpenMP: small_nt runs on one thread
            how = "small_nt on one thread + sgemv-routed"
        return f"{Path(self.library).name} ({how}, {self.threads} thread(s))"

    def set_threads(self, n: int, gemv_split_elems: int = 0) -> None:
        """n threads; a gemv's split threshold changes only when given (> 0)."""
        self.threads = n
        if self.handle is not None:
            self.handle.gemv_route_set_threads(n, ctypes.c_long(gemv_split_elems))
        else:
            _set_threads_direct(self.library, n)

    def routed_calls(self) -> int:
        return self.handle.gemv_route_calls() if self.handle is not None else 0


loaded: BlasSetup | None = None


def _openblas_candidates() -> list[tuple[str, str]]:
    """(library path, symbol prefix), best first."""
    found = []
    try:
        import scipy_openblas32

        lib = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
        found.append((str(lib), "scipy_"))
    except (ImportError, OSError, IndexError):
        pass
    found += [(path, "") for path in SYSTEM_OPENBLAS]
    return found


def _cache_dir() -> Path:
    root = os.environ.get("SHARDCOMPUTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "shardcompute"
    )
    return Path(root) / "blas"


# Flags to try in order: vector code for this CPU and OpenMP threads, then less of either.
BUILD_FLAGS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O2",),
)


@functools.cache  # read once per process: the router's cache key and the JIT's both use it
def _cpu_signature() -> str:
    """What `-march=native` builds for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    keep = ("model name", "flags", "Features", "CPU part")
    lines = {line for line in text.splitlines() if line.split(":")[0].strip() in keep}
    return platform.machine() + "\n" + "\n".join(sorted(lines))


def build_router() -> Path | None:
    """Compile the routing library once per source version and CPU; None without a C
    compiler."""
    source = b"".join(path.read_bytes() for path in ROUTE_SOURCES + ROUTE_HEADERS)
    key = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:12]
    target = _cache_dir() / f"gemv_route-{key}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent ranks never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    errors = []
    for flags in BUILD_FLAGS:
        sources = [str(path) for path in ROUTE_SOURCES]
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(partial), *sources, "-ldl", "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            partial.replace(target)
            return target
        errors.append(f"{' '.join(flags)}: {done.stderr.strip()}")
    partial.unlink(missing_ok=True)
    print(f"shardcompute: could not build the routing library: {errors}", file=sys.stderr)
    return None


def _try_router() -> BlasSetup | None:
    router = build_router()
    if router is None:
        return None
    # Load privately first: its cblas_sgemm only goes global once it has a BLAS behind it.
    handle = ctypes.CDLL(str(router))
    for path, prefix in _openblas_candidates():
        if handle.gemv_route_init(path.encode(), prefix.encode()) == 0:
            ctypes.CDLL(str(router), mode=ctypes.RTLD_GLOBAL)  # promotes the same object
            return BlasSetup(path, routed=True, handle=handle)
    return None


def _try_system() -> BlasSetup | None:
    for path in SYSTEM_OPENBLAS:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return BlasSetup(path, routed=False)
    return None


def _set_threads_direct(path: str, n: int) -> None:
    try:
        ctypes.CDLL(path).openblas_set_num_threads(n)
    except (OSError, AttributeError):
        pass


GEMV_SPLIT_DEFAULT = 100_000


def blas_threads(local_ranks: int = 1) -> int:
    """One process's share of this machine's cores when `local_ranks` processes share it."""
    return max(1, (os.cpu_count() or 1) // max(1, local_ranks))


def process_threads(local_ranks: int = 1) -> int:
    """BLAS threads for one of `local_ranks` processes here: OPENBLAS_NUM_THREADS if set."""
    return int(os.environ.get("OPENBLAS_NUM_THREADS") or blas_threads(local_ranks))


def preload_blas() -> BlasSetup | None:
    """Put the fast BLAS in place (Linux only); return what was set up, or None."""
    global loaded
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    if os.environ.get("SHARDCOMPUTE_OPENBLAS") == "0" or "mlx.core" in sys.modules:
        return None  # opted out, or too late to matter
    if os.environ.get("SHARDCOMPUTE_GEMV_ROUTE") != "0":
        loaded = _try_router()
    loaded = loaded or _try_system()
    if loaded is not None:
        env = os.environ.get
        threads = process_threads(int(env("SHARDCOMPUTE_LOCAL_RANKS") or 1))
        loaded.set_threads(threads, int(env("SHARDCOMPUTE_GEMV_SPLIT") or GEMV_SPLIT_DEFAULT))
        if loaded.handle is not None and env("SHARDCOMPUTE_BLAS_POOL") == "openblas":
            loaded.handle.gemv_route_set_split(0)  # OpenBLAS threads its own large products
    return loaded

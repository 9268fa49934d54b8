"""MLX's CPU kernels built for this CPU. No MLX import here.

`mx.compile` on the CPU writes each fused graph out as C++ and builds it by running `g++`
from PATH, with no flag for the target CPU. The kernels are then built for the baseline
x86-64: every `fma` inside MLX's `exp` (so `sigmoid`, SiLU) is a call into libm, and loops
are not vectorized. A decode step of 8 rows of SmolLM2 spent about 9 ms of its 73 ms in
SiLU this way, 4 times what the same kernel takes built with `-march=native`.

`native_jit()` puts a `g++` first on PATH that adds `-march=native -ffp-contract=off` and
runs the real one, and points TMPDIR, where MLX caches its built kernels (by name, not by
flags), at a directory of this compiler and CPU. `-ffp-contract=off` keeps each product and
sum rounded as written, so the kernels compute the same bits as before, only faster: the
test suite compares logits both ways. `SHARDCOMPUTE_NATIVE_JIT=0` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shardcompute._blas import _cache_dir, _cpu_signature

FLAGS = ("-march=native", "-ffp-contract=off")
ENV = "SHARDCOMPUTE_NATIVE_JIT"
DIR_ENV = "SHARDCOMPUTE_NATIVE_JIT_DIR"  # where this process tree's kernels are
PROBE = 'extern "C" int probe(int x) { return x + 1; }\n'


def jit_dir(compiler: str) -> Path:
    """Where the wrapper and MLX's kernels for this compiler, these flags and this CPU live."""
    key = f"{compiler}\n{' '.join(FLAGS)}\n{_cpu_signature()}"
    return _cache_dir().parent / "mlx-jit" / hashlib.sha256(key.encode()).hexdigest()[:12]


def write_wrapper(compiler: str, bin_dir: Path) -> Path | None:
    """A `g++` in `bin_dir` that runs `compiler` with FLAGS first; None if the compiler
    refuses them (then MLX's own build is left alone)."""
    wrapper = bin_dir / "g++"
    if wrapper.exists():
        return wrapper
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bin_dir) as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(PROBE)
        cmd = [compiler, *FLAGS, "-std=c++17", "-O3", "-fPIC", "-shared", str(src), "-o", str(lib)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        script = Path(tmp) / "g++"
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(compiler)} {" ".join(FLAGS)} "$@"\n')
        script.chmod(0o755)
        script.replace(wrapper)  # atomic: concurrent ranks never run a half-written script
    return wrapper


def native_jit() -> Path | None:
    """Build MLX's CPU kernels for this CPU in this process (see the module docstring).
    Call before MLX compiles anything; returns the kernel directory, or None when off or
    not possible (not Linux, no g++, g++ refuses the flags, or the cache is not writable)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV) == "0":
        return None
    if os.environ.get(DIR_ENV):  # set up already (a child of a process that did)
        return Path(os.environ[DIR_ENV])
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    root = jit_dir(os.path.realpath(compiler))
    try:
        if write_wrapper(compiler, root / "bin") is None:
            return None
        kernels = root / "tmp"
        kernels.mkdir(exist_ok=True)
    except OSError:  # an unwritable cache: MLX's own build it is
        return None
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = os.environ[DIR_ENV] = str(kernels)
    tempfile.tempdir = None  # Python's own temporary files follow TMPDIR too
    return kernels

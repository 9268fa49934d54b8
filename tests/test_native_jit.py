"""MLX's CPU kernels built for this CPU (`_jit`): the wrapper, and the same bits as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardcompute import _jit

# Prefill 3 rows of different lengths, then decode all 3 together: logits of each, as .npz.
SCRIPT = """
import shardcompute.rank_setup
import sys, numpy as np, mlx.core as mx
from shardcompute.model.loader import load_model
model = load_model(sys.argv[1], "float32")
cache = model.make_cache(); cache.resize(3, 256)
out = []
for row, n in enumerate((7, 40, 130)):
    ids = mx.array([[(i * 7 + row) % 900 + 5 for i in range(n)]], mx.int32)
    out.append(np.array(model.lm_head.local_logits(model.prefill(ids, cache, row))))
for step in range(3):
    h = model.decode({0: 11 + step, 1: 12, 2: 13}, cache)
    out.append(np.array(model.lm_head.local_logits(h)))
np.savez(sys.argv[2], *out)
"""


def _fake_compiler(tmp_path: Path, exit_code: int) -> Path:
    """A 'compiler' that writes its arguments, one per line, to args.txt."""
    fake = tmp_path / "fake-g++"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args.txt\nexit {exit_code}\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX shell wrapper")
def test_the_wrapper_puts_the_flags_before_mlxs_own(tmp_path):
    wrapper = _jit.write_wrapper(str(_fake_compiler(tmp_path, 0)), tmp_path / "bin")
    assert wrapper is not None and wrapper.name == "g++"
    subprocess.run([str(wrapper), "-std=c++17", "-O3", "k.cpp", "-o", "lib k.so"], check=True)
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args == [*_jit.FLAGS, "-std=c++17", "-O3", "k.cpp", "-o", "lib k.so"]


def test_a_compiler_that_refuses_the_flags_is_left_alone(tmp_path):
    assert _jit.write_wrapper(str(_fake_compiler(tmp_path, 1)), tmp_path / "bin") is None
    assert not (tmp_path / "bin" / "g++").exists()


def test_off_and_inherited(monkeypatch, tmp_path):
    path = os.environ["PATH"]
    monkeypatch.setenv(_jit.ENV, "0")
    assert _jit.native_jit() is None and os.environ["PATH"] == path
    monkeypatch.delenv(_jit.ENV)
    monkeypatch.setenv(_jit.DIR_ENV, str(tmp_path))  # a parent set it up: nothing is added
    assert _jit.native_jit() == tmp_path and os.environ["PATH"] == path


def test_an_unwritable_cache_leaves_mlx_alone(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SHARDCOMPUTE_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.delenv(_jit.DIR_ENV, raising=False)
    monkeypatch.delenv(_jit.ENV, raising=False)
    path = os.environ["PATH"]
    assert _jit.native_jit() is None and os.environ["PATH"] == path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU JIT's Linux build")
def test_native_kernels_compute_the_same_bits(tiny_hf_model, tmp_path):
    """Prefill and batched decode logits are bitwise those of MLX's own build, and the native
    run really built its kernels through the wrapper (in a fresh cache of its own)."""
    model = tiny_hf_model("llama3")
    env = {k: v for k, v in os.environ.items() if k not in (_jit.ENV, _jit.DIR_ENV)}
    # This process's own setup put its wrapper first on PATH: the children start without it.
    dirs = env["PATH"].split(os.pathsep)
    env["PATH"] = os.pathsep.join(d for d in dirs if Path(d).parent.parent.name != "mlx-jit")
    env["TMPDIR"] = str(tmp_path)  # MLX's own build caches its kernels here, not in /tmp
    runs = {}
    for name, extra in {
        "mlx": {_jit.ENV: "0"},
        "native": {"SHARDCOMPUTE_CACHE": str(tmp_path / "cache")},
    }.items():
        out = tmp_path / f"{name}.npz"
        cmd = [sys.executable, "-c", SCRIPT, str(model), str(out)]
        done = subprocess.run(cmd, env=env | extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = np.load(out)
    built = list((tmp_path / "cache" / "mlx-jit").glob("*/tmp/mlx/*/cpu/*.so"))
    assert built, "the native run built no kernel through the wrapper"
    for key in runs["mlx"].files:
        assert np.array_equal(runs["mlx"][key], runs["native"][key]), key

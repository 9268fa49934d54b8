"""float32 means IEEE float32: every rank process that computes in float32 gets
MLX_ENABLE_TF32=0 from its launcher before MLX loads, and none with --allow-tf32. Checked
through the real launchers: `generate` and the worker agent's engines here, `bench` in
test_bench.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from processes import child_env, wait_for

sys.path.insert(0, str(Path(__file__).parent / "coordinator"))
from local_cluster import LocalCluster  # noqa: E402

TF32 = "MLX_ENABLE_TF32"
GENERATE = [sys.executable, "-m", "shardcompute.cli", "generate", "--dummy-weights"]
GENERATE += ["smollm2-135m", "--world-size", "2", "--backend", "ring", "--prompt", "hi"]
GENERATE += ["--max-tokens", "2", "--dtype", "float32"]


@pytest.mark.parametrize("allow", [False, True])
def test_generate_ranks(allow):
    """Each rank reports its own environment in the status line; a TF32=1 left in the
    caller's environment does not leak into a float32 rank."""
    cmd = GENERATE + (["--allow-tf32"] if allow else [])
    done = subprocess.run(
        cmd, env=child_env(**{TF32: "1"}), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if allow:
        assert "TF32 allowed on 2 of 2 ranks" in done.stdout
        assert "float32, TF32 allowed" in done.stdout
    else:
        assert f"TF32 off on 2 of 2 ranks ({TF32}=0)" in done.stdout
        assert "float32, TF32 off" in done.stdout


def _engine_env(cluster: LocalCluster) -> list[dict[str, str]]:
    """The environments of the engine processes the agents started."""
    envs = []
    for pid in cluster.leftovers():
        proc = Path(f"/proc/{pid}")
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) < 2 or not argv[1].endswith(b"fake_engine.py"):  # not its agent
                continue
            raw = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        envs.append(dict(e.decode().split("=", 1) for e in raw if b"=" in e))
    return envs


@pytest.mark.parametrize("allow", [False, True])
def test_agent_engines(tmp_path, allow):
    cluster = LocalCluster(tmp_path)
    cluster.env.update(SHARDCOMPUTE_MODEL__DTYPE="float32", **{TF32: "1"})
    if allow:
        cluster.env["SHARDCOMPUTE_MODEL__ALLOW_TF32"] = "true"
    try:
        cluster.start_coordinator()
        for rank in range(2):
            cluster.start_agent(f"agent{rank}", "--rank", str(rank))
        cluster.wait_state("ready", 30)
        envs = wait_for(lambda: len(e := _engine_env(cluster)) == 2 and e, 10, "two engines")
    finally:
        cluster.stop()
    assert [e.get(TF32) for e in envs] == ([None, None] if allow else ["0", "0"])
    # The agent's engines also get the huge-pages tunable (tests/test_huge_pages.py).
    assert all("glibc.malloc.hugetlb=1" in e.get("GLIBC_TUNABLES", "") for e in envs)

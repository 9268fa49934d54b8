"""The collectives contract: identity on one rank, and the same answers over ring and MPI."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from shardcompute.collectives.group import Collectives
from shardcompute.engine.launch import launch_local, mpi_available

SCRIPT = str(Path(__file__).parent / "ranks" / "collectives_case.py")


def test_size_one_group_is_identity_and_counts():
    comm = Collectives()
    x = mx.arange(6).reshape(2, 3)
    assert comm.all_sum(x) is x and comm.all_gather(x) is x and comm.broadcast(x) is x
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.control_sum(x) is x
    # Step plans and control messages are counted apart from the model's collectives.
    assert comm.counts == {"all_reduce": 1, "all_gather": 1, "broadcast": 1, "control": 2}


BACKENDS = [
    "ring",
    pytest.param("mpi", marks=pytest.mark.skipif(not mpi_available(), reason="no Open MPI")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_contract(world_size, backend, tmp_path):
    out = tmp_path / "out.json"
    argv = [SCRIPT, backend, str(world_size), str(out)]
    launch_local(argv, world_size, timeout=60, backend=backend)
    got = json.loads(out.read_text())
    total = sum(range(1, world_size + 1))
    assert got["sum"] == [float(total)] * 3
    expected_row = [float(r) for r in range(world_size) for _ in range(r + 1)]
    assert got["gathered"] == [expected_row, expected_row]
    assert got["token"] == [41, 7]
    assert got["obj"] == {"from": 0, "text": "héllo"}
    assert got["counts"]["all_reduce"] == 2  # all_sum + barrier

"""The collectives contract: identity on one rank, and the same answers over ring and MPI."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from shardcompute.collectives.group import Collectives
from shardcompute.engine.launch import launch_local, mpi_available
from shardcompute.errors import CollectiveError

SCRIPT = str(Path(__file__).parent / "ranks" / "collectives_case.py")


def test_size_one_group_is_identity_and_counts():
    comm = Collectives()
    x = mx.arange(6).reshape(2, 3)
    assert comm.all_sum(x) is x and comm.all_gather(x) is x and comm.broadcast(x) is x
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.control_sum(x) is x
    # Step plans and control messages are counted apart from the model's collectives.
    assert comm.counts == {"all_reduce": 1, "all_gather": 1, "broadcast": 1, "control": 2}


def test_pending_collectives_refuse_to_run_before_the_group_is_joined():
    """Made before the ring forms (an engine loads first): an op must not fall through to
    MLX's default group, and the group joined must be the one expected."""
    comm = Collectives.pending(rank=1, size=2)
    assert (comm.rank, comm.size) == (1, 2)
    with pytest.raises(RuntimeError, match="before this rank joined its group"):
        comm.all_sum(mx.ones((2,)))
    with pytest.raises(CollectiveError, match="formed as rank 0 of 1, expected rank 1 of 2"):
        comm.join(None)
    single = Collectives.pending(rank=0, size=1)
    single.join(None)
    x = mx.ones((2,))
    assert single.all_sum(x) is x


NO_MPI = pytest.mark.skipif(not mpi_available(), reason="no Open MPI")
FORMS = [  # backend, and whether the ring forms after the engines' rendezvous
    pytest.param("ring", False, id="ring"),
    pytest.param("mpi", False, id="mpi", marks=NO_MPI),
    pytest.param("ring", True, id="ring-meet"),
]


@pytest.mark.parametrize("backend, meet", FORMS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_contract(world_size, backend, meet, tmp_path):
    """Every op over real ranks; `meet`: the group formed as an engine forms it."""
    out = tmp_path / "out.json"
    argv = [SCRIPT, backend, str(world_size), str(out), *(["meet"] if meet else [])]
    launch_local(argv, world_size, timeout=60, backend=backend)
    got = json.loads(out.read_text())
    total = sum(range(1, world_size + 1))
    assert got["sum"] == [float(total)] * 3
    expected_row = [float(r) for r in range(world_size) for _ in range(r + 1)]
    assert got["gathered"] == [expected_row, expected_row]
    assert got["token"] == [41, 7]
    assert got["obj"] == {"from": 0, "text": "héllo"}
    assert got["counts"]["all_reduce"] == 2  # all_sum + barrier

"""The partition plan: computed splits on head, KV-group and quantization boundaries."""

from __future__ import annotations

import pytest

from shardcompute.errors import PlanError
from shardcompute.model_spec import dummy_args
from shardcompute.parallel.plan import PartitionPlan, make_plan, parse_weights, split_units


def test_split_units_even_weighted_and_minimum():
    assert split_units(12, [1, 1, 1], 1, "x") == [(0, 4), (4, 8), (8, 12)]
    assert split_units(3, [1, 1], 1, "x") == [(0, 2), (2, 3)]  # tie goes to rank 0
    assert split_units(1536, [2, 1], 32, "x") == [(0, 1024), (1024, 1536)]
    assert split_units(4, [100, 1], 1, "x") == [(0, 3), (3, 4)]  # everyone gets a unit
    with pytest.raises(PlanError, match="across 3 ranks"):
        split_units(2, [1, 1, 1], 1, "kv")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_smollm2_plan_covers_everything(world_size):
    args = dummy_args("smollm2-135m")
    plan = make_plan(args, world_size, quant_group=32)
    for field, total in [
        ("kv_heads", 3),
        ("heads", 9),
        ("intermediate", 1536),
        ("hidden", 576),
        ("vocab", 49152),
    ]:
        ranges = [getattr(r, field) for r in plan.ranks]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for r in plan.ranks:
        assert r.heads == (r.kv_heads[0] * 3, r.kv_heads[1] * 3)  # whole GQA groups
        assert r.intermediate[0] % 32 == 0 and r.hidden[0] % 32 == 0


def test_plan_round_trips_through_json():
    import json

    plan = make_plan(dummy_args("tinyllama-1.1b"), 3, (2, 1, 1), 32)
    assert PartitionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_parse_weights():
    assert parse_weights(None, 2) == (1.0, 1.0)
    assert parse_weights("2,1", 2) == (2.0, 1.0)
    for bad in ("2,x", "0,1", "1"):
        with pytest.raises(PlanError, match="--weights"):
            parse_weights(bad, 2)

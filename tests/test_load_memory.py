"""Loading takes what the rank needs: from a full HF checkpoint a rank reads only its slices,
so its peak memory is about its shard, not the checkpoint; random weights are made per slice
and equal the slices of the full random model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from shardcompute.collectives.group import Collectives
from shardcompute.engine.launch import launch_local
from shardcompute.model.checkpoint import tie_lm_head
from shardcompute.model.dummy import dummy_shapes, dummy_tensors
from shardcompute.model.llama import Model
from shardcompute.model.sharder import rank_state
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.plan import make_plan

RANK_SCRIPT = str(Path(__file__).parent / "ranks" / "load_memory_case.py")
# About 1 GB of float32 in 18 layers; the largest tensor is 15 MB.
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=18,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8192,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
LIMIT = 0.7  # of the full checkpoint, per rank, above the runtime's own footprint


def write_checkpoint(out: Path) -> int:
    """A random HF checkpoint in two safetensors files with an index; returns its bytes."""
    rng = np.random.default_rng(0)
    shapes = dummy_shapes(ModelArgs.from_hf_config(CONFIG))
    names = sorted(shapes)
    files, weight_map, total = [names[::2], names[1::2]], {}, 0
    for i, part in enumerate(files):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: rng.standard_normal(shapes[n], np.float32) * 0.02 for n in part}
        save_file(tensors, str(out / name))
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CONFIG))
    return total


def test_a_rank_reads_only_its_slices(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    total = write_checkpoint(model_dir)
    assert total > 0.9e9
    launch_local([RANK_SCRIPT, "--model", str(model_dir), "--world-size", "2", "--out",
                  str(tmp_path)], 2, timeout=300)  # fmt: skip
    for rank in range(2):
        r = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        grown = r["peak"] - r["baseline"]
        print(
            f"[load memory] rank {rank}: shard {r['shard_bytes'] / 1e6:.0f} MB, peak RSS "
            f"{r['peak'] / 1e6:.0f} MB, baseline {r['baseline'] / 1e6:.0f} MB, grew "
            f"{grown / 1e6:.0f} MB = {grown / total:.2f} of the {total / 1e6:.0f} MB checkpoint"
        )
        assert 0.4 * total < r["shard_bytes"] < 0.6 * total
        assert grown < LIMIT * total, f"rank {rank} grew {grown / total:.2f} of the checkpoint"


# SmolLM2's shape at a tenth of the width: 3 KV heads (world sizes 2 and 3, uneven), a tied
# embedding (the LM head reads the embedding's rows across its split axis), sizes that are not
# multiples of the generation block.
SMALL = ModelArgs(
    hidden_size=192,
    intermediate_size=520,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=1000,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("world_size", [2, 3])
def test_random_weights_per_rank_equal_slices_of_the_full_model(world_size):
    """Each rank's lazily made tensors equal the full random tensors cut by the same layers."""
    tensors = tie_lm_head(dict(dummy_tensors(SMALL, 3, mx.bfloat16)), SMALL)
    full = {name: t[:] for name, t in tensors.items()}  # the whole random model
    plan = make_plan(SMALL, world_size)
    for rank in range(world_size):
        layout = Model(SMALL, plan, mx.bfloat16, rank, Collectives())
        lazy = dict(rank_state(layout, tensors, {}, mx.bfloat16))
        cut = dict(rank_state(layout, full, {}, mx.bfloat16))
        assert lazy.keys() == cut.keys()
        for name, t in lazy.items():
            assert t.dtype == mx.bfloat16 and mx.array_equal(t, cut[name]).item(), name

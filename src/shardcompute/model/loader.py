"""Build one rank's model: plan, slice (or read a pre-made shard), convert dtype, load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from shardcompute.collectives.group import Collectives
from shardcompute.model.checkpoint import Checkpoint, dummy_checkpoint, read_checkpoint
from shardcompute.model.llama import Model
from shardcompute.model.sharder import (
    DEFAULT_QUANT,
    convert_dtype,
    parallel_module_paths,
    read_shard,
    shard_state,
    write_manifest,
    write_shard,
)
from shardcompute.parallel.plan import make_plan

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "quantized")


def resolve_dtype(dtype: str) -> str:
    """`auto`: float32 on the CPU (MLX's CPU quantized matmul is ~50x slower), else quantized."""
    if dtype != "auto":
        return dtype
    return "float32" if mx.default_device() == mx.cpu else "quantized"


def describe_dtype(dtype: str) -> str:
    """What `dtype` runs as, with the reason when `auto` chose it (for logs and status lines)."""
    chosen = resolve_dtype(dtype)
    if dtype != "auto":
        return chosen
    if chosen == "float32":
        return "float32 (auto: on the CPU, MLX's quantized and bf16 matmul have no fast path)"
    return f"{chosen} (auto: on a GPU, quantized weights stream the fewest bytes)"


def open_checkpoint(model: str | Path) -> Checkpoint:
    """A path, a cached short name, or `dummy:NAME` for random weights with a real config."""
    text = str(model)
    if text.startswith("dummy:"):
        return dummy_checkpoint(text.split(":", 1)[1])
    if Path(text).exists():
        return read_checkpoint(text)
    from shardcompute.model.download import resolve_model

    return read_checkpoint(resolve_model(text))


def split_unit(ckpt: Checkpoint, dtype: str) -> int:
    """Split dimensions in multiples of the quantization group when weights are quantized."""
    if ckpt.quant:
        return ckpt.quant_group
    return DEFAULT_QUANT.group_size if dtype == "quantized" else 1


def load_model(
    model: str | Path | None = None,
    dtype: str = "auto",
    comm: Collectives | None = None,
    weights: Sequence[float] | None = None,
    shard_dir: str | Path | None = None,
    checkpoint: Checkpoint | None = None,
    fuse: bool = True,
) -> Model:
    """This rank's share of `model` (a path/name, a Checkpoint, or a pre-made shard dir).

    With no `comm` (or a size-1 one) this is the dense single-process model. `fuse` stacks
    q/k/v and gate/up into single matmuls (`Model.fuse_projections`); without it the
    parameters keep the checkpoint's names.
    """
    comm = comm or Collectives()
    dtype = resolve_dtype(dtype)
    if shard_dir is not None:
        args, plan, quant, state = read_shard(Path(shard_dir), comm.rank, comm.size)
        source = Model(args, plan, comm.rank, comm, quant)
    else:
        ckpt = checkpoint or open_checkpoint(model)
        args, quant = ckpt.args, ckpt.quant
        plan = make_plan(args, comm.size, weights, split_unit(ckpt, dtype))
        source = Model(args, plan, comm.rank, comm, quant)
        state = shard_state(source, ckpt.tensors)
    quantizable = parallel_module_paths(source)
    state, quant = convert_dtype(state, quant, dtype, quantizable)
    out = Model(args, plan, comm.rank, comm, quant)
    out.load_weights(list(state.items()), strict=True)
    del state
    if fuse:
        out.fuse_projections()
    mx.eval(out.parameters())
    return out


def shard_checkpoint(
    model: str | Path,
    world_size: int,
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    on_rank: Callable[[int], None] | None = None,
) -> Path:
    """Write one safetensors file per rank (tensors as stored: quantized stays quantized)
    and a manifest with the plan and each file's sha256. Returns the manifest path."""
    ckpt = open_checkpoint(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(ckpt.args, world_size, weights, split_unit(ckpt, "native"))
    files = []
    for rank in range(world_size):
        state = shard_state(Model(ckpt.args, plan, rank, Collectives(), ckpt.quant), ckpt.tensors)
        files.append(write_shard(out_dir, rank, state))
        del state
        if on_rank:
            on_rank(rank)
    return write_manifest(out_dir, str(model), ckpt.args, plan, ckpt.quant, files)

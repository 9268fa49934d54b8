"""Build one rank's model: resolve the dtype policy, plan, read only this rank's slices (or
its pre-made shard), convert them module by module, load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import DtypePolicy, DtypeRequest, main_quant, mx_dtype, resolve
from shardcompute.model.checkpoint import Checkpoint, dummy_checkpoint, read_checkpoint
from shardcompute.model.llama import Model
from shardcompute.model.sharder import (
    quant_targets,
    rank_state,
    read_shard,
    split_unit,
    write_manifest,
    write_shard,
)
from shardcompute.parallel.plan import make_plan
from shardcompute.runtime import mlx_device

DtypeLike = DtypePolicy | DtypeRequest | str
# Random weights' own dtype, when shards keep tensors as stored; and the dtype of layouts that
# are never evaluated (only their parameter names and shapes are read).
NATIVE_DUMMY_DTYPE = mx.float32


def as_policy(dtype: DtypeLike) -> DtypePolicy:
    """The policy for this process's device (a name like "bfloat16" is a request)."""
    return dtype if isinstance(dtype, DtypePolicy) else resolve(dtype, mlx_device())


def open_checkpoint(model: str | Path, dtype: mx.Dtype) -> Checkpoint:
    """A path, a cached short name, or `dummy:NAME` for random weights (made in `dtype`)."""
    text = str(model)
    if text.startswith("dummy:"):
        return dummy_checkpoint(text.split(":", 1)[1], dtype)
    if Path(text).exists():
        return read_checkpoint(text)
    from shardcompute.model.download import resolve_model

    return read_checkpoint(resolve_model(text))


def load_model(
    model: str | Path | None = None,
    dtype: DtypeLike = "auto",
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
    policy = as_policy(dtype)
    compute = mx_dtype(policy.compute)
    comm.reduce_dtype = mx_dtype(policy.reduce) if policy.reduce else None
    if shard_dir is not None:
        args, plan, quant, tensors = read_shard(Path(shard_dir), comm.rank, comm.size, policy)
        main = main_quant(quant)
    else:
        ckpt = checkpoint or open_checkpoint(model, compute)
        args, quant, tensors, main = ckpt.args, ckpt.quant, ckpt.tensors, ckpt.main_quant
        plan = make_plan(args, comm.size, weights, split_unit(quant, policy.target_quant(main)))
    source = Model(args, plan, compute, comm.rank, comm, quant)
    targets = quant_targets(source, policy.target_quant(main))
    state = list(rank_state(source, tensors, targets, compute, sliced=shard_dir is None))
    out = Model(args, plan, compute, comm.rank, comm, targets)
    out.load_weights(state, strict=True)
    del state, tensors
    if fuse:
        out.fuse_projections()
    mx.eval(out.parameters())
    mx.clear_cache()  # what conversion left in MLX's buffer cache is not this rank's to keep
    out.policy = policy
    return out


def shard_checkpoint(
    model: str | Path,
    world_size: int,
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    dtype: DtypeRequest | str | None = None,
    on_rank: Callable[[int], None] | None = None,
) -> Path:
    """Write one safetensors file per rank, tensor by tensor, and a manifest with the plan,
    quantization, compute dtype and each file's sha256. Returns the manifest path.

    `dtype` None keeps tensors as stored (quantized stays quantized); a float dtype casts them;
    `quantized` quantizes float weights (bits and group size from the request).
    """
    policy = None if dtype is None else resolve(dtype, mlx_device())
    compute = mx_dtype(policy.compute) if policy else None
    ckpt = open_checkpoint(model, compute or NATIVE_DUMMY_DTYPE)
    target = policy.target_quant(ckpt.main_quant) if policy else ckpt.main_quant
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(ckpt.args, world_size, weights, split_unit(ckpt.quant, target))
    files, targets = [], ckpt.quant
    for rank in range(world_size):
        source = Model(ckpt.args, plan, NATIVE_DUMMY_DTYPE, rank, Collectives(), ckpt.quant)
        targets = quant_targets(source, target) if policy else ckpt.quant  # native: as stored
        names = _names(ckpt, plan, rank, targets)
        items = rank_state(source, ckpt.tensors, targets, compute)
        files.append(write_shard(out_dir, rank, names, items))
        if on_rank:
            on_rank(rank)
    stored = policy.compute if policy else _stored_dtype(ckpt)
    return write_manifest(out_dir, str(model), ckpt.args, plan, targets, stored, files)


def _names(ckpt: Checkpoint, plan, rank: int, targets) -> list[str]:
    layout = Model(ckpt.args, plan, NATIVE_DUMMY_DTYPE, rank, Collectives(), targets)
    return [name for name, _ in tree_flatten(layout.parameters())]


def _stored_dtype(ckpt: Checkpoint) -> str:
    """The float dtype a native shard keeps its bulk in: the scales of quantized weights
    (GGUF: float16), else the weights'."""
    name = next((f"{p}.scales" for p in ckpt.quant), "model.embed_tokens.weight")
    dtype = ckpt.tensors[name].dtype
    return {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, "float32")

"""One rank's tensors: cut out of a checkpoint (or read from a shard file) and converted to the
dtype policy, one module at a time; and the shard directories `shardcompute shard` writes.

Streaming keeps memory to this rank's share: each module's slices are read, converted and
evaluated before the next module is touched, so a rank's peak is about its shard plus one
module's tensors. A shard directory holds `rank-N.safetensors` per rank, written tensor by
tensor, and `manifest.json` (model config, plan, quantization, compute dtype, sha256s).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from math import lcm
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from shardcompute.dtypes import DtypePolicy, QuantSpec, main_quant
from shardcompute.errors import ModelFormatError, ShardFileError
from shardcompute.model.tensor_io import SafetensorsWriter
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.plan import PartitionPlan

MANIFEST_VERSION = 2
DEQUANT_DTYPE = mx.float32  # dequantize with float32 scales: the files' float16 ones lose ~1e-3


def parallel_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that cut their own slice (`shard`): every parallel linear and the
    embedding. These are the ones whose weights can be quantized."""
    return {path: m for path, m in model.named_modules() if hasattr(m, "shard")}


def quant_targets(model: nn.Module, target: QuantSpec | None) -> dict[str, QuantSpec]:
    """Module path -> the quantization its weight ends up in (empty for float weights)."""
    return {} if target is None else dict.fromkeys(parallel_modules(model), target)


def split_unit(source: dict[str, QuantSpec], target: QuantSpec | None) -> int:
    """Split dimensions in multiples of every quantization group met, read or written."""
    groups = {q.group_size for q in source.values()} | ({target.group_size} if target else set())
    return lcm(*groups) if groups else 1


def rank_state(
    model: nn.Module,
    tensors: dict,
    targets: dict[str, QuantSpec],
    dtype: mx.Dtype | None,
    sliced: bool = True,
) -> Iterator[tuple[str, mx.array]]:
    """This rank's tensors, converted and evaluated one module at a time.

    `model` is laid out like the source (its layers carry the source quantization); `tensors`
    are full checkpoint tensors to slice (`sliced`), or this rank's own (a shard file).
    `dtype` None keeps float tensors as they are (a native shard).
    """
    done = set()
    for path, module in parallel_modules(model).items():
        own = [k for k, v in module.items() if isinstance(v, mx.array) and k[0] != "_"]
        done.update(f"{path}.{k}" for k in own)
        full = {k: _tensor(tensors, f"{path}.{k}") for k in own}
        # Own contiguous copies: a strided view of the full tensor ran a row-parallel gemv ~10x
        # slower (2048x2816: 75 ms vs 8 ms) and would keep the whole tensor alive.
        part = {k: mx.contiguous(v) for k, v in (module.shard(full) if sliced else full).items()}
        converted = convert_module(path, part, module.quant, targets.get(path), dtype)
        mx.eval(converted)
        for k, v in converted.items():
            yield f"{path}.{k}", v
    for name, _ in tree_flatten(model.parameters()):
        if name not in done:
            t = mx.contiguous(_tensor(tensors, name)[:])
            t = t if dtype is None else t.astype(dtype)
            mx.eval(t)
            yield name, t


def _tensor(tensors: dict, name: str):
    if name not in tensors:
        raise ModelFormatError(f"checkpoint has no tensor {name!r}")
    return tensors[name]


def convert_module(
    path: str,
    arrays: dict[str, mx.array],
    source: QuantSpec | None,
    target: QuantSpec | None,
    dtype: mx.Dtype | None,
) -> dict[str, mx.array]:
    """One module's tensors from the source quantization to the target one, floats (scales and
    biases included) in `dtype`. A quantized weight kept as is stays packed."""
    arrays = dict(arrays)
    if source is not None and source != target:
        scales, biases = arrays.pop("scales"), arrays.pop("biases")
        arrays["weight"] = mx.dequantize(
            arrays["weight"],
            scales.astype(DEQUANT_DTYPE),
            biases.astype(DEQUANT_DTYPE),
            source.group_size,
            source.bits,
        )
        source = None
    if target is not None and source is None:
        arrays.update(_quantize(path, arrays["weight"], target, dtype))
    return {
        k: v if v.dtype == mx.uint32 or dtype is None else v.astype(dtype)
        for k, v in arrays.items()
    }


def _quantize(path: str, w: mx.array, q: QuantSpec, dtype: mx.Dtype | None) -> dict:
    """Affine-quantize a float weight made in the compute dtype: scales come out in it too."""
    if w.shape[-1] % q.group_size:
        raise ModelFormatError(
            f"{path}: {w.shape[-1]} input columns on this rank are not a multiple of the "
            f"quantization group size {q.group_size}"
        )
    w = w if dtype is None else w.astype(dtype)
    weight, scales, biases = mx.quantize(w, q.group_size, q.bits)
    return {"weight": weight, "scales": scales, "biases": biases}


# --- shard directories --------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(
    out_dir: Path, rank: int, names: list[str], items: Iterator[tuple[str, mx.array]]
) -> dict:
    """Stream one rank's tensors into its file; returns its manifest entry."""
    file = out_dir / f"rank-{rank}.safetensors"
    with SafetensorsWriter(file, names, metadata={"rank": str(rank)}) as writer:
        for name, array in items:
            writer.add(name, array)
    return {
        "rank": rank,
        "file": file.name,
        "bytes": file.stat().st_size,
        "sha256": sha256_file(file),
    }


def write_manifest(
    out_dir: Path,
    model: str,
    args: ModelArgs,
    plan: PartitionPlan,
    quant: dict[str, QuantSpec],
    compute_dtype: str,
    files: list[dict],
) -> Path:
    main = main_quant(quant)
    manifest = {
        "version": MANIFEST_VERSION,
        "model": model,
        "world_size": plan.world_size,
        "args": args.model_dump(),
        "plan": plan.to_dict(),
        "quantization": asdict(main) if main else None,
        "compute_dtype": compute_dtype,
        "quant": {k: asdict(v) for k, v in sorted(quant.items())},
        "files": files,
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise ShardFileError(f"{shard_dir}: no manifest.json (not a shard directory)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFileError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardFileError(
            f"{path}: manifest version {manifest.get('version')!r}, expected "
            f"{MANIFEST_VERSION}; make the shards again with `shardcompute shard`"
        )
    return manifest


def read_shard(shard_dir: Path, rank: int, world_size: int, policy: DtypePolicy):
    """Open and verify one rank's shard: (args, plan, quant, tensors). Refuses shards whose
    recorded quantization differs from the one asked for, with both."""
    manifest = read_manifest(shard_dir)
    if manifest["world_size"] != world_size:
        raise ShardFileError(
            f"{shard_dir}: shards were made for world size {manifest['world_size']}, "
            f"but this cluster has world size {world_size}"
        )
    check_quantization(shard_dir, manifest, policy)
    entry = next((f for f in manifest["files"] if f["rank"] == rank), None)
    if entry is None:
        raise ShardFileError(f"{shard_dir}: manifest has no file for rank {rank}")
    file = Path(shard_dir) / entry["file"]
    verify_file(file, entry)
    args = ModelArgs(**manifest["args"])
    plan = PartitionPlan.from_dict(manifest["plan"])
    quant = {k: QuantSpec(**v) for k, v in manifest["quant"].items()}
    return args, plan, quant, dict(mx.load(str(file)))


def check_quantization(shard_dir: Path, manifest: dict, policy: DtypePolicy) -> None:
    """Bits or a group size asked for must be the ones the shards were made with."""
    recorded = manifest.get("quantization")
    if not policy.quantized or (policy.bits is None and policy.group_size is None):
        return
    asked = f"bits {policy.bits or '(any)'}, group size {policy.group_size or '(any)'}"
    if recorded is None:
        raise ShardFileError(
            f"{shard_dir}: the shards hold float weights, but quantized weights ({asked}) were "
            "asked for; make them with `shardcompute shard --dtype quantized`"
        )
    for key, want in (("bits", policy.bits), ("group_size", policy.group_size)):
        if want is not None and recorded[key] != want:
            raise ShardFileError(
                f"{shard_dir}: the shards were quantized with bits {recorded['bits']}, group "
                f"size {recorded['group_size']}, but {asked} was asked for"
            )


def verify_file(file: Path, entry: dict) -> None:
    """Missing, truncated and altered files each get their own message."""
    if not file.is_file():
        raise ShardFileError(f"{file}: shard file is missing")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise ShardFileError(
            f"{file}: shard file has {size} bytes, manifest says {entry['bytes']} (truncated?)"
        )
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        raise ShardFileError(
            f"{file}: sha256 {digest[:16]}… does not match the manifest's "
            f"{entry['sha256'][:16]}… (file altered or corrupt)"
        )

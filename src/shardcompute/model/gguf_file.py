"""Open GGUF files safely: check the structure before MLX reads it.

MLX's GGUF reader trusts the counts and lengths in the file, so a corrupted header can kill the
process with SIGSEGV instead of raising. `check_gguf` walks the header, the metadata and the
tensor index in Python, checking every length against the file size, so a bad file becomes a
ModelFormatError naming it. It reads no tensor data (about 0.1 s for a 49k-token vocabulary).
`read_metadata` does the same walk and keeps the values, as plain Python: the control plane
gets a model's tokenizer and sizes from it without importing MLX.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES

from shardcompute.errors import ModelFormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# Metadata value types with a fixed size, by their struct format: uint8, int8, uint16, int16,
# uint32, int32, float32, bool, uint64, int64, float64.
_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_FIXED = {kind: struct.calcsize(f"<{fmt}") for kind, fmt in _FORMATS.items()}
_STRING, _ARRAY = 8, 9
_BLOCKS = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # type -> (block, bytes)


class _Reader:
    """Little-endian reads that raise, naming the file and offset, past the end."""

    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFormatError(
                f"{self.path}: truncated or corrupt GGUF: {n} bytes wanted at offset {self.pos} "
                f"of a {len(self.data)}-byte file"
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.take(_FIXED[kind])
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            inner, count = self.u32(), self.u64()
            if inner in _FIXED:
                self.take(count * _FIXED[inner])
                return
            if count > len(self.data) - self.pos:  # every element takes at least one byte
                self.take(count)  # raises
            for _ in range(count):
                self.skip_value(inner)
        else:
            raise ModelFormatError(f"{self.path}: corrupt GGUF: metadata value type {kind}")

    def value(self, kind: int) -> Any:
        """Read one metadata value as a Python bool, int, float, str or list."""
        if kind in _FORMATS:
            return struct.unpack(f"<{_FORMATS[kind]}", self.take(_FIXED[kind]))[0]
        if kind == _STRING:
            return self.text()
        if kind != _ARRAY:
            raise ModelFormatError(f"{self.path}: corrupt GGUF: metadata value type {kind}")
        inner, count = self.u32(), self.u64()
        if inner in _FORMATS:
            return list(
                struct.unpack(f"<{count}{_FORMATS[inner]}", self.take(count * _FIXED[inner]))
            )
        if count > len(self.data) - self.pos:  # every element takes at least one byte
            self.take(count)  # raises
        return [self.value(inner) for _ in range(count)]

    def text(self) -> str:
        at = self.pos
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(
                f"{self.path}: corrupt GGUF: the string at offset {at} is not UTF-8"
            ) from None


def check_gguf(path: str | Path) -> None:
    """Raise ModelFormatError unless `path` is a structurally sound GGUF file."""
    _walk(Path(path), None)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a sound GGUF file as plain Python values (MLX-free); numbers and
    strings as `mx.load(path, return_metadata=True)` gives them, arrays as lists."""
    meta: dict[str, Any] = {}
    _walk(Path(path), meta)
    return meta


def _walk(path: Path, meta: dict[str, Any] | None) -> None:
    """Check the whole structure; collect the metadata values into `meta` when given."""
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelFormatError(f"{path}: not a GGUF file ({size} bytes)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Reader(data, path), size, meta)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror or e}") from e


def _check(r: _Reader, size: int, meta: dict[str, Any] | None) -> None:
    if r.take(4) != MAGIC:
        raise ModelFormatError(f"{r.path}: not a GGUF file (no GGUF magic)")
    version = r.u32()
    if version not in VERSIONS:
        raise ModelFormatError(f"{r.path}: GGUF version {version}; supported: {VERSIONS}")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors * 32 > size or n_kv * 13 > size:  # smallest tensor info / key-value entry
        raise ModelFormatError(
            f"{r.path}: truncated or corrupt GGUF header: {n_tensors} tensors and "
            f"{n_kv} metadata entries cannot fit in {size} bytes"
        )
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, kind = r.string(), r.u32()
        if key == b"general.alignment" and kind == 4:
            raw = struct.unpack("<I", r.take(4))[0]
            alignment = raw or DEFAULT_ALIGNMENT
            if meta is not None:
                meta["general.alignment"] = raw
        elif meta is None:
            r.skip_value(kind)
        else:
            meta[key.decode("utf-8", "replace")] = r.value(kind)
    tensors = [_tensor_info(r) for _ in range(n_tensors)]
    data_start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise ModelFormatError(
                f"{r.path}: tensor {name!r} extends past the end of the {size}-byte file "
                "(truncated download?)"
            )


def _tensor_info(r: _Reader) -> tuple[str, int, int]:
    """(name, offset in the data section, size in bytes) of one tensor index entry."""
    name = r.string().decode("utf-8", "replace")
    n_dims = r.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise ModelFormatError(f"{r.path}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
    count = 1
    for _ in range(n_dims):
        count *= r.u64()
    kind, offset = r.u32(), r.u64()
    if kind not in _BLOCKS:
        raise ModelFormatError(f"{r.path}: tensor {name!r} has unknown GGML type {kind}")
    block, block_bytes = _BLOCKS[kind]
    if count % block:
        raise ModelFormatError(
            f"{r.path}: tensor {name!r}: {count} elements is not a multiple of its block {block}"
        )
    return name, offset, count // block * block_bytes


def load_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`mx.load(path, return_metadata=True)` after `check_gguf`; errors name the file."""
    import mlx.core as mx

    check_gguf(path)
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with gguflib's message
        raise ModelFormatError(f"{path}: cannot read as GGUF: {e}") from e

"""Safetensors files read in slices and written as a stream.

A rank reads only its own slices of a full checkpoint: the header gives each tensor's dtype,
shape and byte range, so a row range is one read and a column range is read a chunk of rows
at a time, never the whole tensor at once. (safetensors' own `get_slice` cannot return
bfloat16 through numpy or MLX, the dtype most checkpoints are in.)

`SafetensorsWriter` writes one rank's file tensor by tensor, so `shard` can pre-shard a
checkpoint larger than memory: the header's room is reserved up front from the tensor names,
and the header is written into it at the end, padded with spaces as the format allows.
"""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path

import mlx.core as mx
import numpy as np

from shardcompute.errors import ModelFormatError

# safetensors dtype -> (MLX dtype, numpy dtype of the raw bytes; bfloat16 travels as uint16)
DTYPES = {
    "F32": (mx.float32, np.float32),
    "F16": (mx.float16, np.float16),
    "BF16": (mx.bfloat16, np.uint16),
    "U32": (mx.uint32, np.uint32),
    "I32": (mx.int32, np.int32),
    "I64": (mx.int64, np.int64),
    "U8": (mx.uint8, np.uint8),
    "I8": (mx.int8, np.int8),
}
CODES = {mx_dtype: code for code, (mx_dtype, _) in DTYPES.items()}
CHUNK_BYTES = 16 << 20  # column slices are read this many bytes of whole rows at a time


def read_header(path: Path) -> tuple[dict, int]:
    """The header (tensor name -> dtype, shape, data_offsets) and where the data starts."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelFormatError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class LazyTensor:
    """One tensor of a safetensors file; indexing reads just the rows and columns asked for.

    Supports `t[a:b]`, `t[:, a:b]`, `t[a:b, c:d]` and `t[:]` (steps of 1), and returns an
    mx.array. Dimensions past the second are always read whole.
    """

    def __init__(self, path: Path, name: str, entry: dict, data_start: int):
        self.path, self.name = path, name
        if entry["dtype"] not in DTYPES:
            raise ModelFormatError(
                f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}"
            )
        self.dtype, self._np = DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])
        self._start = data_start + entry["data_offsets"][0]

    def __getitem__(self, index) -> mx.array:
        shape = self.shape or (1,)
        rows, cols = _ranges(index, shape, self.name)
        unit = prod(shape[2:])  # elements per (row, column) cell
        row_len = shape[1] * unit if len(shape) > 1 else 1
        with open(self.path, "rb") as f:
            if cols is None or cols == (0, shape[1]):
                data = self._read(f, rows[0] * row_len, (rows[1] - rows[0]) * row_len)
            else:
                data = self._read_columns(f, rows, cols, row_len, unit)
        out_shape = (rows[1] - rows[0], *((cols[1] - cols[0],) if cols else ()), *shape[2:])
        return self._to_mx(data.reshape(out_shape if self.shape else ()))

    def _read(self, f, first: int, count: int) -> np.ndarray:
        itemsize = np.dtype(self._np).itemsize
        raw = os.pread(f.fileno(), count * itemsize, self._start + first * itemsize)
        if len(raw) != count * itemsize:
            raise ModelFormatError(f"{self.path}: tensor {self.name!r} is truncated")
        return np.frombuffer(raw, self._np)

    def _read_columns(self, f, rows, cols, row_len: int, unit: int) -> np.ndarray:
        """Columns cols of rows, reading whole rows a bounded chunk at a time."""
        per_chunk = max(1, CHUNK_BYTES // (row_len * np.dtype(self._np).itemsize))
        parts = []
        for r in range(rows[0], rows[1], per_chunk):
            n = min(per_chunk, rows[1] - r)
            block = self._read(f, r * row_len, n * row_len).reshape(n, row_len)
            parts.append(np.ascontiguousarray(block[:, cols[0] * unit : cols[1] * unit]))
        return np.concatenate(parts) if parts else np.empty((0,), self._np)

    def _to_mx(self, data: np.ndarray) -> mx.array:
        out = mx.array(data)
        return out.view(mx.bfloat16) if self.dtype == mx.bfloat16 else out


def _ranges(index, shape: tuple[int, ...], name: str) -> tuple[tuple[int, int], tuple | None]:
    """(row range, column range or None) of a slice index."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > 2 or len(parts) > len(shape):
        raise IndexError(f"tensor {name!r}: index {index!r} has too many dimensions")
    ranges = []
    for part, size in zip(parts, shape, strict=False):
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise IndexError(f"tensor {name!r}: only contiguous slices are supported")
        start, stop, _ = part.indices(size)
        ranges.append((start, max(start, stop)))
    rows = ranges[0]
    cols = ranges[1] if len(ranges) > 1 else (0, shape[1]) if len(shape) > 1 else None
    return rows, cols


def open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, unread."""
    header, start = read_header(path)
    return {name: LazyTensor(path, name, entry, start) for name, entry in header.items()}


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time (names known up front, order free)."""

    def __init__(self, path: Path, names: list[str], metadata: dict[str, str] | None = None):
        self.path, self.metadata = Path(path), metadata or {}
        # Each header entry is its name plus at most ~110 characters of dtype, shape, offsets.
        room = len(json.dumps(self.metadata)) + 64 + sum(len(n) + 128 for n in names)
        self._room = -(-room // 8) * 8  # the data starts 8-aligned
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._file = open(self.path, "wb")
        self._file.write(b"\0" * (8 + self._room))

    def add(self, name: str, array: mx.array) -> None:
        if array.dtype not in CODES:
            raise ModelFormatError(f"tensor {name!r}: dtype {array.dtype} cannot be saved")
        raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
        data = np.ascontiguousarray(np.array(raw)).tobytes()
        end = self._offset + len(data)
        self._header[name] = {
            "dtype": CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self._offset, end],
        }
        self._file.write(data)
        self._offset = end

    def close(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self._header}).encode()
        if len(header) > self._room:
            raise RuntimeError(f"{self.path}: header of {len(header)} bytes > {self._room}")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._room) + header.ljust(self._room, b" "))
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()

"""The bottom of the file formats: the error type, the one safetensors header parser, and rows of a tensor read
on demand with positional reads. It imports nothing from the pack, so every other reader can build on it.

A .safetensors file is an 8-byte little-endian header length, a JSON header ({name: {"dtype", "shape",
"data_offsets": [begin, end]}}, and "__metadata__": {str: str}), then the tensors' bytes, row-major, the
offsets counted from the end of the header. `read_safetensors_header` checks what the safetensors library
checks before it trusts a header (its size, its JSON, each tensor's byte range against its shape and the
file's length), so that a truncated or foreign file is refused by name before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model file that cannot be used: wrong type, truncated, or another model family."""


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

# Bytes per value of the safetensors types that torch lacks or that DTYPES leaves out (the header check
# needs their sizes; TensorFile refuses to read them).
_OTHER_SIZES = {"U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _itemsize(dtype: str) -> int | None:
    return DTYPES[dtype].itemsize if dtype in DTYPES else _OTHER_SIZES.get(dtype)


def _checked_entries(header: object, data_bytes: int) -> dict[str, dict]:
    """The header's tensor entries, each checked against the bytes after the header; ValueError says what is wrong."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(n, int) for n in entry["data_offsets"])):
            raise ValueError(f"tensor {name!r} has a malformed entry")
        begin, stop = entry["data_offsets"]
        size = _itemsize(entry["dtype"])
        if not 0 <= begin <= stop or (size is not None and stop - begin != math.prod(entry["shape"]) * size):
            raise ValueError(f"tensor {name!r}: its byte range {begin}..{stop} does not hold its shape {entry['shape']}")
        entries[name], end = entry, max(end, stop)
    if end != data_bytes:
        raise ValueError(f"the tensors end at byte {end} of the data, which has {data_bytes} bytes")
    return entries


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """({tensor name: {"dtype", "shape", "data_offsets"}} in the header's order, its "__metadata__", the byte at
    which the tensors' data starts) of a .safetensors file, read and checked without reading a tensor.
    CheckpointError names the file when it is not a whole safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is shorter than a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {length} bytes does not fit the file")
            header = json.loads(f.read(length))
        entries = _checked_entries(header, size - 8 - length)
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("its __metadata__ is not a JSON object")
    except (OSError, ValueError) as exc:  # json's and our own errors are ValueErrors
        raise CheckpointError(f"{path.name} is not a readable .safetensors file ({exc}); "
                              "it may be truncated (re-download it) or of another format") from exc
    return entries, metadata, 8 + length


class TensorFile:
    """A .safetensors file's tensors, read on demand: whole, or a range of rows (the first dimension).
    bytes_read counts what the process has read through it (every TensorFile), and read_from what it
    read of each file (by path), for the tests."""

    bytes_read = 0
    read_from: dict[str, int] = {}

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, _, self.start = read_safetensors_header(self.path)
        unknown = sorted({e["dtype"] for e in header.values() if e["dtype"] not in DTYPES})
        if unknown:
            raise CheckpointError(f"{self.path.name} holds tensors of types this loader does not read ({', '.join(unknown)})")
        self.entries = {name: (DTYPES[e["dtype"]], list(e["shape"]), *e["data_offsets"]) for name, e in header.items()}

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop of a tensor (all of a 0-d one), in the file's dtype, on the CPU."""
        dtype, shape, begin, end = self.entries[name]
        return read_rows(self.path, name, dtype, shape, self.start + begin, start, stop)


def read_rows(path: Path, name: str, dtype: torch.dtype, shape: list[int], offset: int, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """Rows start..stop (all of a 0-d tensor) of the tensor `name` of shape `shape` stored row-major at byte
    `offset` of the file, read with positional reads (counted in TensorFile.bytes_read and read_from)."""
    if not shape:
        start, stop, row_shape = 0, 1, []
    else:
        stop = shape[0] if stop is None else min(stop, shape[0])
        start, row_shape = min(start, stop), shape[1:]
    row_bytes = math.prod(row_shape) * dtype.itemsize
    size = (stop - start) * row_bytes
    out = torch.empty((stop - start, *row_shape) if shape else (), dtype=dtype)
    if size:
        buffer = memoryview((out.view(-1) if shape else out.reshape(1)).view(torch.uint8).numpy())
        offset, done = offset + start * row_bytes, 0
        with open(path, "rb", buffering=0) as f:
            while done < size:  # a read returns at most ~2 GiB, and network file systems return less
                got = os.preadv(f.fileno(), [buffer[done:]], offset + done)
                if got == 0:
                    raise CheckpointError(f"{path.name}: tensor {name} is cut short; the file may be truncated")
                done += got
        TensorFile.bytes_read += size
        TensorFile.read_from[str(path)] = TensorFile.read_from.get(str(path), 0) + size
    return out

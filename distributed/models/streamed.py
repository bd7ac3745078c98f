"""Loading a model from a .safetensors single file one tensor at a time, straight into its place.

The model is built on the meta device; its parameters get their dtypes (the compute dtype; float32 where
the class keeps them so; fp8 for the Linear layers that keep a file's fp8 weights) and, when the weights
are sharded, FSDP2 shards them while they are still meta. Only then is memory allocated: each rank's
shards (or the whole model when not sharded), which are then filled tensor by tensor from the file,
each rank reading only the rows of its shards. No rank ever holds the whole model, or a second copy of
it: the peak is the rank's share plus one tensor being converted.

The file is read with plain positional reads (TensorFile) rather than a memory map, so that the pages of
the file never count in the process's own memory and the load's peak is what the model takes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from . import fp8
from .checkpoint import DIT_PREFIXES, CheckpointError, keeps_fp32, strip_prefix

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorFile:
    """A .safetensors file's tensors, read on demand: whole, or a range of rows (the first dimension).
    bytes_read counts what the process has read through it (every TensorFile), for the tests."""

    bytes_read = 0

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self.start = 8 + length
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
        if not shape:
            start, stop, row_shape = 0, 1, []
        else:
            stop = shape[0] if stop is None else min(stop, shape[0])
            start, row_shape = min(start, stop), shape[1:]
        row_bytes = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
        size = (stop - start) * row_bytes
        out = torch.empty((stop - start, *row_shape) if shape else (), dtype=dtype)
        if size:
            buffer = memoryview((out.view(-1) if shape else out.reshape(1)).view(torch.uint8).numpy())
            offset, done = self.start + begin + start * row_bytes, 0
            with open(self.path, "rb", buffering=0) as f:
                while done < size:  # a read returns at most ~2 GiB, and network file systems return less
                    got = os.preadv(f.fileno(), [buffer[done:]], offset + done)
                    if got == 0:
                        raise CheckpointError(f"{self.path.name}: tensor {name} is cut short; the file may be "
                                              "truncated")
                    done += got
            TensorFile.bytes_read += size
        return out


def load_peak_bytes(path: str | Path, dtype: torch.dtype, shares: int, fp8_within: tuple[str, ...] = ()) -> int:
    """What `load` adds to one rank's memory at its peak, predicted from the file's header (peak_bytes)."""
    tensors = TensorFile(path)
    return peak_bytes({name: (d, shape) for name, (d, shape, *_) in tensors.entries.items()}, dtype, shares, fp8_within)


def peak_bytes(tensors: dict[str, tuple[torch.dtype, list[int]]], dtype: torch.dtype, shares: int,
               fp8_within: tuple[str, ...] = ()) -> int:
    """The streamed load's peak on one rank for a file of these tensors ({name: (file dtype, shape)}):
    the rank's share of the weights (at the compute dtype; 1 byte for the fp8 Linear weights kept as fp8,
    those of 2-D fp8 tensors whose names start with fp8_within) plus the largest tensor's slice read and
    converted, and a margin for the allocator and the model's small buffers."""
    size = torch.empty((), dtype=dtype).element_size()
    total = largest = 0
    for name, (file_dtype, shape) in tensors.items():
        count = math.prod(shape)
        kept_fp8 = bool(fp8_within) and file_dtype.is_floating_point and file_dtype.itemsize == 1 and \
            len(shape) == 2 and name.split("diffusion_model.")[-1].startswith(fp8_within)
        total += count * (1 if kept_fp8 else size)
        largest = max(largest, count * (file_dtype.itemsize + size))
    return int(total / shares + largest / shares + LOAD_MARGIN)


LOAD_MARGIN = 64 << 20  # allocator slack, RoPE tables and the like (measured: 45 MiB at N = 1, 1.3 GiB model)


def rename_map(names: list[str], convert: Callable[[dict], dict]) -> dict[str, str]:
    """{model name: file name} for a key conversion that only renames (each output is one input):
    convert is run on one placeholder per file name and the placeholders are followed through it."""
    placeholders = {name: torch.empty(0) for name in names}
    owner = {id(t): name for name, t in placeholders.items()}
    converted = convert(dict(placeholders))
    missing = [k for k, t in converted.items() if id(t) not in owner]
    if missing:
        raise NotImplementedError(f"the key conversion builds new tensors ({missing[:3]}); it is not a renaming")
    return {k: owner[id(t)] for k, t in converted.items()}


def _my_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor a rank fills, and its first row in the whole tensor: FSDP2 shards dimension 0
    in torch.chunk's way (ceil(rows / N) rows each, fewer or none for the last ranks)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor, 0
    local = tensor.to_local()
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())
    return local, min(mesh.get_local_rank() * chunk, tensor.shape[0])


def load(make: Callable[[], torch.nn.Module], path: str | Path, convert: Callable[[dict], dict], dtype: torch.dtype,
         device: torch.device | str, what: str, *, fp8_within: tuple[str, ...] = (),
         shard: Callable[[torch.nn.Module], object] | None = None, ignore_unexpected: tuple[str, ...] = ()):
    """make()'s model with the tensors of the single file at path, loaded as the module docstring says.

    convert: the family's key conversion (file names -> model names; renames only); fp8_within: the
    module prefixes whose Linear layers keep an fp8 file's fp8 weights (fp8.keep_fp8); shard(model):
    shards the meta model's parameters (FSDP2), or None for a whole model. Non-persistent buffers are
    left uninitialised: the caller builds them (Wan's RoPE tables)."""
    tensors = TensorFile(path)
    names = [n for n in tensors.entries if not (n == "scaled_fp8" or n.endswith((".scale_weight", ".scale_input")))]
    source = rename_map(names, lambda state: convert(strip_prefix(state, DIT_PREFIXES)))
    scales = {name: float(tensors.read(name).float().reshape(-1)[0]) for name in tensors.entries
              if name.endswith(".scale_weight")}
    with torch.device("meta"):
        model = make()
    keep = keeps_fp32(type(model))
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep(name) else dtype)
    if fp8_within and any(tensors.dtype(n).is_floating_point and tensors.dtype(n).itemsize == 1 for n in names):
        shapes = {n: (tensors.shape(n), "F8" if tensors.dtype(n).itemsize == 1 else "F") for n in names}
        file_scales = {n[: -len("scale_weight")] + "weight": s for n, s in scales.items()}
        markers = fp8.fp8_markers(shapes, file_scales)
        fp8.keep_fp8(model, {k: markers[f] for k, f in source.items() if f in markers}, fp8_within)
    state = model.state_dict(keep_vars=True)
    unexpected = [k for k in source if k not in state and not any(part in k for part in ignore_unexpected)]
    missing = [k for k in state if k not in source]
    if missing or unexpected:
        raise CheckpointError(f"{Path(path).name} does not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, target in state.items():
            local, first = _my_rows(target)
            file_name = source[name]
            value = tensors.read(file_name, first, first + local.shape[0]) if local.dim() else tensors.read(file_name)
            if local.dtype.itemsize == 1 and local.is_floating_point():  # kept fp8: the file's values, unscaled
                value = value.float().to(local.dtype) if value.dtype != local.dtype else value
            else:
                if value.is_floating_point() and value.dtype.itemsize == 1:
                    value = value.float() * scales.get(file_name[: -len("weight")] + "scale_weight", 1.0)
                value = value.to(local.dtype)
            local.copy_(value.reshape(local.shape))
    return model.eval()

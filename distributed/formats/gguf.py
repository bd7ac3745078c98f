"""GGUF DiT files (city96's Wan and HunyuanVideo files for ComfyUI-GGUF): read with the `gguf` package,
kept quantized in memory, dequantized layer by layer when a layer runs.

What a file holds. A GGUF file is a header (key/value metadata, then each tensor's name, ggml type and shape,
innermost dimension first) and the tensors' bytes. city96's files keep the original checkpoint's key names
(the Wan / HunyuanVideo single-file layout, sometimes under `model.diffusion_model.`), quantize the large
2-D weights (Q8_0 ... Q2_K), and keep small and 1-D tensors in F32 / F16 / BF16. A tensor with more than
four dimensions (Wan's 5-D patch_embedding) or one whose rows are not a whole number of 256-value blocks is
stored reshaped, with its real shape in the metadata key `comfy.gguf.orig_shape.<name>`.

How the loader uses it. `GGUFFile` offers what the streamed loader (formats/streamed.py) reads from a
.safetensors file: each tensor's (logical) shape and rows read on demand with positional reads. A quantized
tensor's row of `n` values is `n / block` blocks of bytes; so a rank reads only the rows of its shards of a
quantized weight too, and a fused tensor (HunyuanVideo's q/k/v) splits by rows as a float one does.
`keep_quantized` turns the Linear layers whose weights come whole from quantized rows into `QuantizedLinear`
storage: a uint8 parameter [out_features, bytes per row] (which FSDP2 shards by rows like any parameter),
dequantized to the input's dtype when the layer runs. Everything else (F16/F32/BF16 tensors, and quantized
tensors outside the blocks or of a type without a torch dequantizer) is dequantized at load.

The dequantizers below follow ggml's reference code (ggml-quants.c, dequantize_row_*) in float32, in the
same order of operations, so that they give the numbers of `gguf.quants.dequantize` (checked in
tests/test_gguf.py on random blocks of every type).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .tensor_file import CheckpointError, read_rows

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # a dependency of the pack; say what is missing rather than fail obscurely
        raise CheckpointError("reading .gguf files needs the `gguf` package: pip install gguf") from exc
    return gguf


# The ggml float types, read as torch tensors directly.
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


# ---------------------------------------------------------------------------------------------------------
# Dequantization: uint8 blocks [n, type_size] -> float32 values [n, block_size], ggml's reference arithmetic.

def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 number at byte `at` of each block, as float32 [n, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: the low nibbles of every byte, then the high nibbles (ggml's 4-bit order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[n, count / 8] little-endian bit fields -> [n, count] of 0 / 1, bit i of the field at column i."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], count)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return d * b[:, 2:].view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return d * (_nibbles(b[:, 2:]).to(torch.int16) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[:, 4:]).float() + m


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The 5-bit values of Q5_0 / Q5_1 blocks: a nibble, and a fifth bit from the 32-bit field qh."""
    high = _bits(b[:, offset:offset + 4], 32)
    return (_nibbles(b[:, offset + 4:]) | (high << 4)).to(torch.int16)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return d * (_q5(b, 2) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _q5(b, 4).float() + m


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4) -> [n, 8] each."""
    s = scales.to(torch.int32)
    low_scale, low_min = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_scale = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_min = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_scale, high_scale], 1).float(), torch.cat([low_min, high_min], 1).float()


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
    # [n, half, shift, 32 bytes]: the 2-bit values, ordered as ggml writes them (16 groups of 16 values)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts.reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16).float()
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108].to(torch.int32)
    d = _f16(b, 108)
    group = torch.arange(16, device=b.device)
    # the 16 six-bit scales: a nibble of bytes 0-7, two bits of bytes 8-11 (ggml's kmask shuffle)
    low = (packed[:, group % 8] >> (4 * (group // 8))) & 0x0F
    high = (packed[:, 8 + group % 4] >> (2 * (group // 4))) & 3
    scales = ((low | (high << 4)) - 32).float()
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts.reshape(1, 1, 4, 1)) & 3).to(torch.int16)  # [n, half, shift, 32]
    # the high bit: bit (4 * half + shift index) of hmask's byte for the value's position in its 32
    bit = torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 2, 4, 1)
    h = ((hmask.reshape(n, 1, 1, 32) >> bit) & 1).to(torch.int16)
    values = (q - 4 * (1 - h)).reshape(n, 16, 16).float()
    return ((d * scales).unsqueeze(-1) * values).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    scale, minimum = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # 8 groups of 32
    return ((d * scale).unsqueeze(-1) * q - (dmin * minimum).unsqueeze(-1)).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    scale, minimum = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(n, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    high = (qh.reshape(n, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    q = (low + (high << 4)).float()
    return ((d * scale).unsqueeze(-1) * q - (dmin * minimum).unsqueeze(-1)).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16(b, 208)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # per half: l, l+32, l+64, l+96
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(n, 16, 16)
    return ((d * scales).unsqueeze(-1) * q).reshape(n, 256)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def block_shape(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantized rows [..., bytes per row] (uint8) -> values [..., values per row] in dtype. Types without a
    torch dequantizer (the IQ types, ...) go through gguf's own numpy code, on the CPU."""
    block, size = block_shape(qtype)
    if raw.shape[-1] % size:
        raise ValueError(f"{qtype} rows must be whole blocks of {size} bytes, got {raw.shape[-1]}")
    lead = raw.shape[:-1]
    count = raw.shape[-1] // size * block
    if qtype in DEQUANTIZERS:
        values = DEQUANTIZERS[qtype](raw.reshape(-1, size))
    else:
        gguf = _gguf()
        values = torch.from_numpy(gguf.quants.dequantize(raw.reshape(-1, size).cpu().numpy(),
                                                         gguf.GGMLQuantizationType[qtype]).astype(np.float32))
        values = values.to(raw.device)
    return values.reshape(*lead, count).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The file.

class GGUFFile:
    """A .gguf file's tensors, read on demand, with the interface of tensor_file.TensorFile: shape(name) (the
    tensor's real shape: `comfy.gguf.orig_shape` or the ggml shape reversed), dtype(name) (the torch dtype its
    rows are read in: uint8 for a quantized tensor), read(name, start, stop) (rows start..stop as stored: a
    quantized row is its bytes) and values(name, start, stop, dtype) (rows as numbers).
    qtype(name): the ggml type's name ("Q4_K", "F16", ...)."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # gguf raises ValueError / struct errors for foreign or truncated files
            raise CheckpointError(f"{self.path.name} is not a readable GGUF file ({exc}); it may be truncated "
                                  "(re-download it) or of another format") from exc
        self.metadata = _metadata(reader)
        size = self.path.stat().st_size
        self.qtypes: dict[str, str] = {}
        self.logical: dict[str, list[int]] = {}
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self.start = 0  # entries hold absolute offsets
        for tensor in reader.tensors:
            qtype = tensor.tensor_type.name
            stored = [int(v) for v in reversed(tensor.shape.tolist())]
            shape = self.metadata.get(ORIG_SHAPE_KEY + tensor.name, stored)
            if math.prod(shape) != math.prod(stored):
                raise CheckpointError(f"{self.path.name}: {tensor.name}'s original shape {shape} does not hold its "
                                      f"{math.prod(stored)} values ({stored})")
            if tensor.data_offset + tensor.n_bytes > size:
                raise CheckpointError(f"{self.path.name}: tensor {tensor.name} is cut short; the file may be truncated")
            self.qtypes[tensor.name] = qtype
            self.logical[tensor.name] = list(shape)
            if qtype in _FLOAT_TYPES:
                self.entries[tensor.name] = (_FLOAT_TYPES[qtype], list(shape), tensor.data_offset,
                                             tensor.data_offset + tensor.n_bytes)
                continue
            block, type_size = block_shape(qtype)
            per_row = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
            # rows of whole blocks are read row by row; others (a reshaped small tensor) only whole
            rows = shape[0] if len(shape) > 1 and per_row % block == 0 else 1
            self.entries[tensor.name] = (torch.uint8, [rows, tensor.n_bytes // rows], tensor.data_offset,
                                         tensor.data_offset + tensor.n_bytes)
        del reader  # its memory map of the file

    def qtype(self, name: str) -> str:
        return self.qtypes[name]

    def is_quantized(self, name: str) -> bool:
        return self.qtypes[name] not in _FLOAT_TYPES

    def row_selectable(self, name: str) -> bool:
        """Can the tensor's rows be read one by one (a float tensor, or whole blocks per row)?"""
        return not self.is_quantized(name) or self.entries[name][1][0] == self.logical[name][0]

    def shape(self, name: str) -> list[int]:
        return self.logical[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        dtype, stored, begin, end = self.entries[name]
        return read_rows(self.path, name, dtype, stored, begin, start, stop)

    def values(self, name: str, start: int = 0, stop: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop as numbers in dtype (dequantized, float32 arithmetic), in the tensor's real shape."""
        shape = self.logical[name]
        if not self.is_quantized(name):
            return self.read(name, start, stop).to(dtype)
        qtype = self.qtypes[name]
        if self.row_selectable(name):
            raw = self.read(name, start, stop)
            return dequantize(raw, qtype, dtype).reshape(raw.shape[0], *shape[1:])
        whole = dequantize(self.read(name), qtype, dtype).reshape(shape)
        return whole if not shape else whole[start:stop]


def _metadata(reader) -> dict:
    """The file's key/value metadata as Python values (strings, numbers, lists of them)."""
    gguf = _gguf()
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
                if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING:
                    out[name] = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
                else:
                    out[name] = [field.parts[i].tolist()[0] for i in field.data]
            elif field.types and field.types[0] == gguf.GGUFValueType.STRING:
                out[name] = bytes(field.parts[field.data[-1]]).decode("utf-8", "replace")
            else:
                out[name] = field.parts[field.data[-1]].tolist()[0]
        except (IndexError, ValueError):  # a malformed field: keep loading; a tensor that needs it will fail
            continue
    return out


def is_gguf(path: str | Path) -> bool:
    """A GGUF file (by its magic bytes, whatever its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_header(path: str | Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """checkpoint.read_header for a GGUF file: {name: (real shape, ggml type)} and its metadata (as strings)."""
    tensors = GGUFFile(path)
    shapes = {name: (tensors.shape(name), tensors.qtype(name)) for name in tensors.entries}
    return shapes, {k: str(v) for k, v in tensors.metadata.items()}


# ---------------------------------------------------------------------------------------------------------
# Layers that keep their quantized weights.

class QuantizedLinear(torch.nn.Linear):
    """A Linear layer whose weight stays in a GGUF file's quantized form: `weight` is a uint8 parameter
    [out_features, bytes per row] (FSDP2 shards and gathers it by rows), dequantized to the input's dtype
    each time the layer runs. qtype: the ggml type's name."""

    qtype: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight, self.qtype, x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def keep_quantized(model: torch.nn.Module, qtypes: dict[str, str], within: tuple[str, ...],
                   skip: Callable[[str], bool] | None = None) -> dict[str, str]:
    """On the meta model: the Linear layers inside the modules named by the prefixes `within` whose weights
    come from quantized rows of one ggml type (qtypes: {model weight name: type}, from the loader's source
    map) become QuantizedLinear with a meta uint8 weight. Returns {layer name: ggml type} of those kept.
    Layers outside `within` stay at the compute dtype, as fp8.keep_fp8 leaves them (diffusers casts the
    embedders' inputs to their parameters' dtype)."""
    kept = {}
    for name, module in model.named_modules():
        qtype = qtypes.get(f"{name}.weight")
        if type(module) is not torch.nn.Linear or not name.startswith(within) or qtype is None \
                or qtype not in DEQUANTIZERS or (skip is not None and skip(f"{name}.weight")):
            continue
        block, size = block_shape(qtype)
        if module.in_features % block:
            continue
        module.__class__ = QuantizedLinear
        module.qtype = qtype
        module.weight = torch.nn.Parameter(
            torch.empty(module.out_features, module.in_features // block * size, dtype=torch.uint8, device="meta"),
            requires_grad=False)
        kept[name] = qtype
    return kept


def quantized_layers(model: torch.nn.Module) -> dict[str, str]:
    """{layer name: ggml type} of the model's QuantizedLinear layers (the loader's info)."""
    return {name: m.qtype for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def by_layer_kind(layers: dict[str, str]) -> dict[str, str]:
    """{layer name with its block index as '*': the ggml types of those layers} ('blocks.*.ffn.net.2': 'Q6_K';
    'Q4_K/Q6_K' where the blocks differ, as in city96's Q4_K_M files), in the model's order."""
    import re

    kinds: dict[str, list[str]] = {}
    for name, qtype in layers.items():
        kind = kinds.setdefault(re.sub(r"\.\d+\.", ".*.", name, count=1), [])
        if qtype not in kind:
            kind.append(qtype)
    return {kind: "/".join(sorted(types)) for kind, types in kinds.items()}


def summary(layers: dict[str, str]) -> str:
    """'Q4_K 240, Q6_K 40' (layers per type, most first)."""
    counts: dict[str, int] = {}
    for qtype in layers.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


__all__ = ["GGUFFile", "QuantizedLinear", "keep_quantized", "quantized_layers", "dequantize", "DEQUANTIZERS",
           "is_gguf", "read_header", "summary", "by_layer_kind", "block_shape"]

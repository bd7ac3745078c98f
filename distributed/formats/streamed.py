"""Loading a model from a .safetensors single file one tensor at a time, straight into its place.

The model is built on the meta device; its parameters get their dtypes (the compute dtype; float32 where
the class keeps them so; fp8 for the Linear layers that keep a file's fp8 weights) and, when the weights
are sharded, FSDP2 shards them while they are still meta. Only then is memory allocated: each rank's
shards (or the whole model when not sharded), which are then filled tensor by tensor from the file,
each rank reading only the rows of its shards. No rank ever holds the whole model, or a second copy of
it: the peak is the rank's share plus one tensor being converted.

The file is read with plain positional reads (TensorFile) rather than a memory map, so that the pages of
the file never count in the process's own memory and the load's peak is what the model takes.

A family's key conversion (file names -> model names) may rename tensors and select their rows: split a
fused q/k/v tensor, reorder the halves of a modulation table (`source_map` follows it). Each model tensor
is then read as row ranges of file tensors, and a rank reads only the rows of its shard of each part.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from . import fp8, gguf
from .checkpoint import DIT_PREFIXES, comfy_rounded_biases, keeps_fp32, strip_prefix
from .gguf import GGUFFile
from .tensor_file import CheckpointError, TensorFile


def open_tensors(path: str | Path):
    """The tensors of a single file, read on demand: a TensorFile (.safetensors) or a GGUFFile (.gguf)."""
    return GGUFFile(path) if gguf.is_gguf(path) else TensorFile(path)


def load_peak_bytes(path: str | Path, dtype: torch.dtype, shares: int, keep_within: tuple[str, ...] = ()) -> int:
    """What `load` adds to one rank's memory at its peak, predicted from the file's header (peak_bytes).
    A GGUF file's quantized tensors count as their bytes where they stay quantized, else as their values."""
    tensors = open_tensors(path)
    entries = {}
    for name, (file_dtype, shape, *_) in tensors.entries.items():
        if getattr(tensors, "is_quantized", lambda _: False)(name) and not (
                _within(name, keep_within) and tensors.row_selectable(name) and len(shape) == 2):
            file_dtype, shape = torch.float32, tensors.shape(name)  # dequantized at load
        entries[name] = (file_dtype, shape)
    return peak_bytes(entries, dtype, shares, keep_within)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and name.split("diffusion_model.")[-1].startswith(prefixes)


def peak_bytes(tensors: dict[str, tuple[torch.dtype, list[int]]], dtype: torch.dtype, shares: int,
               keep_within: tuple[str, ...] = ()) -> int:
    """The streamed load's peak on one rank for a file of these tensors ({name: (file dtype, shape)}):
    the rank's share of the weights (at the compute dtype; 1 byte per stored byte for the Linear weights that
    keep the file's compact storage: 2-D fp8 tensors, or a GGUF file's quantized rows (uint8), whose names
    start with keep_within) plus the largest tensor's slice read and converted, and a margin for the
    allocator and the model's small buffers."""
    size = dtype.itemsize
    total = largest = 0
    for name, (file_dtype, shape) in tensors.items():
        count = math.prod(shape)
        compact = file_dtype.itemsize == 1 and (file_dtype.is_floating_point or file_dtype == torch.uint8)
        kept = compact and len(shape) == 2 and _within(name, keep_within)
        total += count * (1 if kept else size)
        largest = max(largest, count * (file_dtype.itemsize + size))
    return int(total / shares + largest / shares + LOAD_MARGIN)


LOAD_MARGIN = 64 << 20  # allocator slack, RoPE tables and the like (measured: 45 MiB at N = 1, 1.3 GiB model)


Rows = tuple[str, int, int]  # (file tensor, first row, stop row); a 0-d tensor is one row (0, 1)


def source_map(tensors: dict[str, list[int]], convert: Callable[[dict], dict], what: str) -> dict[str, list[Rows]]:
    """{model name: its rows, in order, as row ranges of file tensors} for a key conversion that renames
    tensors and selects or reorders their rows (dimension 0: chunk, split, slicing, cat), such as a fused
    q/k/v tensor split into to_q, to_k, to_v. tensors: {file name: shape}; what: the file, for errors.

    convert runs on placeholders that hold each file row's global number: an int64 tensor of the file
    tensor's number of dimensions, its rows along dimension 0 and size 1 elsewhere (a few bytes per row,
    never the weights). What comes out says which rows each model tensor is made of. A conversion that
    computes values (casts, arithmetic, transposes, reshapes) is refused: it cannot be read row by row,
    and such a family needs a loader of its own that reads the tensors whole."""
    names = list(tensors)
    rows = torch.tensor([shape[0] if shape else 1 for shape in tensors.values()], dtype=torch.int64)
    ends = rows.cumsum(0)
    starts = ends - rows
    placeholders = {}
    for name, shape, first, count in zip(names, tensors.values(), starts.tolist(), rows.tolist()):
        numbers = torch.arange(first, first + count)
        placeholders[name] = numbers.view(count, *[1] * (len(shape) - 1)) if shape else numbers[0]
    converted = convert(placeholders)
    computed = [k for k, t in converted.items()
                if not (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and all(n == 1 for n in t.shape[1:]))]
    if computed:
        raise NotImplementedError(f"{what}: the key conversion computes tensors ({', '.join(computed[:3])}) rather "
                                  "than selecting rows of the file's; they cannot be read row by row")
    source = {}
    for key, numbers in converted.items():
        numbers = numbers.reshape(-1)
        if numbers.numel() and not (0 <= int(numbers.min()) and int(numbers.max()) < int(ends[-1])):
            raise NotImplementedError(f"{what}: the key conversion computes {key} rather than selecting rows")
        index = torch.searchsorted(ends, numbers, right=True)  # which file tensor each row comes from
        row = numbers - starts[index]
        # a new range wherever the file tensor changes or the rows stop being consecutive
        breaks = ((index[1:] != index[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().reshape(-1) + 1
        bounds = [0, *breaks.tolist(), numbers.numel()] if numbers.numel() else []
        source[key] = [(names[int(index[a])], int(row[a]), int(row[b - 1]) + 1) for a, b in zip(bounds, bounds[1:])]
    return source


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
         device: torch.device | str, what: str, *, keep_within: tuple[str, ...] = (),
         shard: Callable[[torch.nn.Module], object] | None = None, ignore_unexpected: tuple[str, ...] = (),
         prefixes: tuple[str, ...] = DIT_PREFIXES, comfy_dit: bool = False):
    """make()'s model with the tensors of the single file at path, loaded as the module docstring says.

    convert: the family's key conversion (file names, less the container prefixes, -> model names; renames
    and row selections, see source_map; names it leaves out are not read); keep_within: the module prefixes
    whose Linear layers keep the file's compact weights: an fp8 file's fp8 weights (fp8.keep_fp8), a GGUF
    file's quantized rows (gguf.keep_quantized); not the layers the class keeps in float32;
    shard(model): shards the meta model's parameters (FSDP2), or None for a whole model. Tied parameters
    (one Parameter under two names) are read once and stay one. Non-persistent buffers are left
    uninitialised: the caller builds them (Wan's RoPE tables). comfy_dit: the file is a diffusion model, whose
    Linear biases ComfyUI rounds to fp8 in a scaled-fp8 file; they are rounded the same way
    (checkpoint.comfy_rounded_biases)."""
    tensors = open_tensors(path)
    if isinstance(tensors, GGUFFile) and not comfy_dit:
        raise CheckpointError(f"{Path(path).name} is a GGUF file: GGUF is read for diffusion models (the DiT) "
                              f"only; load {what} from its .safetensors file")
    names = _weight_names(tensors)
    source = source_map({n: tensors.shape(n) for n in names}, lambda state: convert(strip_prefix(state, prefixes)),
                        Path(path).name)
    scales = {name[: -len("scale_weight")] + "weight": float(tensors.read(name).float().reshape(-1)[0])
              for name in tensors.entries if name.endswith(".scale_weight")}
    model = _meta_model(make, tensors, names, source, scales, dtype, keep_within)
    _check_fit(model, tensors, source, Path(path).name, what, ignore_unexpected)
    rounded = comfy_rounded_biases({n: (tensors.dtype(n), tensors.shape(n)) for n in tensors.entries}) \
        if comfy_dit else {}
    tied = _tied_names(model)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    _retie(model, tied)  # to_empty gives each module its own tensor (FSDP keeps its shared parameters shared)
    _fill(model, tensors, source, scales, rounded)
    return model.eval()


def _meta_model(make: Callable[[], torch.nn.Module], tensors, names: list[str], source: dict[str, list[Rows]],
                scales: dict[str, float], dtype: torch.dtype, keep_within: tuple[str, ...]) -> torch.nn.Module:
    """make()'s model on the meta device with its parameters' dtypes: the compute dtype, float32 where its class
    keeps them so, and the file's compact storage (fp8, GGUF rows) for the Linear layers inside keep_within."""
    with torch.device("meta"):
        model = make()
    keep = keeps_fp32(type(model))
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep(name) else dtype)
    fp8_names = [n for n in names if tensors.dtype(n).is_floating_point and tensors.dtype(n).itemsize == 1]
    if keep_within and fp8_names:
        # the layers keep the file's own fp8 format (e4m3fn or e5m2): never re-rounded to another
        fp8.keep_fp8(model, _fp8_markers(tensors, names, scales, source), keep_within,
                     fp8_dtype=tensors.dtype(fp8_names[0]), skip=keep)
    if isinstance(tensors, GGUFFile) and keep_within:
        gguf.keep_quantized(model, _quantized_sources(tensors, source), keep_within, skip=keep)
    return model


def _check_fit(model: torch.nn.Module, tensors, source: dict[str, list[Rows]], what_file: str, what: str,
               ignore_unexpected: tuple[str, ...]) -> None:
    """CheckpointError unless the file's tensors, under the key conversion, are exactly the model's, row for row."""
    state = model.state_dict(keep_vars=True)
    unexpected = [k for k in source if k not in state and not any(part in k for part in ignore_unexpected)]
    missing = [k for k in state if k not in source]
    if missing or unexpected:
        raise CheckpointError(f"{what_file} does not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _check_rows(tensors, state, source, what_file, {f"{name}.weight": [m.out_features, m.in_features]
                                                    for name, m in model.named_modules()
                                                    if isinstance(m, gguf.QuantizedLinear)})


def _fill(model: torch.nn.Module, tensors, source: dict[str, list[Rows]], scales: dict[str, float],
          rounded: dict[str, torch.dtype]) -> None:
    """Fill each of this rank's (allocated, maybe sharded) tensors from the file: only the rows of its shard of each
    row range; a tensor held under several names once."""
    filled = set()
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if id(target) in filled:
                continue
            filled.add(id(target))
            local, first = _my_rows(target)
            if local.dim() == 0:
                (file_name, _, _), = source[name]
                local.copy_(_converted(_file_rows(tensors, file_name, 0, None, local.dtype), local.dtype,
                                       scales.get(file_name, 1.0), rounded.get(file_name)).reshape(()))
                continue
            stop, at = first + local.shape[0], 0  # at: the model row where a range starts
            for file_name, begin, end in source[name]:
                lo, hi = max(first, at), min(stop, at + end - begin)  # this range's rows that are mine
                if lo < hi:
                    value = _converted(_file_rows(tensors, file_name, begin + lo - at, begin + hi - at, local.dtype),
                                       local.dtype, scales.get(file_name, 1.0), rounded.get(file_name))
                    local[lo - first: hi - first].copy_(value.reshape(hi - lo, *local.shape[1:]))
                at += end - begin


def _weight_names(tensors) -> list[str]:
    """The file's tensors that are weights (not ComfyUI's fp8 scales and marker)."""
    return [n for n in tensors.entries if not (n == "scaled_fp8" or n.endswith((".scale_weight", ".scale_input")))]


def file_source_map(path: str | Path, convert: Callable[[dict], dict],
                    prefixes: tuple[str, ...] = DIT_PREFIXES) -> tuple[dict[str, list[Rows]], dict[str, list[int]]]:
    """(source_map of a single file under a family's key conversion, {file tensor name less its container
    prefix: shape}): which rows of which file tensor each model tensor is made of, from the header alone
    (what `load` reads; what a LoRA's layers map through: formats/lora.py)."""
    tensors = open_tensors(path)
    names = _weight_names(tensors)
    stripped = {original: name for name, original in strip_prefix({n: n for n in names}, prefixes).items()}
    source = source_map({n: tensors.shape(n) for n in names}, lambda state: convert(strip_prefix(state, prefixes)),
                        Path(path).name)
    # name the file tensors without their container prefix, as LoRAs name them
    source = {key: [(stripped[f], b, e) for f, b, e in ranges] for key, ranges in source.items()}
    return source, {stripped[n]: tensors.shape(n) for n in names}


def _file_rows(tensors, name: str, start: int, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a file tensor as read for a model tensor of dtype: a GGUF quantized tensor's bytes where the
    model keeps them quantized (uint8), else its values (float32); any other tensor as stored."""
    if isinstance(tensors, GGUFFile) and tensors.is_quantized(name) and dtype != torch.uint8:
        return tensors.values(name, start, stop)
    return tensors.read(name, start, stop)


def _quantized_sources(tensors: GGUFFile, source: dict[str, list[Rows]]) -> dict[str, str]:
    """{model tensor: ggml type} of the model tensors made of whole rows of quantized file tensors of one type
    (those that can stay quantized)."""
    out = {}
    for key, ranges in source.items():
        kinds = {tensors.qtype(f) if tensors.is_quantized(f) and tensors.row_selectable(f) else None
                 for f, _, _ in ranges}
        if len(kinds) == 1 and None not in kinds:
            out[key] = kinds.pop()
    return out


def _converted(value: torch.Tensor, dtype: torch.dtype, scale: float, rounded: torch.dtype | None = None) -> torch.Tensor:
    """A file tensor's values in a model tensor's dtype: a kept fp8 weight takes the file's fp8 values
    unscaled (its layer scales them); an fp8 value going to a wider dtype is multiplied by its scale.
    rounded: the fp8 dtype ComfyUI rounds this tensor to first (checkpoint.comfy_rounded_biases), if any."""
    if rounded is not None and value.is_floating_point() and value.dtype.itemsize > 1:
        value = value.to(rounded)
    if dtype.itemsize == 1 and dtype.is_floating_point:
        return value.float().to(dtype) if value.dtype != dtype else value
    if value.is_floating_point() and value.dtype.itemsize == 1:
        value = value.float() * scale
    return value.to(dtype)


def _fp8_markers(tensors: TensorFile, names: list[str], scales: dict[str, float],
                 source: dict[str, list[Rows]]) -> dict[str, torch.Tensor]:
    """fp8.fp8_markers by model name: each model tensor's rows' markers. A tensor gathered from fp8 tensors
    of different scales gets none (its layer has one scale), and stays in the compute dtype."""
    shapes = {n: (tensors.shape(n), "F8" if tensors.dtype(n).itemsize == 1 else "F") for n in names}
    by_file = fp8.fp8_markers(shapes, scales)
    markers = {}
    for key, ranges in source.items():
        if ranges and all(f in by_file for f, _, _ in ranges):
            marker = torch.cat([by_file[f][begin:end] for f, begin, end in ranges])
            markers[key] = marker if bool((marker == marker[0]).all()) else torch.zeros_like(marker)
    return markers


def _check_rows(tensors, state: dict[str, torch.Tensor], source: dict[str, list[Rows]], what: str,
                logical: dict[str, list[int]]) -> None:
    """Every model tensor is made of whole rows of its file tensors, as many as it has. logical: the shapes
    of the values of model tensors stored otherwise (a QuantizedLinear's weight holds bytes)."""
    for key, target in state.items():
        ranges = source[key]
        shape = logical.get(key, list(target.shape))
        if not shape:
            fits = len(ranges) == 1 and math.prod(tensors.shape(ranges[0][0])) == 1
        else:
            row_size = math.prod(shape[1:])
            fits = sum(end - begin for _, begin, end in ranges) == shape[0] and \
                all(math.prod(tensors.shape(f)[1:]) == row_size for f, _, _ in ranges)
        if not fits:
            parts = ", ".join(f"{f} {tensors.shape(f)} rows {begin}..{end}" for f, begin, end in ranges)
            raise CheckpointError(f"{what}: the model's {key} {shape} does not fit the file's {parts}")


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    """The names of each parameter that the model holds under several names (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: torch.nn.Module, tied: list[list[str]]) -> None:
    for first, *others in tied:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            if model.get_parameter(name) is not param:
                setattr(model.get_submodule(owner), attr, param)

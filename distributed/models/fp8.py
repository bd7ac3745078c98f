"""fp8 weights kept in fp8: ComfyUI's *_fp8_e4m3fn (and "scaled" fp8) files stay in fp8 in memory;
each Linear layer casts its weight to the compute dtype (and multiplies by its scale) when it runs.

The loaders build the model from dequantized tensors (checkpoint.dequantize); `fp8_markers` follows
every fp8 tensor of the file through the loader's key conversion (renames, q/k/v splits, concatenations),
and `keep_fp8` turns the Linear layers whose weights came from fp8 back into fp8 storage. A value read
from fp8 (times its scale) converts back to the very same fp8 value, so the layer computes with the
file's weights exactly; the results equal the dequantized model's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import FP8_DTYPES


def fp8_markers(shapes: dict[str, tuple[list[int], str]], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """One row marker per 2-D fp8 weight: its scale (1.0 when unscaled), 0 for other tensors."""
    markers = {}
    for key, (shape, dtype) in shapes.items():
        if len(shape) == 2:
            scale = scales.get(key, 1.0) if dtype.startswith("F8") else 0.0
            markers[key] = torch.full((shape[0],), float(scale))
    return markers


def file_scales(path) -> dict[str, float]:
    """ComfyUI's scaled fp8: <name>.scale_weight beside <name>.weight."""
    from safetensors import safe_open

    scales = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".scale_weight"):
                scales[key[: -len("scale_weight")] + "weight"] = float(f.get_tensor(key).float().reshape(-1)[0])
    return scales


def _fp8_forward(module: torch.nn.Linear, scale: float) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight.to(x.dtype)
        if scale != 1.0:
            weight = weight * scale
        return F.linear(x, weight, module.bias)
    return forward


def keep_file_fp8(model: torch.nn.Module, path, shapes: dict[str, tuple[list[int], str]], within: tuple[str, ...],
                  convert: Callable[[dict], dict] = lambda markers: markers,
                  skip: Callable[[str], bool] | None = None) -> None:
    """What every loader does after building its model from an fp8 file's dequantized tensors: the
    Linear weights that came from fp8 go back to fp8 storage. convert(markers) is the loader's own
    key conversion (file names -> model names); within and skip as keep_fp8. Nothing for other files."""
    if is_fp8_file(shapes):
        keep_fp8(model, convert(fp8_markers(shapes, file_scales(path))), within, skip=skip)


def count_fp8_layers(model: torch.nn.Module) -> int:
    """How many Linear layers of the model store their weights in fp8 (the loader's info reports it)."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype in FP8_DTYPES)


def keep_fp8(model: torch.nn.Module, markers: dict[str, torch.Tensor], within: tuple[str, ...],
             fp8_dtype=torch.float8_e4m3fn, skip: Callable[[str], bool] | None = None) -> None:
    """Store in fp8 the Linear weights, inside the modules named by the prefixes `within` (the
    repeated blocks: nearly all the weights), whose markers say they came from fp8.
    The embedders outside the blocks stay dequantized: diffusers casts their inputs to their
    parameters' dtype. skip(weight name): layers to leave alone (those a class keeps in float32,
    like UMT5's `wo`, whose input transformers casts to the weight's dtype)."""
    for name, module in model.named_modules():
        if not name.startswith(within) or (skip is not None and skip(f"{name}.weight")):
            continue
        marker = markers.get(f"{name}.weight")
        if not isinstance(module, torch.nn.Linear) or marker is None or not bool((marker > 0).all()):
            continue
        scale = float(marker[0])
        stored = (module.weight.data.float() / scale).to(fp8_dtype)
        module.weight = torch.nn.Parameter(stored, requires_grad=False)
        module.forward = _fp8_forward(module, scale)


def is_fp8_file(shapes: dict[str, tuple[list[int], str]]) -> bool:
    return any(dtype.startswith("F8") for _, dtype in shapes.values())


__all__ = ["fp8_markers", "file_scales", "keep_fp8", "keep_file_fp8", "count_fp8_layers", "is_fp8_file", "FP8_DTYPES"]

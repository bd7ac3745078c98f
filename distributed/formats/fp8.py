"""fp8 weights kept in fp8: ComfyUI's *_fp8_e4m3fn (and "scaled" fp8) files stay in fp8 in memory;
each Linear layer casts its weight to the compute dtype (and multiplies by its scale) when it runs.

The loaders build the model from dequantized tensors (checkpoint.dequantize); `fp8_markers` follows
every fp8 tensor of the file through the loader's key conversion (renames, q/k/v splits, concatenations),
and `keep_fp8` turns the Linear layers whose weights came from fp8 back into fp8 storage. A value read
from fp8 (times its scale) converts back to the very same fp8 value, so the layer computes with the
file's weights exactly; the results equal the dequantized model's.

fp8 compute (the group's fp8_compute, `use_scaled_mm`): on CUDA GPUs of compute capability >= 8.9 the
fp8 layers can instead multiply in fp8 with torch._scaled_mm: the input is quantized to e4m3fn per
tensor (one scale from its absolute maximum, each call), the weight is the stored fp8 with its file
scale, the product accumulates in float32 and comes out in the compute dtype. That is an
approximation of the cast path (the input is rounded to fp8): docs/features.md states the measured tolerance.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


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


FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: fp8 tensor cores
_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def fp8_compute_unavailable(device: torch.device | str) -> str | None:
    """Why fp8 compute cannot run on this device, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"fp8_compute 'on' multiplies in fp8 (torch._scaled_mm) on CUDA GPUs of compute capability >= 8.9 "
                f"(Ada, Hopper, Blackwell), and this group runs on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_COMPUTE_CAPABILITY:
        return (f"fp8_compute 'on' needs a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) for fp8 "
                f"matmuls; {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    if not hasattr(torch, "_scaled_mm"):
        return f"fp8_compute 'on' needs torch._scaled_mm, which torch {torch.__version__} lacks"
    return None


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any float) -> (x / scale in e4m3fn, scale: float32 scalar tensor) with |x|'s maximum at e4m3fn's 448."""
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn), scale


def _scaled_mm_forward(module: torch.nn.Linear, scale: float) -> Callable:
    weight_scales: dict[torch.device, torch.Tensor] = {}  # the file scale, once per device

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (..., in) -> (M, in)
        x_fp8, x_scale = quantize_per_tensor(rows)
        if x.device not in weight_scales:
            weight_scales[x.device] = torch.tensor(scale, dtype=torch.float32, device=x.device)
        # (M, in) @ (in, out): the weight's transpose is the column-major operand _scaled_mm wants
        out = torch._scaled_mm(x_fp8, module.weight.t(), scale_a=x_scale, scale_b=weight_scales[x.device],
                               out_dtype=x.dtype)
        if module.bias is not None:
            out = out + module.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return forward


def use_scaled_mm(model: torch.nn.Module) -> int:
    """Make the fp8 Linear layers (keep_fp8's) multiply in fp8 with torch._scaled_mm; how many do.
    Layers whose sizes are not multiples of 16 (what _scaled_mm needs) keep casting their weights."""
    count = 0
    for module in model.modules():
        scale = getattr(module, "fp8_scale", None)
        if scale is None or module.in_features % 16 or module.out_features % 16:
            continue
        module.forward = _scaled_mm_forward(module, scale)
        count += 1
    return count


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
        module.fp8_scale = scale  # what use_scaled_mm needs
        module.forward = _fp8_forward(module, scale)


def is_fp8_file(shapes: dict[str, tuple[list[int], str]]) -> bool:
    return any(dtype.startswith("F8") for _, dtype in shapes.values())


__all__ = ["fp8_markers", "file_scales", "keep_fp8", "keep_file_fp8", "count_fp8_layers", "is_fp8_file", "FP8_DTYPES",
           "fp8_compute_unavailable", "quantize_per_tensor", "use_scaled_mm"]

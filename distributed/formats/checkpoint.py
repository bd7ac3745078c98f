"""Checkpoint files read offline, whatever their format, with errors that name the file and say what would be
valid: the format dispatch (a GGUF file by its magic bytes, a pickle refused by its suffix, else safetensors),
and the helpers every family's loader uses (container prefixes, dequantization, building on the meta device).

CheckpointError lives in the leaf tensor_file.py; it is imported from here by the families and the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from . import gguf
from .fp8 import FP8_DTYPES
from .tensor_file import CheckpointError, read_safetensors_header

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def read_header(path: str | Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Shapes and dtypes of every tensor in a .safetensors (or GGUF) file, and its metadata, without
    reading the tensors. Raises CheckpointError for anything that is not a whole safetensors or GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    if gguf.is_gguf(path):  # a GGUF DiT: {name: (shape, ggml type such as "Q4_K")}, its metadata
        return gguf.read_header(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name}: pickle checkpoints ({path.suffix}) are not loaded; "
                              "use the .safetensors file of the same model (ComfyUI's repackaged files are)")
    entries, metadata, _ = read_safetensors_header(path)
    # by name, as the safetensors library lists a file's keys
    return {name: (list(entries[name]["shape"]), entries[name]["dtype"]) for name in sorted(entries)}, metadata


def load_state_dict(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (or those named by keys); GGUF files are refused (DiTs only)."""
    from safetensors.torch import load_file

    if gguf.is_gguf(path):
        raise CheckpointError(f"{Path(path).name} is a GGUF file: GGUF is read for diffusion models (the DiT) only; "
                              "use the .safetensors file of this model")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{Path(path).name}: could not read tensors ({exc}); the file may be truncated") from exc
    return state if keys is None else {k: state[k] for k in keys}


# The container prefixes of DiT single files (ComfyUI's full checkpoints, some repackaged files).
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def unprefixed(mapping: dict, prefixes: tuple[str, ...] = DIT_PREFIXES) -> dict:
    """The same mapping (a header's shapes, say) with each key's container prefix, if any, removed."""
    out = {}
    for key, value in mapping.items():
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        out[key[len(prefix):]] = value
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop a container prefix such as ComfyUI's 'model.diffusion_model.'."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def keeps_fp32(model_class) -> Callable[[str], bool]:
    """Which parameter names a diffusers/transformers class keeps in float32 whatever the compute
    dtype (norms, modulation tables, time embedders: `_keep_in_fp32_modules`)."""
    names = tuple(getattr(model_class, "_keep_in_fp32_modules", None) or ())
    return lambda key: any(part in names for part in key.split("."))


def comfy_rounded_biases(tensors: dict[str, tuple[torch.dtype, list[int]]]) -> dict[str, torch.dtype]:
    """{file tensor name: fp8 dtype} for the biases ComfyUI 0.3.64 rounds to fp8 when it loads a "scaled fp8"
    diffusion model ({name: (dtype, shape)} of the file's tensors; one with a `scaled_fp8` marker tensor).
    ComfyUI's scaled-fp8 layers (comfy.ops.scaled_fp8_ops) build every Linear layer, bias included, in the
    marker's fp8 dtype (a float32 marker means float8_e4m3fn: model_detection.model_config_from_unet) and copy
    the file's tensors into them: a bias stored wider loses its precision to fp8 (only the weight has a scale).
    The Linear layers are those of the file's own layout: a `.bias` beside a 2-D `.weight`. The DiT loaders
    round the same biases, so that results equal native ComfyUI's (checked against ComfyUI's own loader in
    tests/comfyui_reference/fp8.py). For DiTs only: ComfyUI builds text encoders from such files with float32
    layers (T5, Llama) or without the scaled layers (CLIP-L in DualCLIPLoader), and VAEs never with them.
    (Later ComfyUI versions keep biases wide; this follows the version the pack is tested against.)"""
    marker = tensors.get("scaled_fp8")
    if marker is None or not marker[0].is_floating_point:
        return {}
    fp8_dtype = torch.float8_e4m3fn if marker[0] == torch.float32 else marker[0]
    if fp8_dtype.itemsize != 1:
        return {}
    return {name: fp8_dtype for name, (dtype, shape) in tensors.items()
            if name.endswith(".bias") and dtype.is_floating_point and dtype.itemsize > 1
            and len(tensors.get(name[: -len("bias")] + "weight", (None, []))[1]) == 2}


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype,
               keep_fp32: Callable[[str], bool] | None = None, comfy_dit: bool = False) -> dict[str, torch.Tensor]:
    """Cast every floating tensor to dtype (float32 where keep_fp32(name) says so); fp8 weights
    with ComfyUI 'scaled fp8' per-tensor scales (<name>.scale_weight) are multiplied by their scale. comfy_dit:
    the file is a diffusion model, whose Linear biases ComfyUI rounds to fp8 in a scaled file (comfy_rounded_biases)."""
    out = {}
    rounded = comfy_rounded_biases({k: (v.dtype, list(v.shape)) for k, v in state.items()}) if comfy_dit else {}
    for key, value in state.items():
        if key in rounded:
            value = value.to(rounded[key])
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        if value.dtype in FP8_DTYPES:
            scale = state.get(key[: -len("weight")] + "scale_weight") if key.endswith("weight") else None
            value = value.float() * scale.float() if scale is not None else value.float()
        if value.is_floating_point():
            value = value.to(torch.float32 if keep_fp32 is not None and keep_fp32(key) else dtype)
        out[key] = value
    return out


def cast_model(model, dtype: torch.dtype):
    """model.to(dtype), except the parameters its class keeps in float32."""
    keep = keeps_fp32(type(model))
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep(name) else dtype)
    return model


def config_from_metadata(metadata: dict[str, str], key: str) -> dict | None:
    """Our tiny models carry their diffusers config in the safetensors metadata."""
    return json.loads(metadata[key]) if key in metadata else None


def from_folder(model_class, path: str | Path, dtype: torch.dtype, device, what: str, shard=None):
    """A diffusers or transformers model from a local folder: its config.json and safetensors weights,
    never a hub, never a pickle (use_safetensors: a folder with only .bin files is refused); with shard, sharded
    by shard(model) once loaded."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a folder without config.json; expected {what}")
    try:
        model = model_class.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, EnvironmentError) as exc:
        raise CheckpointError(f"{path}: could not load {what} ({exc}); only .safetensors weights are loaded") from exc
    model = model.to(device).eval()
    if shard is not None:
        shard(model)
    return model


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str,
                   ignore_missing: tuple[str, ...] = (), ignore_unexpected: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give a model (built on the meta device) the tensors of state, without a second copy of the
    weights; a CheckpointError names the file when the names do not fit the architecture (names that
    contain one of the ignore_* parts are not counted)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not any(part in k for part in ignore_missing)]
    unexpected = [k for k in unexpected if not any(part in k for part in ignore_unexpected)]
    if missing or unexpected:
        raise CheckpointError(f"{Path(path).name} does not fit {what}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


def build_on_meta(make: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], path: str | Path, what: str,
                  **ignore) -> torch.nn.Module:
    """make() on the meta device, then assign_weights(model, state, path, what, **ignore)."""
    with torch.device("meta"):
        model = make()
    return assign_weights(model, state, path, what, **ignore)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (the tiny model sets)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)

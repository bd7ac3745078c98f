"""The model socket: what a USP loader node hands its sampler (USP_WAN_MODEL, USP_HUNYUAN_MODEL, USP_WAN22_MODEL).

Loading a DiT on the group (`load_model`) gives the socket and the loader's info text; the LoRA nodes
(lora_nodes.with_lora), the expert outputs (`expert_socket`) and the native-MODEL adapter (native_nodes.replay)
make copies of it with more keys set; the sampler (sampler_run.run_sampler) reads it. A socket is never changed
in place: ComfyUI caches node outputs, and a cached socket may feed several nodes.
"""

from __future__ import annotations

import logging
from typing import TypedDict

from ..distributed import api
from ..distributed.registry import get_group
from ..distributed.config import GroupConfig
from ..distributed.formats.gguf import by_layer_kind, summary
from . import services

log = logging.getLogger("usp_video")


class _Required(TypedDict):
    group: GroupConfig  # the USP Group node's configuration; the api finds (or starts) its group by it
    path: str           # the DiT file this socket samples with (the first expert of a model made of several)
    experts: list[str]  # the DiT files the sampler runs, in the family's expert order ([path] for one)
    info: dict          # api.load_dit's answer: family, model, latent_format, heads, degrees, memory...


class ModelSocket(_Required, total=False):
    """The value of a USP model socket. Required: group, path, experts, info. Optional:
    keep: other DiT files of the same model to keep loaded beside these experts (an expert socket's sibling);
    loras: {DiT file: [[LoRA file, strength], ...]}, each expert's chain (the USP LoRA nodes);
    native_shift: a native MODEL's shift (native_nodes.py), which the sampler's shift must equal."""

    keep: list[str]
    loras: dict[str, list[list]]
    native_shift: float


def quantization_text(layers: dict[str, str]) -> str:
    """The loader's lines on a GGUF model: which layers stay quantized, in which ggml type."""
    kinds = "; ".join(f"{kind} {types}" for kind, types in by_layer_kind(layers).items())
    return (f"GGUF: {len(layers)} layers stay quantized ({summary(layers)}), dequantized as each runs: {kinds}. "
            "Other tensors were dequantized at load.")


def _kernels(info: dict) -> str:
    """Which attention kernel runs (as resolved on the ranks: "auto" becomes a name) and what is compiled."""
    parts = [f"attention {info['attention']}"] if "attention" in info else []
    if info.get("compiled_blocks"):
        parts.append(f"{info['compiled_blocks']} blocks compiled ({info['compile']})")
    return ", ".join(parts)


def _weights_text(info: dict, experts: int) -> str:
    """'1.23 GiB per expert (sharded across the ranks, ...), free memory ...' for the info text."""
    return (f"; weights per rank {info['parameter_bytes'] / 2**30:.2f} GiB"
            f"{' per expert' if experts > 1 else ''} "
            f"({'sharded across the ranks' if info['sharded'] else 'a full copy on every rank'}"
            f"{', in host memory (dit_offload)' if info.get('dit_offload') else ''}), "
            f"free memory {info['free_bytes'] / 2**30:.1f} GiB")


def info_text(names: list[str], info: dict) -> tuple[str, list[str]]:
    """The loader's info text for a DiT loaded as api.load_dit says (names: its files), and its warnings."""
    text = (f"{' + '.join(names)}: {info['layers']} layers, {info['heads']} heads; "
            f"ulysses={info['ulysses']} x ring={info['ring']}")
    if info.get("cfg_parallel", 1) == 2:
        text += " x cfg-parallel 2 (used when cfg != 1)"
    if "parameter_bytes" in info:
        text += _weights_text(info, len(names))
    if info.get("fp8_layers"):
        text += f"; {info['fp8_layers']} layers keep their fp8 weights"
        if info.get("fp8_compute_layers"):
            text += f", {info['fp8_compute_layers']} multiply in fp8 (fp8_compute)"
    kernels = _kernels(info)
    if kernels:
        text += f"; {kernels}"
    if info.get("quantized_layers"):
        text += "\n" + quantization_text(info["quantized_layers"])
    warnings = list(info.get("warnings", []))
    if info.get("fp8_compute") and not info.get("fp8_compute_layers"):
        warnings.append("fp8_compute is on, but this model has no fp8 layers (a bf16/fp16 or GGUF file): nothing "
                        "multiplies in fp8; pick an fp8 file to use it")
    return text, warnings


def _publish_loaded(names: list[str], info: dict) -> None:
    """Show the loaded model, its degrees and its weights on the USP Group node."""
    degrees = f"ulysses {info['ulysses']} x ring {info['ring']}"
    if info.get("cfg_parallel", 1) == 2:
        degrees += " x cfg-parallel 2"
    kernels = _kernels(info)
    if kernels:
        degrees += f", {kernels}"
    weights = None
    if "parameter_bytes" in info:
        weights = (f"{info['parameter_bytes'] / 2**30:.2f} GiB{' per expert' if len(names) > 1 else ''}, "
                   f"{'sharded' if info['sharded'] else 'a full copy on every rank'}"
                   f"{', in host memory (dit_offload)' if info.get('dit_offload') else ''}")
        if len(names) > 1 and info.get("placement", "keep") != "keep" and not info.get("dit_offload"):
            weights += "; the idle expert waits in host memory"
    services.publish_status(model=" + ".join(names), degrees=degrees, weights=weights,
                            free=info.get("free_bytes_per_rank"))


def load_model(group: GroupConfig, model_name: str | list[str], family: str | None,
               keep: list[str] | None = None) -> tuple[ModelSocket, str]:
    """A DiT from models/diffusion_models on every rank, or the experts of one model (a list, in the
    family's expert order): (the model socket's value, the info text). The socket holds "path" (the
    first) and "experts" (all). family None: the files'. keep: other DiT files to leave loaded (kept by
    the socket too)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    paths = [services.model_path("diffusion_models", name) for name in names]
    info = api.load_dit(group, paths if len(paths) > 1 else paths[0], family=family, keep=keep)
    show_group(group)
    text, warnings = info_text(names, info)
    for warning in warnings:
        log.warning("usp-video: %s", warning)
        text += f"\nwarning: {warning}"
    log.info("usp-video: %s", text)
    _publish_loaded(names, info)
    socket: ModelSocket = {"group": group, "path": paths[0], "experts": paths, "info": info}
    if keep:
        socket["keep"] = [p for p in keep if p not in paths]
    return socket, text


def show_group(config: GroupConfig) -> None:
    """Show the group that a node has just used on the USP Group node (ComfyUI caches that node's output,
    so a group freed or crashed since was started again by the node that needed it). Called once the
    group answered: inputs refused before any group is asked start nothing."""
    services.note_group(get_group(config), config)


def expert_socket(model: ModelSocket, index: int) -> ModelSocket:
    """One expert of a loaded model as a model socket of its own, for a sampler that runs only some
    steps (the two-sampler layout); the other experts stay loaded beside it."""
    path = model["experts"][index]
    return {**model, "path": path, "experts": [path], "keep": [p for p in model["experts"] if p != path]}

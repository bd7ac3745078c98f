"""A native MODEL on the USP group: a native UNETLoader -> LoRA -> ModelSamplingSD3 chain given to a USP sampler
(or a deprecated adapter node) is replayed on the ranks.

ComfyUI 0.3.64 keeps no file path on a ModelPatcher, so the node reads the chain from the graph upstream of
its own `model` input (the hidden DYNPROMPT / PROMPT inputs), cross-checks what it read against the MODEL it
received (its LoRA patches per weight, with their strengths; its model_sampling shift; no other patch), and has
the ranks load the same files (load_model, with_lora): no weight crosses the channel. Any other node in the
chain is refused by class name and title. The native MODEL itself is never run here.

The chain's plain logic is in native_chain.py. This module holds what touches ComfyUI's MODEL and the group
(`read_native`, `replay`, and `native_socket` for the samplers). ComfyUI's model config class says which family
a MODEL is, through ModelFamily.comfy_model_configs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..distributed.formats.checkpoint import CheckpointError
from ..distributed.formats.tensor_file import read_safetensors_header
from ..distributed.models import FAMILIES, check_dit_file
from . import services
from .loaders import with_lora
from .model_socket import ModelSocket, load_model
from .native_chain import NativeChain, check_options, check_patches, check_weight_dtype, lora_targets, prompt_lookup, \
    read_chain

log = logging.getLogger("usp_video")

MEMORY_NOTE = ("UNETLoader still holds the whole model in ComfyUI's own memory: it read the file into host RAM "
               "when it ran (ComfyUI moves a MODEL to a GPU only when a native sampler uses it, which the USP "
               "sampler never does); the ranks load their own copy. To save that RAM, use the USP loader and USP "
               "LoRA nodes instead.")
TIP_SHIFT_RULE = ("The MODEL's shift (its ModelSamplingSD3, else ComfyUI's default for the model) travels with the "
                  "socket: a USP sampler whose shift widget differs refuses to run.")


def _native_family(patcher, families: tuple[str, ...], input_name: str, file_name: str = "the MODEL") -> str:
    """Our family of a native MODEL, from ComfyUI's model config class; refused unless one of `families`."""
    kind = type(patcher.model.model_config).__name__
    family = next((f.name for f in FAMILIES.values() if kind in f.comfy_model_configs), None)
    if family not in families:
        taken = [config for f in FAMILIES.values() if f.name in families for config in f.comfy_model_configs]
        raise ValueError(f"{input_name}: ComfyUI loaded {file_name} as {kind}; this node takes "
                         f"{' / '.join(taken)} models")
    return family


def read_native(patcher, chain: NativeChain, families: tuple[str, ...], input_name: str) -> tuple[str, float]:
    """Cross-check a native MODEL (a ComfyUI ModelPatcher) against its chain: its family, LoRA patches, shift and
    other patches. Returns (our family name, its shift). Only runs inside ComfyUI."""
    import comfy.lora

    family = _native_family(patcher, families, input_name, chain.unet_name)
    model_keys = set(patcher.model.state_dict().keys())
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    targets = []
    for name, _ in chain.loras:
        header, _, _ = read_safetensors_header(services.model_path("loras", name))
        targets.append(lora_targets(sorted(header), key_map, model_keys))
    check_patches(chain, targets, patcher.patches)
    check_options(patcher.object_patches, patcher.model_options)
    shift = float(patcher.get_model_object("model_sampling").shift)
    if chain.shift is not None and not math.isclose(shift, chain.shift, rel_tol=1e-6):
        raise ValueError(f"{input_name}: the graph's ModelSamplingSD3 says shift {chain.shift:g}, the MODEL's is "
                         f"{shift:g}")
    return family, shift


def replay(group, inputs: list[tuple[str, object]], families: tuple[str, ...], prompt, dynprompt, node_id,
           family: str | None = None, keep: list[str] | None = None) -> tuple[dict, str]:
    """Read, check and replay native MODELs ([(input name, patcher)], one per expert) on the group: the model
    socket (with the LoRA chains and "native_shift") and the info text."""
    get_node = prompt_lookup(prompt, dynprompt)
    chains, found, shifts = [], [], []
    for input_name, patcher in inputs:
        chain = read_chain(get_node, node_id, input_name)
        check_weight_dtype(chain, services.model_path("diffusion_models", chain.unet_name))
        model_family, shift = read_native(patcher, chain, families, input_name)
        chains.append(chain)
        found.append(model_family)
        shifts.append(shift)
    if len(set(shifts)) > 1:
        raise ValueError("the MODELs' shifts differ (" + ", ".join(f"{n} {s:g}" for (n, _), s in zip(inputs, shifts))
                         + "); the USP sampler takes one shift: give both ModelSamplingSD3 nodes the same value")
    names = [chain.unet_name for chain in chains]
    socket, text = load_model(group, names if len(names) > 1 else names[0], family or found[0], keep)
    for path, chain in zip(socket["experts"], chains):
        for name, strength in chain.loras:
            socket = with_lora(socket, [path], services.model_path("loras", name), strength)
    socket["native_shift"] = shifts[0]
    lines = [text]
    for (input_name, _), chain in zip(inputs, chains):
        loras = ", ".join(f"{Path(n).name} x{s:g}" for n, s in chain.loras) or "no LoRA"
        lines.append(f"{input_name}: {' -> '.join(chain.nodes)}: {chain.unet_name}, {loras}; shift {shifts[0]:g}")
    lines.append(MEMORY_NOTE)
    info = "\n".join(lines)
    log.info("usp-video: native MODEL replayed on the group: %s", info)
    return socket, info


TIP_MODEL = ("A native MODEL: UNETLoader, then any LoraLoaderModelOnly / LoraLoader (model side) and ModelSamplingSD3 "
             "nodes. Nothing else may sit in between.")
# the families whose native MODELs a sampler takes (ComfyUI loads a two-expert model's experts one by one, each
# as the family its tensors are: a Wan 2.2 A14B expert is a Wan 2.1 MODEL)
NATIVE_FAMILIES = tuple(f.name for f in FAMILIES.values() if f.comfy_model_configs)
# the USP sampler nodes that may take a native MODEL (their other native experts stay loaded: _kept_files)
NATIVE_SAMPLERS = ("UspSampler", "UspSamplerAdvanced")


def _kept_files(get_node, prompt, node_id, family: str) -> list[str]:
    """The DiT files that the prompt's other USP samplers replay from native MODELs of the same family (the other
    expert of Wan 2.2's two-sampler layout): kept loaded beside this sampler's, so that neither is read again
    when the other runs."""
    if not isinstance(prompt, dict):
        return []
    kept = []
    for other_id, node in prompt.items():
        if str(other_id) == str(node_id) or node.get("class_type") not in NATIVE_SAMPLERS:
            continue
        try:
            chain = read_chain(get_node, other_id, "model")
            path = services.model_path("diffusion_models", chain.unet_name)
            check_dit_file(path, family)
        except (ValueError, OSError, CheckpointError):
            continue  # a USP model there, or another family's file: nothing to keep
        kept.append(path)
    return kept


def native_socket(group, patcher, prompt, dynprompt, node_id) -> ModelSocket:
    """A native MODEL given to a USP sampler, replayed on the group (its chain read from the sampler's `model`
    input), with the other native experts of the prompt kept loaded beside it."""
    family = _native_family(patcher, NATIVE_FAMILIES, "model")
    kept = _kept_files(prompt_lookup(prompt, dynprompt), prompt, node_id, family)
    socket, info = replay(group, [("model", patcher)], NATIVE_FAMILIES, prompt, dynprompt, node_id, keep=kept)
    if socket.get("keep"):
        log.info("usp-video: the prompt's other USP samplers replay %s: kept loaded beside %s",
                 ", ".join(Path(p).name for p in socket["keep"]), Path(socket["path"]).name)
    return socket

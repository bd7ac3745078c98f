"""USP Model from native MODEL: a native UNETLoader -> LoRA -> ModelSamplingSD3 chain, replayed on the USP group.

ComfyUI 0.3.64 keeps no file path on a ModelPatcher, so the adapter reads the chain from the graph upstream of
its own `model` input (the hidden DYNPROMPT / PROMPT inputs), cross-checks what it read against the MODEL it
received (its LoRA patches per weight, with their strengths; its model_sampling shift; no other patch), and has
the ranks load the same files (load_model, with_lora): no weight crosses the channel. Any other node in the
chain is refused by class name and title. The native MODEL itself is never run here."""

from __future__ import annotations

import json
import logging
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import services
from .common import TIP_GROUP, expert_socket, load_model
from .group_node import CATEGORY
from .lora_nodes import with_lora

log = logging.getLogger("usp_video")

LOADER, LORA_ONLY, LORA, SHIFT = "UNETLoader", "LoraLoaderModelOnly", "LoraLoader", "ModelSamplingSD3"
ACCEPTED = (LOADER, LORA_ONLY, LORA, SHIFT)
# ComfyUI's model config class -> our family (Wan 2.2 A14B's experts are WAN21_T2V models: the A14B node says so)
FAMILY_OF_CLASS = {"WAN21_T2V": "wan2.1", "WAN22_T2V": "wan2.2-ti2v-5b", "HunyuanVideo": "hunyuan-video"}
MEMORY_NOTE = ("UNETLoader still holds the whole model in ComfyUI's own memory: it read the file into host RAM "
               "when it ran (ComfyUI moves a MODEL to a GPU only when a native sampler uses it, which the USP "
               "sampler never does); the ranks load their own copy. To save that RAM, use the USP loader and USP "
               "LoRA nodes instead.")
TIP_SHIFT_RULE = ("The MODEL's shift (its ModelSamplingSD3, else ComfyUI's default for the model) travels with the "
                  "socket: a USP sampler whose shift widget differs refuses to run.")


@dataclass
class NativeChain:
    """What the graph says the MODEL is: the UNETLoader's file and weight_dtype, the LoRAs from the loader outwards
    (nonzero strength_model only: zero adds nothing), the shift of the ModelSamplingSD3 nearest the adapter."""
    unet_name: str
    weight_dtype: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    shift: float | None = None
    nodes: list[str] = field(default_factory=list)  # "node 4 (LoraLoaderModelOnly)", from the loader outwards


def _is_link(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)


def _name(node_id, node: dict) -> str:
    title = (node.get("_meta") or {}).get("title")
    shown = node["class_type"] + (f' "{title}"' if title and title != node["class_type"] else "")
    return f"node {node_id} ({shown})"


def _widget(node_id, node: dict, name: str):
    if name not in node.get("inputs", {}):
        raise ValueError(f"{_name(node_id, node)} has no {name} input")
    value = node["inputs"][name]
    if _is_link(value):
        raise ValueError(f"{_name(node_id, node)}: its {name} comes from node {value[0]}; the USP adapter reads "
                         f"widget values from the graph, so type {name} into the widget")
    return value


def read_chain(get_node: Callable[[str], dict], node_id, input_name: str = "model") -> NativeChain:
    """Walk the graph upstream of input `input_name` of node `node_id` to its UNETLoader. get_node(id) -> the
    API-format node ({"class_type", "inputs", "_meta"}): DynamicPrompt.get_node, or a PROMPT dict's lookup."""
    me = get_node(str(node_id))
    link = me.get("inputs", {}).get(input_name)
    loras, shift, nodes = [], None, []
    for _ in range(10000):  # a graph has no cycles; this only bounds a malformed one
        if not _is_link(link):
            raise ValueError(f"{input_name}: expected a link from a native MODEL node, found {link!r}")
        source_id, slot = str(link[0]), link[1]
        node = get_node(source_id)
        kind = node["class_type"]
        nodes.append(_name(source_id, node))
        if kind == LOADER:
            chain = NativeChain(str(_widget(source_id, node, "unet_name")),
                                str(_widget(source_id, node, "weight_dtype")), loras[::-1], shift, nodes[::-1])
            return chain
        if kind in (LORA_ONLY, LORA):
            if slot != 0:  # LoraLoader's output 1 is its CLIP
                raise ValueError(f"{input_name}: {_name(source_id, node)} output {slot} is not a MODEL")
            strength = _widget(source_id, node, "strength_model")
            if not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise ValueError(f"{_name(source_id, node)}: strength_model must be a finite number, got {strength!r}")
            if strength != 0:  # ComfyUI adds nothing (LoraLoaderModelOnly) or zero-strength patches (LoraLoader)
                loras.append((str(_widget(source_id, node, "lora_name")), float(strength)))
        elif kind == SHIFT:
            if shift is None:  # the one nearest the adapter is the MODEL's (each replaces model_sampling)
                shift = float(_widget(source_id, node, "shift"))
        else:
            raise ValueError(
                f"{input_name}: {_name(source_id, node)} is in the native MODEL chain; the USP group can replay only "
                f"{', '.join(ACCEPTED)} (the model side of LoraLoader). Remove it, or build the model with the USP "
                "loader and USP LoRA nodes")
        link = node.get("inputs", {}).get("model")
    raise ValueError(f"{input_name}: the MODEL chain does not end at a UNETLoader")


def prompt_lookup(prompt: dict | None, dynprompt=None) -> Callable[[str], dict]:
    """get_node over DYNPROMPT (it knows the nodes that expanded groups add) or else the PROMPT dict."""
    if dynprompt is not None and hasattr(dynprompt, "get_node"):
        return dynprompt.get_node
    if not isinstance(prompt, dict):
        raise ValueError("no graph to read: this node needs ComfyUI's hidden PROMPT/DYNPROMPT inputs")

    def get(node_id: str) -> dict:
        if node_id not in prompt:
            raise ValueError(f"node {node_id} is not in the prompt")
        return prompt[node_id]
    return get


def lora_targets(file_keys, key_map: dict, model_keys) -> Counter:
    """The model weights ComfyUI's load_lora patches from a LoRA with these keys, each with the number of patches
    it gets (a fused weight gets one per part). key_map: comfy.lora.model_lora_keys_unet's {LoRA stem: model key or
    (key, offset)}."""
    parts: dict[str, set[str]] = {}
    for key in file_keys:
        pieces = key.split(".")
        for cut in range(len(pieces) - 1, 0, -1):
            stem = ".".join(pieces[:cut])
            if stem in key_map:
                parts.setdefault(stem, set()).add(".".join(pieces[cut:]))
                break
    targets = Counter()
    for stem, found in parts.items():
        target = key_map[stem]
        weight = target if isinstance(target, str) else target[0]
        if found - {"alpha", "dora_scale", "diff_b", "b_norm"}:
            targets[weight] += 1
        bias = weight[: -len(".weight")] + ".bias"
        if found & {"diff_b", "b_norm"} and bias in model_keys:
            targets[bias] += 1
    return targets


def check_patches(chain: NativeChain, targets: list[Counter], patches: dict[str, list]) -> None:
    """The MODEL's LoRA patches must be exactly the chain's: per weight, the strengths in chain order (zero-strength
    patches ignored). targets: per LoRA of chain.loras, lora_targets of its file."""
    names = [Path(name).name for name, _ in chain.loras]
    for name, found in zip(names, targets):
        if not found:
            raise ValueError(f"LoRA {name} matches no weight of this model in ComfyUI's key names: wrong model?")
    expected: dict[str, list[float]] = {}
    for (_, strength), found in zip(chain.loras, targets):
        for key, count in found.items():
            expected.setdefault(key, []).extend([strength] * count)
    held = {}
    for key, entries in patches.items():
        odd = [e for e in entries if len(e) < 5 or e[2] != 1.0 or e[3] is not None or e[4] is not None]
        if odd:
            raise ValueError(f"the MODEL's weight {key} carries a patch the USP group cannot replay (a model strength, "
                             "an offset or a function, as hook or merge nodes add); build the model with the USP nodes")
        strengths = [float(e[0]) for e in entries if e[0] != 0]
        if strengths:
            held[key] = strengths
    differ = sorted(key for key in set(expected) | set(held)
                    if len(expected.get(key, [])) != len(held.get(key, []))
                    or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                               for a, b in zip(expected.get(key, []), held.get(key, []))))
    if differ:
        key = differ[0]
        chain_text = ", ".join(f"{n} x{s:g}" for n, (_, s) in zip(names, chain.loras)) or "no LoRA"
        raise ValueError(
            f"the MODEL's LoRA patches do not match the chain read from the graph ({chain_text}): {len(differ)} of "
            f"{len(set(expected) | set(held))} patched weights differ, e.g. {key}: the graph gives strengths "
            f"{expected.get(key, [])}, the MODEL holds {held.get(key, [])}. Something outside the graph (or a node "
            "that reads differently) patched it; build the model with the USP loader and USP LoRA nodes")


def check_options(object_patches: dict, model_options: dict) -> None:
    """Refuse what other nodes add to a MODEL (object patches other than model_sampling, wrappers, CFG functions,
    attention or block replacements): the ranks would not apply them."""
    extra = sorted(set(object_patches) - {"model_sampling"})
    extra += sorted(f"model_options[{k!r}]" for k, v in model_options.items() if k != "transformer_options" and v)
    extra += sorted(f"transformer_options[{k!r}]" for k, v in model_options.get("transformer_options", {}).items() if v)
    if extra:
        raise ValueError(f"the MODEL carries {', '.join(extra)}, set by a node the USP group cannot replay; "
                         f"connect only {', '.join(ACCEPTED)} between UNETLoader and this node")


def safetensors_dtypes(path: str) -> Counter:
    """The dtypes of a safetensors file's 2-D weights, from its header only."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return Counter(v["dtype"] for k, v in header.items()
                   if k != "__metadata__" and k.endswith(".weight") and len(v["shape"]) == 2)


def check_weight_dtype(chain: NativeChain, path: str) -> None:
    """UNETLoader's weight_dtype: "default" keeps the file's weights (the group computes in its own dtype); an
    fp8_e4m3fn file stays fp8 on the ranks too, so "fp8_e4m3fn" is honoured for such a file only."""
    if chain.weight_dtype == "default":
        return
    if chain.weight_dtype == "fp8_e4m3fn":
        if path.endswith(".safetensors") and safetensors_dtypes(path).most_common(1)[0][0] == "F8_E4M3":
            return
        raise ValueError(f"UNETLoader weight_dtype fp8_e4m3fn casts {chain.unet_name} to fp8 in ComfyUI; the USP "
                         "group keeps a file's weights as stored (an fp8 file stays fp8) and computes in its own "
                         "dtype: set weight_dtype to default, or load an fp8_e4m3fn file")
    raise ValueError(f"UNETLoader weight_dtype {chain.weight_dtype} cannot be honoured on the USP group: set it to "
                     "default (or fp8_e4m3fn with an fp8 file); fp8 matmuls are the USP Group's fp8_compute option")


def read_native(patcher, chain: NativeChain, families: tuple[str, ...], input_name: str) -> tuple[str, float]:
    """Cross-check a native MODEL (a ComfyUI ModelPatcher) against its chain: its family, LoRA patches, shift and
    other patches. Returns (our family name, its shift). Only runs inside ComfyUI."""
    import comfy.lora
    from safetensors import safe_open

    kind = type(patcher.model.model_config).__name__
    family = FAMILY_OF_CLASS.get(kind)
    if family not in families:
        raise ValueError(f"{input_name}: ComfyUI loaded {chain.unet_name} as {kind}; this node takes "
                         f"{' / '.join(k for k, f in FAMILY_OF_CLASS.items() if f in families)} models")
    model_keys = set(patcher.model.state_dict().keys())
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    targets = []
    for name, _ in chain.loras:
        with safe_open(services.model_path("loras", name), framework="pt") as f:
            targets.append(lora_targets(list(f.keys()), key_map, model_keys))
    check_patches(chain, targets, patcher.patches)
    check_options(patcher.object_patches, patcher.model_options)
    shift = float(patcher.get_model_object("model_sampling").shift)
    if chain.shift is not None and not math.isclose(shift, chain.shift, rel_tol=1e-6):
        raise ValueError(f"{input_name}: the graph's ModelSamplingSD3 says shift {chain.shift:g}, the MODEL's is "
                         f"{shift:g}")
    return family, shift


def replay(group, inputs: list[tuple[str, object]], families: tuple[str, ...], prompt, dynprompt, node_id,
           family: str | None = None) -> tuple[dict, str]:
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
    socket, text = load_model(group, names if len(names) > 1 else names[0], family or found[0])
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


_HIDDEN = {"prompt": "PROMPT", "dynprompt": "DYNPROMPT", "node_id": "UNIQUE_ID"}
TIP_MODEL = ("A native MODEL: UNETLoader, then any LoraLoaderModelOnly / LoraLoader (model side) and ModelSamplingSD3 "
             "nodes. Nothing else may sit in between.")


class UspNativeWanModel:
    DESCRIPTION = ("Runs a native MODEL chain (UNETLoader -> LoraLoaderModelOnly / LoraLoader -> ModelSamplingSD3) on "
                   "the USP group: the chain is read from the graph, checked against the MODEL, and the ranks load "
                   "the same files (a new LoRA strength re-reads only the LoRA). " + MEMORY_NOTE + " " + TIP_SHIFT_RULE)
    FAMILIES = ("wan2.1", "wan2.2-ti2v-5b")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
                             "model": ("MODEL", {"tooltip": TIP_MODEL})}, "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ("USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("For the USP Wan samplers. " + TIP_SHIFT_RULE, "What was read from the graph and loaded.")
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    def convert(self, group, model, prompt=None, dynprompt=None, node_id=None):
        return replay(group, [("model", model)], self.FAMILIES, prompt, dynprompt, node_id)


class UspNativeHunyuanModel(UspNativeWanModel):
    FAMILIES = ("hunyuan-video",)
    RETURN_TYPES = ("USP_HUNYUAN_MODEL", "STRING")
    OUTPUT_TOOLTIPS = ("For USP Sampler (HunyuanVideo). " + TIP_SHIFT_RULE, "What was read from the graph and loaded.")


class UspNativeWan22Model:
    DESCRIPTION = ("Runs Wan 2.2 A14B's two native MODEL chains (a UNETLoader per expert, each with its own LoRAs and "
                   "ModelSamplingSD3) on the USP group, both experts loaded as by USP Load Wan 2.2 A14B Models. "
                   + MEMORY_NOTE + " " + TIP_SHIFT_RULE)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
                             "high_noise_model": ("MODEL", {"tooltip": "The high-noise expert's chain. " + TIP_MODEL}),
                             "low_noise_model": ("MODEL", {"tooltip": "The low-noise expert's chain. " + TIP_MODEL})},
                "hidden": dict(_HIDDEN)}

    RETURN_TYPES = ("USP_WAN22_MODEL", "USP_WAN_MODEL", "USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "high_noise", "low_noise", "info")
    OUTPUT_TOOLTIPS = ("Both experts, for USP Sampler (Wan 2.2 A14B). " + TIP_SHIFT_RULE,
                       "The high-noise expert alone, for a USP Sampler Advanced running the first steps.",
                       "The low-noise expert alone, for a USP Sampler Advanced running the last steps.",
                       "What was read from the graph and loaded.")
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    def convert(self, group, high_noise_model, low_noise_model, prompt=None, dynprompt=None, node_id=None):
        model, info = replay(group, [("high_noise_model", high_noise_model), ("low_noise_model", low_noise_model)],
                             ("wan2.1",), prompt, dynprompt, node_id, family="wan2.2-a14b")
        return model, expert_socket(model, 0), expert_socket(model, 1), info


NODES = {
    "UspNativeWanModel": (UspNativeWanModel, "USP Model from native MODEL (Wan 2.1 / 2.2 5B)"),
    "UspNativeWan22Model": (UspNativeWan22Model, "USP Models from native MODELs (Wan 2.2 A14B)"),
    "UspNativeHunyuanModel": (UspNativeHunyuanModel, "USP Model from native MODEL (HunyuanVideo)"),
}

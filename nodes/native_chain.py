"""A native MODEL chain read from the graph and checked, as plain functions (no ComfyUI import, no group): the
walk from an adapter node's input up to its UNETLoader (`read_chain`), the LoRA patches ComfyUI made
(`lora_targets`, `check_patches`), the other patches it may carry (`check_options`) and UNETLoader's
weight_dtype (`check_weight_dtype`). The adapter nodes (native_nodes.py) call them on what ComfyUI hands them."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..distributed.formats.tensor_file import read_safetensors_header

LOADER, LORA_ONLY, LORA, SHIFT = "UNETLoader", "LoraLoaderModelOnly", "LoraLoader", "ModelSamplingSD3"
ACCEPTED = (LOADER, LORA_ONLY, LORA, SHIFT)


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
    header, _, _ = read_safetensors_header(path)
    return Counter(v["dtype"] for k, v in header.items() if k.endswith(".weight") and len(v["shape"]) == 2)


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

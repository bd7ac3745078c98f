"""USP LoRA nodes: a LoRA (file, strength) on a loaded USP model, chainable. Nothing is read here: the model
socket carries the list, and the sampler has every rank apply it (distributed/formats/lora.py: unmerged, so a
new strength or list never reads the base model again). One node per model socket type; Wan 2.2 A14B's
takes a chain per expert."""

from __future__ import annotations

import math

from . import services
from .group_node import CATEGORY

TIP_LORA = ("A LoRA from models/loras (.safetensors): lora_up/lora_down or lora_A/lora_B (with alpha), and the "
            "diff/diff_b keys of distillation LoRAs, in ComfyUI's key names for this model.")
TIP_STRENGTH = "How much of the LoRA to add (ComfyUI's strength_model): 1.0 as trained, 0 for none, negative to subtract."


def with_lora(model: dict, paths: list[str], lora_path: str, strength: float) -> dict:
    """A copy of a model socket whose experts in `paths` get one more LoRA at the end of their chain."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    chains = {path: list(chain) for path, chain in model.get("loras", {}).items()}
    for path in paths:
        chains[path] = chains.get(path, []) + [[lora_path, float(strength)]]
    return {**model, "loras": chains}


def _inputs(socket: str, source: str, extra: dict | None = None) -> dict:
    return {"required": {
        "model": (socket, {"tooltip": source}),
        "lora_name": (services.list_models("loras"), {"tooltip": TIP_LORA}),
        "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": TIP_STRENGTH}),
        **(extra or {}),
    }}


class UspLora:
    DESCRIPTION = ("Adds a LoRA to a USP Wan model (Wan 2.1, Wan 2.2 TI2V-5B, or one Wan 2.2 expert); chain several. "
                   "Every rank applies it when the sampler runs; changing the strength does not reload the model.")
    RETURN_TYPES = ("USP_WAN_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("USP_WAN_MODEL", "A USP Wan model socket (a loader's, or another USP LoRA's).")

    def apply(self, model, lora_name, strength):
        return (with_lora(model, [model["path"]], services.model_path("loras", lora_name), strength),)


class UspHunyuanLora(UspLora):
    DESCRIPTION = ("Adds a LoRA to a USP HunyuanVideo model; chain several. LoRAs on the fused q/k/v and linear1 "
                   "layers are split as the model's loader splits those weights.")
    RETURN_TYPES = ("USP_HUNYUAN_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("USP_HUNYUAN_MODEL", "From USP Load HunyuanVideo Model (or another USP LoRA).")


class UspWan22Lora(UspLora):
    DESCRIPTION = ("Adds a LoRA to one or both experts of a USP Wan 2.2 A14B model; chain several (a chain per "
                   "expert: distillation LoRAs come as a high-noise and a low-noise file).")
    RETURN_TYPES = ("USP_WAN22_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("USP_WAN22_MODEL", "From USP Load Wan 2.2 Models (or another USP LoRA).", {
            "expert": (["both", "high_noise", "low_noise"],
                       {"tooltip": "Which expert takes this LoRA: the high-noise one (early steps), the low-noise "
                                   "one (late steps), or both."})})

    def apply(self, model, lora_name, strength, expert):
        experts = model["experts"]
        paths = {"both": experts, "high_noise": experts[:1], "low_noise": experts[1:2]}[expert]
        return (with_lora(model, paths, services.model_path("loras", lora_name), strength),)


NODES = {
    "UspLora": (UspLora, "USP LoRA (Wan)"),
    "UspHunyuanLora": (UspHunyuanLora, "USP LoRA (HunyuanVideo)"),
    "UspWan22Lora": (UspWan22Lora, "USP LoRA (Wan 2.2 A14B)"),
}

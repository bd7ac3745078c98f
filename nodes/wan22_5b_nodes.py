"""The Wan 2.2 TI2V-5B nodes (text to video): its loader, an empty latent of its VAE's shape, and a
sampler with its defaults. Text encoding, the VAE nodes and USP Sampler Advanced are the Wan nodes'."""

from __future__ import annotations

import torch

from ..distributed.models import FAMILIES
from . import services
from .model_socket import load_model
from .group_node import CATEGORY
from .wan_nodes import UspWanSampler

FAMILY = FAMILIES["wan2.2-ti2v-5b"]


class UspWan22TI2V5BModelLoader:
    DESCRIPTION = "Loads Wan 2.2 TI2V-5B (text to video) on every rank of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": "From the USP Group node."}),
            "model_name": (services.list_models("diffusion_models"),
                           {"tooltip": "wan2.2_ti2v_5B_fp16.safetensors from models/diffusion_models."}),
        }}

    RETURN_TYPES = ("USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, model_name):
        return load_model(group, model_name, FAMILY.name)


class UspEmptyWan22Latent:
    DESCRIPTION = ("An empty video latent for Wan 2.2 TI2V-5B ([batch, 48, (length - 1) / 4 + 1, height / 16, "
                   "width / 16], the Wan 2.2 VAE's shape), like native Wan22ImageToVideoLatent without a start image "
                   "but with no VAE to load in ComfyUI.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1280, "min": 32, "max": 8192, "step": 32,
                              "tooltip": "Pixels; a multiple of 32 (the 5B model's 16x VAE and 2x2 patches)."}),
            "height": ("INT", {"default": 704, "min": 32, "max": 8192, "step": 32,
                               "tooltip": "Pixels; a multiple of 32."}),
            "length": ("INT", {"default": 121, "min": 1, "max": 8192, "step": 4, "tooltip": "Frames: 4k + 1."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos made at once."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, width, height, length, batch_size=1):
        problems = [f"{name} {value} must be a positive multiple of {FAMILY.pixel_multiple}"
                    for name, value in (("width", width), ("height", height))
                    if value < FAMILY.pixel_multiple or value % FAMILY.pixel_multiple]
        if length < 1 or (length - 1) % 4:
            problems.append(f"length {length} must be 4k + 1 frames (1, 5, ..., 121)")
        if problems:
            raise ValueError("; ".join(problems))
        pixels = FAMILY.spatial_compression
        return ({"samples": torch.zeros(batch_size, FAMILY.latent_channels, (length - 1) // 4 + 1, height // pixels,
                                        width // pixels)},)


class UspWan22TI2V5BSampler(UspWanSampler):
    DESCRIPTION = ("Denoises a Wan 2.2 TI2V-5B video latent on all ranks of the USP group (sequence parallel); "
                   "the same seed gives the same video on 1 or N GPUs.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        required = inputs["required"]
        required["latent_image"] = ("LATENT", {"tooltip": "From USP Empty Wan 2.2 Latent (or native "
                                                          "Wan22ImageToVideoLatent without a start image)."})
        required["steps"] = ("INT", {**required["steps"][1], "default": FAMILY.defaults.steps})
        required["cfg"] = ("FLOAT", {**required["cfg"][1], "default": FAMILY.defaults.cfg})
        required["shift"] = ("FLOAT", {**required["shift"][1], "default": FAMILY.defaults.shift,
                                       "tooltip": "Flow shift (ModelSamplingSD3); 5 in Wan 2.2's TI2V config."})
        return inputs


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspWan22TI2V5BModelLoader": (UspWan22TI2V5BModelLoader, "USP Load Wan 2.2 TI2V-5B Model"),
    "UspEmptyWan22Latent": (UspEmptyWan22Latent, "USP Empty Wan 2.2 Latent (TI2V-5B)"),
    "UspWan22TI2V5BSampler": (UspWan22TI2V5BSampler, "USP Sampler (Wan 2.2 TI2V-5B)"),
}

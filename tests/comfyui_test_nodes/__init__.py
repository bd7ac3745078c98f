"""Test-only ComfyUI nodes, loaded by the tests' ComfyUI servers beside the pack (never shipped: tests/ is not in
the pack's zip, see .comfyignore).

TinyCLIPVisionLoader stands in for ComfyUI's CLIPVisionLoader in the tiny-set runs of the shipped workflows.
ComfyUI's loader picks a fixed full-size config (ViT-H: 632M parameters for clip_vision_h) from the file's layer
count; this one reads the config from the file's own shapes (its head count from the file's metadata) and then
builds ComfyUI's own ClipVisionModel with it, so CLIPVisionEncode and everything after it run ComfyUI's real code
on a tiny CLIP vision file. A key the model does not take, or one it lacks, is an error.
"""

import json
import math
import os
import tempfile

import comfy.clip_vision
import comfy.utils
import folder_paths

PREFIX = "vision_model."


def config_from_file(sd: dict, metadata: dict) -> dict:
    """The CLIP / SigLIP vision config of a transformers-layout state dict; heads, model type, activation and image
    size (SigLIP's 384 is not a multiple of its 14-pixel patches) from the metadata."""
    patch = sd[PREFIX + "embeddings.patch_embedding.weight"]
    positions = sd[PREFIX + "embeddings.position_embedding.weight"].shape[0]
    model_type = metadata.get("model_type", "clip_vision_model")
    grid = math.isqrt(positions - (model_type == "clip_vision_model"))  # CLIP has a class token, SigLIP none
    config = {
        "model_type": model_type, "hidden_act": metadata.get("hidden_act", "gelu"), "layer_norm_eps": 1e-6 if
        model_type == "siglip_vision_model" else 1e-5, "num_channels": 3,
        "hidden_size": patch.shape[0], "patch_size": patch.shape[-1], "image_size": int(metadata.get("image_size", grid * patch.shape[-1])),
        "intermediate_size": sd[PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": sum(1 for k in sd if k.startswith(PREFIX + "encoder.layers.") and k.endswith(".layer_norm1.weight")),
        "num_attention_heads": int(metadata["num_attention_heads"]),
    }
    if "visual_projection.weight" in sd:
        config["projection_dim"] = sd["visual_projection.weight"].shape[0]
    if model_type == "siglip_vision_model":
        config["image_mean"] = config["image_std"] = [0.5, 0.5, 0.5]
    return config


class TinyCLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name):
        sd, metadata = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("clip_vision", clip_name),
                                                   return_metadata=True)
        if "num_attention_heads" not in (metadata or {}):
            raise ValueError(f"{clip_name}: no num_attention_heads in its metadata (not a tiny test file)")
        with tempfile.TemporaryDirectory() as folder:
            config = os.path.join(folder, "config.json")
            with open(config, "w") as f:
                json.dump(config_from_file(sd, metadata), f)
            clip_vision = comfy.clip_vision.ClipVisionModel(config)
        missing, unexpected = clip_vision.load_sd(sd)
        if missing or unexpected:
            raise ValueError(f"{clip_name}: missing keys {missing}, unexpected keys {unexpected}")
        return (clip_vision,)


NODE_CLASS_MAPPINGS = {"UspTestTinyCLIPVisionLoader": TinyCLIPVisionLoader}

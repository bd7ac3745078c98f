"""The names LoRAs made for HunyuanVideo give its layers, beyond ComfyUI's `diffusion_model.` and `lora_unet_`
forms: the family's `lora_aliases` (models/family.py), which the shared LoRA reader (formats/lora.py) asks for."""

from __future__ import annotations

import re


def lora_aliases(stem: str) -> list[str]:
    """diffusion-pipe's names for a HunyuanVideo layer (ComfyUI's lora.py, HunyuanVideo): `transformer.` and
    `diffusion_model.` before the original checkpoint's names (img_attn_qkv, img_mod.linear, img_mlp.fc1...)."""
    renamed = (stem.replace("_mod.lin", "_mod.linear").replace("_attn.qkv", "_attn_qkv")
               .replace("_attn.proj", "_attn_proj").replace(".modulation.lin", ".modulation.linear"))
    renamed = re.sub(r"mlp\.0$", "mlp.fc1", re.sub(r"mlp\.2$", "mlp.fc2", renamed))
    return [f"transformer.{renamed}", f"diffusion_model.{renamed}"]

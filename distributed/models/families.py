"""The model families the group runs, and what differs between them for the sampler.

A family says how to load and parallelize its DiT, how its latent space relates to the VAE's
(ComfyUI's latent_format), how to call the DiT for a velocity, and what its sampler defaults are.
`detect(path)` tells the family of a DiT file or diffusers folder from its tensor names or config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import hunyuan, wan
from .checkpoint import CheckpointError, read_header


@dataclass(frozen=True)
class TextCond:
    """One side (positive or negative) of the conditioning: token embeddings [B, L, D] and, for
    HunyuanVideo, the pooled CLIP-L vector [B, 768]."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    diffusers_class: str
    load: Callable
    parallelize: Callable
    infer_config: Callable
    sampler: str          # the default sampler of the reference pipeline
    shift: float          # the default flow shift
    cfg: float            # the default classifier-free guidance scale
    text_encoder_hint: str

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the space the DiT works in (ComfyUI latent_format.process_in)."""
        if self.name == "wan2.1":
            mean = torch.tensor(wan.LATENTS_MEAN).view(1, -1, 1, 1, 1)
            std = torch.tensor(wan.LATENTS_STD).view(1, -1, 1, 1, 1)
            return (latent - mean) / std
        return latent * hunyuan.LATENT_SCALE

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        if self.name == "wan2.1":
            mean = torch.tensor(wan.LATENTS_MEAN).view(1, -1, 1, 1, 1)
            std = torch.tensor(wan.LATENTS_STD).view(1, -1, 1, 1, 1)
            return latent * std + mean
        return latent / hunyuan.LATENT_SCALE

    def velocity(self, model, x: torch.Tensor, t: torch.Tensor, cond: TextCond, guidance: float) -> torch.Tensor:
        """The DiT's flow velocity for x at timestep t (sigma * 1000)."""
        if self.name == "wan2.1":
            return model(x, t, cond.tokens, return_dict=False)[0]
        pooled = cond.pooled
        if pooled is None:
            raise ValueError("HunyuanVideo needs the pooled CLIP-L output with the conditioning "
                             "(ComfyUI's DualCLIPLoader type hunyuan_video, or our HunyuanVideo text encoder)")
        g = None
        if model.config.guidance_embeds:  # embedded guidance: the distilled CFG scale, times 1000
            g = torch.full((x.shape[0],), guidance * 1000.0, device=x.device, dtype=x.dtype)
        return model(x, t, cond.tokens, None, pooled.to(x.device, x.dtype), g, return_dict=False)[0]

    def text_dim(self, config) -> int:
        return config.text_dim if self.name == "wan2.1" else config.text_embed_dim

    def layers(self, config) -> int:
        return config.num_layers + getattr(config, "num_single_layers", 0)

    def blocks(self, model) -> list:
        """The repeated blocks, the units of weight sharding."""
        if self.name == "wan2.1":
            return list(model.blocks)
        return [*model.context_embedder.token_refiner.refiner_blocks, *model.transformer_blocks,
                *model.single_transformer_blocks]


WAN = Family(name="wan2.1", label="Wan 2.1", diffusers_class="WanTransformer3DModel",
             load=wan.load_wan_transformer, parallelize=wan.parallelize_wan, infer_config=wan.infer_wan_config,
             sampler="unipc", shift=5.0, cfg=5.0, text_encoder_hint="Wan 2.1 uses the umt5-xxl text encoder")
HUNYUAN = Family(name="hunyuan-video", label="HunyuanVideo", diffusers_class="HunyuanVideoTransformer3DModel",
                 load=hunyuan.load_hunyuan_transformer, parallelize=hunyuan.parallelize_hunyuan,
                 infer_config=hunyuan.infer_hunyuan_config, sampler="euler", shift=7.0, cfg=1.0,
                 text_encoder_hint="HunyuanVideo uses the llava-llama-3 text encoder with CLIP-L")
FAMILIES = {f.name: f for f in (WAN, HUNYUAN)}


def detect(path: str | Path) -> Family:
    """The family of a DiT single file or diffusers folder; CheckpointError when it is neither."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers transformer "
                                  "folder (WanTransformer3DModel or HunyuanVideoTransformer3DModel)")
        name = json.loads(config_file.read_text()).get("_class_name")
        for family in FAMILIES.values():
            if name == family.diffusers_class:
                return family
        raise CheckpointError(f"{path}: a diffusers {name}; expected WanTransformer3DModel or "
                              "HunyuanVideoTransformer3DModel")
    shapes, _ = read_header(path)
    keys = {k.removeprefix("model.diffusion_model.").removeprefix("diffusion_model.") for k in shapes}
    if hunyuan.is_hunyuan_keys(keys):
        return HUNYUAN
    if "patch_embedding.weight" in keys:
        return WAN
    raise CheckpointError(f"{path.name} is neither a Wan 2.1 nor a HunyuanVideo diffusion model "
                          f"({wan.guess_family(keys)})")


def detect_vae(path: str | Path) -> Family:
    """Which family's VAE a file or diffusers folder is (the loaders check it in detail)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        name = json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None
        return HUNYUAN if name == "AutoencoderKLHunyuanVideo" else WAN
    from .hunyuan_vae import is_hunyuan_vae_keys

    shapes, _ = read_header(path)
    return HUNYUAN if is_hunyuan_vae_keys({k.removeprefix("vae.") for k in shapes}) else WAN


def check_dit_file(path: str | Path) -> tuple[Family, dict]:
    """Family and config of a DiT file, read from its header only (fast, in the calling process)."""
    family = detect(path)
    path = Path(path)
    if path.is_dir():
        return family, {}
    shapes, metadata = read_header(path)
    return family, family.infer_config(path, shapes, metadata)

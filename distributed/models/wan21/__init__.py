"""Wan 2.1 text-to-video (1.3B, 14B): diffusers' WanTransformer3DModel with USP applied from outside
(dit.py), the UMT5 text encoder (umt5.py), the Wan-VAE and its row-split decode (vae.py), and the tiny
set (tiny.py). FAMILY is what the rest of the pack sees (models/family.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..family import Defaults, ModelFamily, TextPart
from ...parallel.vae_split import VaeSplit
from .. import streamed
from . import dit, umt5, vae

# The negative prompt of Wan's reference pipeline (used when cfg != 1 and none is given).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的")


class Wan21(ModelFamily):
    name, label, short_name = "wan2.1", "Wan 2.1", "wan"
    order = 10
    dit_class, vae_class = "WanTransformer3DModel", "AutoencoderKLWan"
    latent_format = "Wan21"
    defaults = Defaults(sampler="unipc", shift=5.0, cfg=5.0, negative_prompt=NEGATIVE_PROMPT)
    text_parts = (TextPart("text_encoder", "umt5_xxl .safetensors file or diffusers folder",
                           load=lambda path, dtype, device, shard: umt5.load_umt5(path, dtype, device, shard=shard),
                           shard_units=lambda model: model.encoder.block),)
    text_encoder_hint = "Wan 2.1 uses the umt5-xxl text encoder"

    def is_dit(self, keys: set[str]) -> bool:
        return "patch_embedding.weight" in keys

    def is_vae(self, keys: set[str]) -> bool:
        # the Wan 2.2 VAE shares these names; its decoder's up blocks are residual ("upsamples.0.upsamples")
        return "decoder.middle.0.residual.0.gamma" in keys and not any(".upsamples.0.upsamples." in k for k in keys)

    def is_vae_folder(self, config: dict) -> bool:
        return not config.get("is_residual", False)

    def describe(self, shapes: dict) -> str | None:
        shape = (shapes.get("decoder.conv1.weight") or [[]])[0]
        if len(shape) > 1 and shape[1] == 48:
            return "looks like the Wan 2.2 VAE (48 channels)"
        return None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        config = dit.infer_wan_config(path, shapes, metadata)
        dit.check_input_channels(path.name, config, 16, "a Wan 2.1 text-to-video model")
        return config

    def check_dit_folder(self, path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        dit.check_input_channels(path.name, config, 16, "a Wan 2.1 text-to-video model")

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load_wan_transformer(path, dtype, device, shard=shard)

    def dit_load_bytes(self, path, dtype, shares):
        if Path(path).is_dir():
            return super().dit_load_bytes(path, dtype, shares)
        return streamed.load_peak_bytes(path, dtype, shares, keep_within=("blocks.",))

    def dit_source_map(self, path):
        if Path(path).is_dir():
            return super().dit_source_map(path)
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        return streamed.file_source_map(path, convert_wan_transformer_to_diffusers)

    def parallelize(self, model, sp, backend):
        return dit.parallelize_wan(model, sp, backend)

    def blocks(self, model):
        return list(model.blocks)

    def describe_dit(self, model) -> dict:
        config = model.config
        return {"heads": config.num_attention_heads, "layers": config.num_layers,
                "hidden": config.num_attention_heads * config.attention_head_dim, "text_dim": config.text_dim}

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._normalisation()
        return (latent - mean) / std

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._normalisation()
        return latent * std + mean

    latents_mean, latents_std = dit.LATENTS_MEAN, dit.LATENTS_STD  # ComfyUI's latent_format (Wan21)

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent format's per-channel mean and std, shaped [1, C, 1, 1, 1]."""
        return (torch.tensor(self.latents_mean).view(1, -1, 1, 1, 1),
                torch.tensor(self.latents_std).view(1, -1, 1, 1, 1))

    def velocity(self, model, x, t, cond, options):
        return model(x, t, cond["tokens"], return_dict=False)[0]

    def teacache_coefficients(self, model) -> tuple[list[float] | None, str]:
        """TeaCache's published polynomial for this model (TeaCache4Wan2.1, the e0 / "ret_steps" variant,
        which measures the timestep projection the blocks take) and a note on where it comes from."""
        width = model.config.num_attention_heads * model.config.attention_head_dim
        if width >= 5120:
            return dit.TEACACHE_WAN21_14B, "TeaCache's Wan 2.1 T2V 14B coefficients"
        note = "TeaCache's Wan 2.1 T2V 1.3B coefficients"
        return dit.TEACACHE_WAN21_1_3B, note if width == 1536 else note + f" (this model is {width} wide: uncalibrated)"

    def magcache_curve(self, model) -> tuple[list[float] | None, str]:
        """MagCache's published ratios for this model (50 steps, both passes interleaved) and a note."""
        width = model.config.num_attention_heads * model.config.attention_head_dim
        if width >= 5120:
            return dit.MAGCACHE_WAN21_14B, "MagCache's Wan 2.1 T2V 14B ratios"
        note = "MagCache's Wan 2.1 T2V 1.3B ratios"
        return dit.MAGCACHE_WAN21_1_3B, note if width == 1536 else note + f" (this model is {width} wide: uncalibrated)"

    def step_cache_spec(self, model, latent_shape):
        from ...sampling.step_cache import StepCacheSpec, nearest_interp

        coefficients, note = self.teacache_coefficients(model)
        curve, magcache_note = self.magcache_curve(model)

        def magcache_ratios(side: str, steps: int):
            # the conditional pass's ratios at even places, the unconditional one's at odd ones; a batched
            # pass of both takes the conditional one's
            return None if curve is None else nearest_interp(curve[1::2] if side == "negative" else curve[0::2], steps)

        # TeaCache4Wan2.1 (ret_steps): the first 5 steps are always computed, the last one may be skipped;
        # it measures e0, the timestep projection every block takes (args[2], [B, 6, dim]: not per token).
        return StepCacheSpec(block_lists=[model.blocks], block_output=lambda args, hidden: hidden,
                             teacache_input=lambda args: (args[2], None), teacache_coefficients=coefficients,
                             teacache_warmup=5, teacache_last=False, teacache_note=note,
                             enter=getattr(model, "_usp_enter_blocks", lambda args: args),
                             magcache_ratios=magcache_ratios, magcache_k=2, magcache_note=magcache_note)

    def make_text_encoder(self, parts: dict):
        return _Encoder(parts["text_encoder"])

    def load_vae(self, path, dtype, device):
        return vae.load_wan_vae(path, dtype, device)

    def decode(self, loaded_vae, latent: torch.Tensor, split: VaeSplit | None):
        return vae.decode(loaded_vae, latent, split)

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


class _Encoder:
    """UMT5 as a family text encoder: prompt -> {"tokens": [1, max(512, n), 4096]}."""

    def __init__(self, encoder: umt5.Umt5TextEncoder):
        self.encoder = encoder

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return {"tokens": self.encoder.encode(prompt)}


FAMILY = Wan21()

"""Wan 2.1 VACE (1.3B, 14B; Comfy-Org's wan2.1_vace_{1.3B,14B}_fp16): Wan 2.1 text-to-video with VACE blocks
that follow a control video, a mask and reference images. diffusers' WanVACETransformer3DModel run by our forward
and USP hooks (dit.py); everything else (UMT5, the Wan-VAE, the latent format, sampler defaults) is Wan 2.1's.

The conditioning is what ComfyUI's WanVaceToVideo puts on CONDITIONING, unchanged in meaning (one entry per
WanVaceToVideo node; several stack):
    vace_frames    [B, K, 32, T, H, W]  raw latents: inactive 16 | reactive 16 channels (a reference image's latent
                                        prepended in time: its LATENT is that much longer, TrimVideoLatent cuts it)
    vace_mask      [B, K, 64, T, H, W]  the 8x8 pixel mask of each latent position
    vace_strength  [B, K]               each context's strength
(nodes/conditioning.py stacks ComfyUI's lists into these). model_conditioning makes ComfyUI's vace_context of them
(WAN21_Vace.extra_conds: the frames process_in'd per 16 channels, the mask beside them: 96 channels); a VACE model
given none runs as ComfyUI runs it: zero frames, a mask of ones, strength 1.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError
from ..family import Defaults
from ..wan21 import NEGATIVE_PROMPT, Wan21, plan_variant
from ..wan21 import dit as wan
from . import dit

VACE_KEYS = ("vace_frames", "vace_mask", "vace_strength")


class WanVace(Wan21):
    name, label, short_name = "wan2.1-vace", "Wan 2.1 VACE", "wan-vace"
    order = 12  # its files have Wan 2.1's tensors and more: Wan 2.1's is_dit leaves them to this family
    dit_class = "WanVACETransformer3DModel"
    comfy_model_configs = ("WAN21_Vace",)
    cond_keys = ("tokens",) + VACE_KEYS
    defaults = Defaults(sampler="unipc", shift=5.0, cfg=5.0, negative_prompt=NEGATIVE_PROMPT)
    text_encoder_hint = "Wan 2.1 VACE uses the umt5-xxl text encoder"
    start_image_node = ""  # its image to video is WanVaceToVideo's control (start_image_conditioning)
    vae_label = "Wan 2.1"
    # Wan 2.1's shapes with the VACE blocks (15 for the 1.3B, 8 for the 14B) as attention layers of their own, run
    # once per control context (one here); their parameters counted from diffusers' class at the released configs
    plan_variants = {
        "wan-vace-1.3b": replace(plan_variant("Wan 2.1 VACE 1.3B", "wan2.1-t2v-1.3b", 2.15e9), attention_layers=30 + 15),
        "wan-vace-14b": replace(plan_variant("Wan 2.1 VACE 14B", "wan2.1-t2v-14b", 17.3e9), attention_layers=40 + 8)}
    reference_times = {}

    def is_dit(self, keys: set[str]) -> bool:
        return "vace_patch_embedding.weight" in keys

    def describe(self, shapes: dict) -> str | None:
        return "looks like a Wan VACE diffusion model" if "vace_patch_embedding.weight" in shapes else None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        config = dit.infer_vace_config(path, shapes, metadata)
        self._check_vace_config(path.name, config)
        return config

    def check_dit_folder(self, path: Path) -> None:
        self._check_vace_config(path.name, json.loads((path / "config.json").read_text()))

    def _check_vace_config(self, name: str, config: dict) -> None:
        wan.check_input_channels(name, config, 16, "a Wan 2.1 VACE model (16 input channels)")
        channels = config.get("vace_in_channels", 96)
        if channels != dit.FRAME_CHANNELS + dit.MASK_CHANNELS:
            raise CheckpointError(f"{name}: a VACE model with {channels} VACE input channels; Wan 2.1 VACE takes "
                                  f"{dit.FRAME_CHANNELS} latent + {dit.MASK_CHANNELS} mask channels (WanVaceToVideo's)")

    def is_image_to_video(self, model) -> bool:
        return False

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load_vace_transformer(path, dtype, device, shard=shard)

    def dit_load_bytes(self, path, dtype, shares):
        if Path(path).is_dir():
            return super(Wan21, self).dit_load_bytes(path, dtype, shares)
        return streamed.load_peak_bytes(path, dtype, shares, keep_within=dit.KEEP_WITHIN)

    def parallelize(self, model, sp, backend):
        return dit.parallelize_vace(model, sp, backend)

    def blocks(self, model):
        return list(model.blocks) + list(model.vace_blocks)

    def describe_dit(self, model) -> dict:
        return dict(super().describe_dit(model), vace_layers=list(model.config.vace_layers))

    def velocity(self, model, x, t, cond, options):
        return model(x, t, cond["tokens"], control_hidden_states=cond["vace_context"],
                     vace_strength=cond["vace_strength"], return_dict=False)[0]

    def step_cache_spec(self, model, latent_shape):
        raise ValueError(f"step caches are not available for {self.label} models yet (its VACE hints are added "
                         "between the blocks a cache would skip); disconnect the step cache")

    # -- the conditioning ----------------------------------------------------------------------------

    def check_conditioning(self, cond, name):
        for key, dims in (("vace_frames", 6), ("vace_mask", 6), ("vace_strength", 2)):
            value = cond.get(key)
            if value is None:
                continue
            if value.dim() != dims or not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{name}.{key} must be a finite {dims}-D float tensor (WanVaceToVideo's, stacked), "
                                 f"got {tuple(value.shape)} {value.dtype}")
        frames = cond.get("vace_frames")
        if frames is not None and frames.shape[2] != dit.FRAME_CHANNELS:
            raise ValueError(f"{name}.vace_frames has {frames.shape[2]} channels; WanVaceToVideo makes "
                             f"{dit.FRAME_CHANNELS} (inactive and reactive Wan 2.1 latents)")
        mask = cond.get("vace_mask")
        if mask is not None and mask.shape[2] != dit.MASK_CHANNELS:
            raise ValueError(f"{name}.vace_mask has {mask.shape[2]} channels; WanVaceToVideo makes "
                             f"{dit.MASK_CHANNELS} (the 8x8 pixels of each latent position)")

    def model_conditioning(self, model, cond, latent_shape, name):
        """ComfyUI's WAN21_Vace.extra_conds: {"tokens", "vace_context" [B, K, 96, T, H, W], "vace_strength" [B, K]}."""
        batch, _, frames, height, width = latent_shape
        given = cond.get("vace_frames")
        if given is None:  # as ComfyUI: one context of zero frames
            given = torch.zeros(1, 1, dit.FRAME_CHANNELS, frames, height, width)
        count = given.shape[1]
        mask = cond.get("vace_mask")
        if mask is None:
            mask = torch.ones(1, count, dit.MASK_CHANNELS, frames, height, width)
        strength = cond.get("vace_strength")
        if strength is None:
            strength = torch.ones(1, count)
        if mask.shape[1] < count or strength.shape[1] < count:
            raise ValueError(f"{name} carries {count} VACE control video(s) with {mask.shape[1]} mask(s) and "
                             f"{strength.shape[1]} strength(s): each WanVaceToVideo node sets all three")
        mask, strength = mask[:, :count], strength[:, :count]
        for key, value in (("vace_frames", given), ("vace_mask", mask), ("vace_strength", strength)):
            if value.shape[0] not in (1, batch):
                raise ValueError(f"{name}.{key} has batch {value.shape[0]} for a latent batch of {batch}")
        for key, value in (("vace_frames", given), ("vace_mask", mask)):
            if tuple(value.shape[-3:]) != (frames, height, width):
                raise ValueError(
                    f"{name}.{key} is {tuple(value.shape[-3:])} latent frames x rows x columns, the latent "
                    f"{(frames, height, width)}: give the sampler WanVaceToVideo's own latent (a reference image "
                    "adds a frame to both), or make both with the same width, height and length")
        latents = torch.cat([self.process_in(given[:, :, i:i + 16].flatten(0, 1).float()).unflatten(0, given.shape[:2])
                             for i in range(0, dit.FRAME_CHANNELS, 16)], dim=2)
        if latents.shape[0] != mask.shape[0]:
            size = max(latents.shape[0], mask.shape[0])
            latents, mask = latents.expand(size, *latents.shape[1:]), mask.expand(size, *mask.shape[1:])
        context = torch.cat([latents, mask.float()], dim=2)
        return {"tokens": cond["tokens"], "vace_context": context, "vace_strength": strength.float()}

    def check_start_image_model(self, config, name):
        """Any VACE model takes a start image: as WanVaceToVideo's control video, kept where the mask says."""

    def start_image_conditioning(self, encode_video, image, width, height, length):
        """A start image as VACE's image to video, what WanVaceToVideo makes of a control video holding the image's
        frames (resized as WanImageToVideo resizes them) then gray, with a control mask of 0 on those frames (keep)
        and 1 after (generate); no reference image, so nothing to trim. Both halves encoded on the group."""
        from ..video import start_video

        video = start_video(image, width, height, length)
        mask = torch.ones(length, height, width, 1)
        mask[:min(image.shape[0], length)] = 0.0

        def encode(frames):
            latent, vae_family = encode_video(frames)
            if latent.shape[1] != 16:
                raise ValueError(f"vae: {vae_family.label} latents have {latent.shape[1]} channels; Wan VACE uses the "
                                 "Wan 2.1 VAE (16 channels): load wan_2.1_vae.safetensors")
            return latent

        frames, vace_mask = dit.control_conditioning(video, mask, encode, self.spatial_compression)
        return {"vace_frames": frames[:, None], "vace_mask": vace_mask[:, None], "vace_strength": torch.ones(1, 1)}

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


FAMILY = WanVace()

"""Wan 2.2 TI2V-5B, text (or a start image: a LATENT's noise_mask) to video: diffusers' WanTransformer3DModel
at 3072 / 24 heads x 128, 30 layers, ffn 14336, 48 input channels (the Wan 2.2 VAE's latent), run by the Wan 2.1
package's code (dit, umt5).
What is its own: the Wan 2.2 VAE (z 48, 4x time, 16x16 space; vae.py, its key names in vae_keys.py),
the latent format (ComfyUI's Wan22 means and stds), sizes in multiples of 32, the tiny set (tiny.py).
Its files have Wan 2.1's tensor names; the shapes (48 input channels) tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...parallel.vae_split import VaeSplit
from ..family import Defaults
from ..wan21 import NEGATIVE_PROMPT, Wan21, plan_variant
from ..wan21 import dit as wan
from . import vae, vae_keys

# ComfyUI's latent_formats.Wan22 (the Wan 2.2 VAE's per-channel statistics)
LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
               0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
               0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
               0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
               0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
               0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
CHANNELS = 48


class Wan22TI2V5B(Wan21):
    name, label, short_name = "wan2.2-ti2v-5b", "Wan 2.2 TI2V-5B", "wan2.2-5b"
    order = 15  # before Wan 2.1 would not matter: the input channels decide between them
    latent_format = "Wan22"
    comfy_model_configs = ("WAN22_T2V",)
    latent_channels = CHANNELS
    pixel_multiple = 32
    spatial_compression = 16
    latents_mean, latents_std = LATENTS_MEAN, LATENTS_STD
    defaults = Defaults(sampler="unipc", shift=5.0, cfg=5.0, negative_prompt=NEGATIVE_PROMPT, steps=50)
    text_encoder_hint = "Wan 2.2 TI2V-5B uses the umt5-xxl text encoder"
    vae_label = "Wan 2.2"
    start_image_node = ""  # its start image is a LATENT's noise_mask (noise_mask_node), not conditioning
    # 32 pixels per token: the Wan 2.2 VAE's 16x16 and the DiT's 2x2 patches
    plan_variants = {"wan2.2-5b": plan_variant("Wan 2.2 TI2V-5B", "wan2.2-ti2v-5b", 5.0e9)}
    reference_times = {}

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        config = wan.infer_wan_config(path, shapes, metadata)
        self._check_channels(path.name, config)
        return config

    def check_dit_folder(self, path: Path) -> None:
        self._check_channels(path.name, json.loads((path / "config.json").read_text()))

    # Its input channels: the noise alone (TI2V-5B), with a mask and a start video (Fun InP 5B: 48 + 4 + 48), with a
    # control video, a mask and a start video (Fun Control 5B: 48 + 48 + 4 + 48, Wan22FunControlToVideo's order)
    dit_input_channels = (CHANNELS, 2 * CHANNELS + 4, 3 * CHANNELS + 4)
    CONCAT_NODES = {CHANNELS + 4: "WanFunInpaintToVideo (or WanFirstLastFrameToVideo)",
                    2 * CHANNELS + 4: "Wan22FunControlToVideo"}

    def comfy_image_to_video(self, model) -> bool:
        return True  # ComfyUI's WAN22_T2V builds its model_base with image_to_video=True

    def _check_channels(self, name: str, config: dict) -> None:
        # 48 out: Wan 2.1 Fun Control also takes 48 channels, and predicts 16
        wan.check_input_channels(name, config, self.dit_input_channels, "Wan 2.2 TI2V-5B or a Wan 2.2 Fun 5B model")
        if config.get("out_channels", 16) != CHANNELS:
            wan.check_input_channels(name, dict(config, in_channels=wan.FUN_CONTROL_CHANNELS), (), "Wan 2.2 TI2V-5B")

    def is_vae(self, keys: set[str]) -> bool:
        return vae_keys.is_wan22_vae(keys)

    def is_vae_folder(self, config: dict) -> bool:
        return bool(config.get("is_residual"))  # the Wan 2.2 VAE's residual up/down blocks

    def describe(self, shapes: dict) -> str | None:
        return None

    def load_vae(self, path, dtype, device):
        return vae.load_wan22_vae(path, dtype, device)

    def decode(self, loaded_vae, latent: torch.Tensor, split: VaeSplit | None):
        return vae.decode(loaded_vae, latent, split)

    def encode(self, loaded_vae, frames: torch.Tensor, split: VaeSplit | None):
        return vae.encode(loaded_vae, frames, split)

    # Start image (ComfyUI's Wan22ImageToVideoLatent): its latent is the LATENT's first frame, its noise_mask 0
    # there. The engine blends as KSamplerX0Inpaint; these are ComfyUI's WAN22 hooks.
    takes_noise_mask = True
    noise_mask_node = "Wan22ImageToVideoLatent"

    def masked_timestep(self, model, t, denoise_mask):
        """ComfyUI's WAN22.process_timestep: each latent frame's timestep is t times the frame's mean mask
        (over channels, rows and columns; 0 on the start image's frame), and the 5B embeds one per token: [B, S],
        frame after frame (diffusers' 2-D timestep; parallelize_wan shards its embedding with the tokens)."""
        per_frame = denoise_mask.mean(dim=(1, 3, 4)) * t.view(-1, 1)  # [B, T]
        _, p_h, p_w = model.config.patch_size  # the 5B's time patch is 1: a frame's tokens follow each other
        return per_frame.repeat_interleave((denoise_mask.shape[3] // p_h) * (denoise_mask.shape[4] // p_w), dim=1)

    def inpaint_latent(self, latent, noise, sigma):
        return latent  # ComfyUI's WAN22.scale_latent_inpaint: the kept frames enter clean (their timestep is 0)

    def teacache_coefficients(self, model):
        return None, ("TeaCache has no published coefficients for Wan 2.2 TI2V-5B; use the first-block cache "
                      "(fbcache), which needs none")

    def magcache_curve(self, model):
        return None, ("MagCache ratios for Wan 2.2 TI2V-5B are not carried here (they are calibrated per model); use the "
                      "first-block cache (fbcache)")

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


FAMILY = Wan22TI2V5B()

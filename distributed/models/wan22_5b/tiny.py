"""The tiny Wan 2.2 TI2V-5B set, in the real on-disk formats (ComfyUI's names), beside the tiny UMT5 it
shares with Wan 2.1:

    diffusion_models/tiny_wan2.2_ti2v_5B.safetensors   the DiT, 48 input channels, original key names
    vae/tiny_wan2.2_vae.safetensors                    the Wan 2.2 VAE (z 48, 16x16 space), original names
    diffusion_models/tiny_native_wan2.2_ti2v_5B.safetensors   a 5B that ComfyUI's own UNETLoader detects (Wan 2.1's
        tiny_native_wan21 with 48 channels; conditioned by text_encoders/tiny_native_umt5_4096)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from ..wan21 import dit as wan
from ..wan21 import tiny as wan21_tiny
from ..wan21.tiny import (TINY_NATIVE_CONFIG as TINY_NATIVE_WAN21, TINY_WAN_CONFIG, make_tiny_models as make_wan21_tiny,
                          wan_to_original_keys)
from . import vae as wan22_vae, vae_keys

TINY_DIT_CONFIG = dict(TINY_WAN_CONFIG, in_channels=48, out_channels=48)
TINY_NATIVE_CONFIG = dict(TINY_NATIVE_WAN21, in_channels=48, out_channels=48)
TINY_VAE_CONFIG = dict(base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                       temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                       patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)
FILES = {"dit": "diffusion_models/tiny_wan2.2_ti2v_5B.safetensors", "vae": "vae/tiny_wan2.2_vae.safetensors",
         "fun_control": "diffusion_models/tiny_wan2.2_fun_control_5B.safetensors",
         "dit_native": "diffusion_models/tiny_native_wan2.2_ti2v_5B.safetensors"}
# Wan 2.2 Fun Control 5B, shrunk: control video, mask and start video (48 + 4 + 48) beside the noise, and the
# reference image's convolution of a 48-channel latent (wan21/dit.py build_wan)
TINY_FUN_CONTROL_CONFIG = dict(TINY_DIT_CONFIG, in_channels=148, **{wan.REFERENCE_KEY: 48})
_VERSION = "3"


def make_tiny_models(root: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the set under root (skipped where already written): {"dit", "vae", "fun_control", "dit_native",
    "text_encoder", "text_encoder_native"}."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = Path(root)
    shared = make_wan21_tiny(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-wan2.2-5b"
    if not (stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values())):
        torch.manual_seed(52)
        dit = WanTransformer3DModel(**TINY_DIT_CONFIG)
        save_safetensors({k: v.to(dtype) for k, v in wan_to_original_keys(dit.state_dict()).items()}, paths["dit"],
                         {wan.CONFIG_METADATA_KEY: json.dumps(TINY_DIT_CONFIG)})
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        save_safetensors({k: v.to(dtype) for k, v in vae_keys.diffusers_to_comfy(vae.state_dict()).items()},
                         paths["vae"], {wan22_vae.CONFIG_METADATA_KEY: json.dumps(TINY_VAE_CONFIG)})
        torch.manual_seed(53)
        fun = wan.build_wan(TINY_FUN_CONTROL_CONFIG)
        save_safetensors({k: v.to(dtype) for k, v in wan_to_original_keys(fun.state_dict()).items()},
                         paths["fun_control"], {wan.CONFIG_METADATA_KEY: json.dumps(TINY_FUN_CONTROL_CONFIG)})
        torch.manual_seed(54)
        native = WanTransformer3DModel(**TINY_NATIVE_CONFIG)
        save_safetensors({k: v.to(dtype) for k, v in wan_to_original_keys(native.state_dict()).items()},
                         paths["dit_native"], {wan.CONFIG_METADATA_KEY: json.dumps(TINY_NATIVE_CONFIG)})
        stamp.write_text(_VERSION)
    return {**paths, "text_encoder": shared["text_encoder"], "text_encoder_native": shared["text_encoder_native"]}


# -- the tiny debug config (tests/parity_targets.py): Wan 2.1's inputs with the 5B's 48 latent channels ------
CHANNELS = TINY_DIT_CONFIG["in_channels"]


def tiny_inputs(shape: tuple[int, int, int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """One forward's positional inputs (latent [2, 48, T, H, W], timesteps, text), as Wan 2.1's tiny_inputs."""
    return wan21_tiny.tiny_inputs(shape, seed, channels=CHANNELS)


def tiny_start_image(shape: tuple[int, int, int], process_out, batch: int = 1,
                     seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A LATENT as ComfyUI's Wan22ImageToVideoLatent makes it from a start image: raw space, the image's latent
    in the first frame, process_out(0) (the family's latent means) after it; noise_mask [B, 1, T, H, W], 0 on the
    first frame. process_out: the family's (FAMILY.process_out; handed in, this module runs below the family)."""
    g = torch.Generator().manual_seed(seed)
    latent = process_out(torch.zeros(batch, CHANNELS, *shape))
    latent[:, :, :1] = torch.randn(1, CHANNELS, 1, *shape[1:], generator=g)
    mask = torch.ones(batch, 1, *shape)
    mask[:, :, :1] = 0.0
    return latent, mask


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], sampler: str = "unipc", steps: int = 4,
                 start_image: bool = False) -> dict:
    """The fields of a SampleRequest for the tiny 5B (family: the ModelFamily): text to video, or from a start
    image's LATENT and noise_mask."""
    fields = wan21_tiny.tiny_request(family, experts, shape, steps=steps, sampler=sampler)
    if start_image:
        fields["latent"], fields["noise_mask"] = tiny_start_image(shape, family.process_out)
    return fields

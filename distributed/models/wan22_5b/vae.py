"""The Wan 2.2 VAE (z 48, 4x time, 16x16 space: 8x in its convolutions, then 2x2 patches) as diffusers'
AutoencoderKLWan, from ComfyUI's wan2.2_vae.safetensors (key names: vae_keys.py) or a diffusers folder,
and its decode and encode split by rows across the ranks: the Wan 2.1 VAE's split (halo exchange before every
padded convolution, attention on the gathered rows; exact), at 16 pixels per latent row (the encode's 2x2
patches then stay within a rank's rows)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...parallel.vae_split import VaeSplit, decode_rows, encode_rows
from ...formats.checkpoint import CheckpointError, build_on_meta, config_from_metadata, dequantize, from_folder, load_state_dict
from ...formats.checkpoint import read_header
from ..video import decode_video, encode_video
from ..wan21.vae import split_decoder, split_encoder
from . import vae_keys

CONFIG_METADATA_KEY = "usp_video.wan22_vae_config"
PIXELS_PER_ROW = 16


def load_wan22_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        if not json.loads((path / "config.json").read_text()).get("is_residual"):
            raise CheckpointError(f"{path} is a Wan 2.1 VAE folder; Wan 2.2 TI2V-5B needs the Wan 2.2 VAE")
        return from_folder(AutoencoderKLWan, path, dtype, device, "a diffusers AutoencoderKLWan folder")
    shapes, metadata = read_header(path)
    if not vae_keys.is_wan22_vae(set(shapes)):
        from .. import describe_keys

        raise CheckpointError(f"{path.name} is not the Wan 2.2 VAE ({describe_keys(shapes)}); Wan 2.2 TI2V-5B "
                              "needs wan2.2_vae.safetensors (the Wan 2.1 VAE has 16 latent channels, not 48)")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or vae_keys.config_from_shapes(
        {name: shape for name, (shape, _) in shapes.items()})
    state = vae_keys.comfy_to_diffusers(dequantize(load_state_dict(path), dtype))
    vae = build_on_meta(lambda: AutoencoderKLWan(**config), state, path, "the Wan 2.2 VAE")
    return vae.to(device).eval()


def decode(vae, latent: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    """Frames of a raw Wan 2.2 latent: whole in this process, or rows shared out across the split's ranks."""
    if split is None:
        return decode_video(vae, latent)
    return decode_rows(vae, decode_video, latent, split, split_decoder, scale=PIXELS_PER_ROW)


def encode(vae, frames: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    """The raw Wan 2.2 latent of IMAGE frames [F, H, W, 3] (F = 1 + 4k, H and W multiples of 16): whole in
    this process, or rows shared out across the split's ranks (the latent on rank 0)."""
    if split is None:
        return encode_video(vae, frames)
    return encode_rows(vae, encode_video, frames, split, split_encoder, scale=PIXELS_PER_ROW)

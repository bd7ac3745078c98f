"""HunyuanVideo VAE decode (diffusers AutoencoderKLHunyuanVideo) from ComfyUI's vae single file
(hunyuan_video_vae_bf16.safetensors, whose tensor names are already diffusers') or a diffusers folder.

Decoding is tiled (diffusers' spatial and temporal tiling with blended overlaps) so that 720p
fits; latents no larger than one tile (256 px, 64 frames) decode in one piece, exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from ...parallel.vae_split import VaeSplit, decode_tiles
from ..video import decode_video
from ...formats.checkpoint import (CheckpointError, build_on_meta, config_from_metadata, dequantize, from_folder, load_state_dict,
                          read_header, strip_prefix)

CONFIG_METADATA_KEY = "usp_video.hunyuan_vae_config"


def is_hunyuan_vae_keys(keys: set[str]) -> bool:
    return "decoder.conv_in.conv.weight" in keys and "decoder.up_blocks.0.resnets.0.conv1.conv.weight" in keys


def load_hunyuan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLHunyuanVideo

    path = Path(path)
    if path.is_dir():
        vae = from_folder(AutoencoderKLHunyuanVideo, path, dtype, "cpu", "a diffusers AutoencoderKLHunyuanVideo folder")
    else:
        shapes, metadata = read_header(path)
        keys = {k.removeprefix("vae.") for k in shapes}
        if not is_hunyuan_vae_keys(keys):
            from .. import describe_keys

            raise CheckpointError(f"{path.name} is not a HunyuanVideo VAE ({describe_keys(keys)}); pick "
                                  "hunyuan_video_vae_bf16.safetensors")
        latent = shapes.get("decoder.conv_in.conv.weight", shapes.get("vae.decoder.conv_in.conv.weight"))[0][1]
        if latent != 16:
            raise CheckpointError(f"{path.name} is a VAE with {latent} latent channels (HunyuanVideo 1.5 or another "
                                  "model); the HunyuanVideo VAE has 16")
        config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or {}
        state = dequantize(strip_prefix(load_state_dict(path), ("vae.",)), dtype)
        vae = build_on_meta(lambda: AutoencoderKLHunyuanVideo(**config), state, path, "the HunyuanVideo VAE")
    vae.enable_tiling()
    return vae.to(device).eval()


def decode(vae, latent: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    """Frames of a raw HunyuanVideo latent: diffusers' tiled decode (one tile when the latent fits one),
    in this process or with its tiles shared out across the split's ranks (rank 0 blends them)."""
    if split is None:
        return decode_video(vae, latent)
    decoder, temporal, spatial = vae.decoder, vae.temporal_compression_ratio, vae.spatial_compression_ratio

    def decoded_shape(tile: torch.Tensor) -> torch.Size:
        batch, _, frames, height, width = tile.shape  # causal in time: frames -> 1 + (frames - 1) * temporal
        return torch.Size((batch, decoder.conv_out.conv.out_channels, (frames - 1) * temporal + 1,
                           height * spatial, width * spatial))

    return decode_tiles(vae, decode_video, latent, split, decoded_shape)


def tile_count(vae, latent: torch.Tensor) -> int:
    """How many times diffusers' AutoencoderKLHunyuanVideo.decode calls its decoder for `latent`: the
    temporal tiles (framewise decoding), each split into spatial tiles when larger than one (the loops
    of its _decode, tiled_decode and _temporal_tiled_decode)."""
    _, _, frames, height, width = latent.shape
    spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    min_h, min_w = vae.tile_sample_min_height // spatial, vae.tile_sample_min_width // spatial
    stride_h, stride_w = vae.tile_sample_stride_height // spatial, vae.tile_sample_stride_width // spatial

    def spatial_tiles() -> int:
        if vae.use_tiling and (width > min_w or height > min_h):
            return len(range(0, height, stride_h)) * len(range(0, width, stride_w))
        return 1

    if vae.use_framewise_decoding and frames > vae.tile_sample_min_num_frames // temporal:
        return len(range(0, frames, vae.tile_sample_stride_num_frames // temporal)) * spatial_tiles()
    return spatial_tiles()

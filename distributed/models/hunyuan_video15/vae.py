"""HunyuanVideo 1.5's VAE (diffusers' AutoencoderKLHunyuanVideo15: 32 latent channels, 16x space, 4x time) from
Comfy-Org's hunyuanvideo15_vae_fp16.safetensors (tencent's original names, as ComfyUI's own VAE reads them:
encoder.down.N.block.M, mid.block_1 / attn_1 / block_2, ...) or a diffusers folder.

Decode and encode are diffusers' spatially tiled ones (256-pixel tiles, blended overlaps), so that 720p fits; a
split shares the tiles out among the ranks (parallel/vae_split.run_tiles) and rank 0 blends them: the result is
the one-process tiled decode's (encode's)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...formats.checkpoint import (CheckpointError, build_on_meta, config_from_metadata, dequantize, from_folder,
                                   load_state_dict, read_header)
from ...parallel.vae_split import VaeSplit, run_tiles
from ..video import decode_video, encode_video

CONFIG_METADATA_KEY = "usp_video.hunyuan_video15_vae_config"
_RENAMES = ((r"^(encoder|decoder)\.down\.(\d+)\.block\.(\d+)\.", r"\1.down_blocks.\2.resnets.\3."),
            (r"^(encoder|decoder)\.up\.(\d+)\.block\.(\d+)\.", r"\1.up_blocks.\2.resnets.\3."),
            (r"^(encoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0."),
            (r"^(decoder)\.up\.(\d+)\.upsample\.", r"\1.up_blocks.\2.upsamplers.0."),
            (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
            (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
            (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
            (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."))


def is_vae_keys(keys: set[str]) -> bool:
    return "decoder.mid.block_1.norm1.gamma" in keys and "decoder.conv_in.conv.weight" in keys


def _renamed(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Each name by the first of the (pattern, replacement) rules that matches it (unchanged if none does)."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        out[key] = value
    return out


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _renamed(state, _RENAMES)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> the original ones (the tiny-model writer)."""
    inverse = ((r"^(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
               (r"^(encoder|decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.up.\2.block.\3."),
               (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
               (r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.", r"\1.up.\2.upsample."),
               (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
               (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
               (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
               (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."))
    return _renamed(state, inverse)


def infer_config(shapes: dict) -> dict:
    """The VAE's config from its tensor shapes (the released one: block_out_channels 128..1024, 2 blocks)."""
    stages = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.conv.weight"][0][0] for i in range(stages)]
    return dict(block_out_channels=channels, layers_per_block=blocks,
                latent_channels=shapes["decoder.conv_in.conv.weight"][0][1])


def load(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLHunyuanVideo15

    path = Path(path)
    if path.is_dir():
        vae = from_folder(AutoencoderKLHunyuanVideo15, path, dtype, "cpu", "a diffusers AutoencoderKLHunyuanVideo15 folder")
    else:
        shapes, metadata = read_header(path)
        shapes = {k.removeprefix("vae."): v for k, v in shapes.items()}
        if not is_vae_keys(set(shapes)):
            from .. import describe_keys

            raise CheckpointError(f"{path.name} is not a HunyuanVideo 1.5 VAE ({describe_keys(set(shapes))}); pick "
                                  "hunyuanvideo15_vae_fp16.safetensors")
        config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or infer_config(shapes)
        state = to_diffusers(dequantize({k.removeprefix("vae."): v for k, v in load_state_dict(path).items()}, dtype))
        vae = build_on_meta(lambda: AutoencoderKLHunyuanVideo15(**config), state, path, "the HunyuanVideo 1.5 VAE")
    vae.enable_tiling()
    return vae.to(device).eval()


def decode(vae, latent: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    if split is None:
        return decode_video(vae, latent)
    spatial, temporal = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio

    def decoded_shape(tile: torch.Tensor) -> torch.Size:  # causal in time: frames -> 1 + (frames - 1) * temporal
        batch, _, frames, height, width = tile.shape
        return torch.Size((batch, vae.config.out_channels, (frames - 1) * temporal + 1, height * spatial, width * spatial))

    def tiled(v, z):
        param = next(v.decoder.parameters())
        return v.decode(z.to(device=param.device, dtype=param.dtype))

    return run_tiles(vae, "decoder", tiled, decode_video, latent, split, decoded_shape)


def encode(vae, frames: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    if split is None:
        return encode_video(vae, frames)
    spatial, temporal = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio

    def encoded_shape(tile: torch.Tensor) -> torch.Size:  # mean and log-variance: 2 x latent channels
        batch, _, count, height, width = tile.shape
        return torch.Size((batch, 2 * vae.config.latent_channels, (count - 1) // temporal + 1, height // spatial,
                           width // spatial))

    def tiled(v, f):
        param = next(v.encoder.parameters())
        return v.encode((f.float() * 2 - 1).to(device=param.device, dtype=param.dtype).permute(3, 0, 1, 2).unsqueeze(0))

    return run_tiles(vae, "encoder", tiled, encode_video, frames, split, encoded_shape)


def tile_count(vae, shape: tuple[int, ...], sample: bool) -> int:
    """How many times diffusers' tiled decode (sample False: a latent's shape) or encode (sample True: a video's
    [.., H, W]) calls the decoder / encoder: one call unless larger than a tile, else one per tile."""
    height, width = shape[-2:]
    if sample:
        limit_h, limit_w = vae.tile_sample_min_height, vae.tile_sample_min_width
        step_h = int(vae.tile_sample_min_height * (1 - vae.tile_overlap_factor))
        step_w = int(vae.tile_sample_min_width * (1 - vae.tile_overlap_factor))
    else:
        limit_h, limit_w = vae.tile_latent_min_height, vae.tile_latent_min_width
        step_h = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor))
        step_w = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor))
    if not (vae.use_tiling and (width > limit_w or height > limit_h)):
        return 1
    return len(range(0, height, step_h)) * len(range(0, width, step_w))

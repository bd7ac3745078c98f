"""HunyuanVideo VAE decode (diffusers AutoencoderKLHunyuanVideo) from ComfyUI's vae single file
(hunyuan_video_vae_bf16.safetensors, whose tensor names are already diffusers') or a diffusers folder.

Decoding is tiled (diffusers' spatial and temporal tiling with blended overlaps) so that 720p
fits; latents no larger than one tile (256 px, 64 frames) decode in one piece, exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, config_from_metadata, dequantize, load_state_dict, read_header, strip_prefix

CONFIG_METADATA_KEY = "usp_video.hunyuan_vae_config"


def is_hunyuan_vae_keys(keys: set[str]) -> bool:
    return "decoder.conv_in.conv.weight" in keys and "decoder.up_blocks.0.resnets.0.conv1.conv.weight" in keys


def load_hunyuan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLHunyuanVideo

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: expected a diffusers AutoencoderKLHunyuanVideo folder with config.json")
        vae = AutoencoderKLHunyuanVideo.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    else:
        shapes, metadata = read_header(path)
        keys = {k.removeprefix("vae.") for k in shapes}
        if not is_hunyuan_vae_keys(keys):
            from .wan import guess_family

            raise CheckpointError(f"{path.name} is not a HunyuanVideo VAE ({guess_family(keys)}); pick "
                                  "hunyuan_video_vae_bf16.safetensors")
        latent = shapes.get("decoder.conv_in.conv.weight", shapes.get("vae.decoder.conv_in.conv.weight"))[0][1]
        if latent != 16:
            raise CheckpointError(f"{path.name} is a VAE with {latent} latent channels (HunyuanVideo 1.5 or another "
                                  "model); the HunyuanVideo VAE has 16")
        config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or {}
        state = dequantize(strip_prefix(load_state_dict(path), ("vae.",)), dtype)
        with torch.device("meta"):
            vae = AutoencoderKLHunyuanVideo(**config)
        missing, unexpected = vae.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(f"{path.name} does not fit the HunyuanVideo VAE: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    vae.enable_tiling()
    return vae.to(device).eval()

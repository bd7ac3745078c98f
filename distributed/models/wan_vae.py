"""Wan-VAE decode (diffusers AutoencoderKLWan) from ComfyUI's vae single file or a diffusers folder.

`decode_video` serves both video VAEs (Wan and HunyuanVideo): raw latent in, IMAGE frames out."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, config_from_metadata, dequantize, load_state_dict, read_header

CONFIG_METADATA_KEY = "usp_video.wan_vae_config"


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: expected a diffusers AutoencoderKLWan folder with config.json")
        return AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True).to(device).eval()
    shapes, metadata = read_header(path)
    if "decoder.middle.0.residual.0.gamma" not in shapes:
        from .wan import guess_family

        hint = ("looks like the Wan 2.2 VAE (48 channels)" if shapes.get("decoder.conv1.weight", [[0, 0]])[0][1] == 48
                else guess_family(set(shapes)))
        raise CheckpointError(f"{path.name} is not a Wan 2.1 VAE ({hint}); pick wan_2.1_vae.safetensors")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or {
        "base_dim": shapes["encoder.conv1.weight"][0][0], "z_dim": shapes["conv2.weight"][0][0]}
    state = convert_wan_vae_to_diffusers(dequantize(load_state_dict(path), dtype))
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    missing, unexpected = vae.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not fit the Wan VAE: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return vae.to(device).eval()


@torch.no_grad()
def decode_video(vae, latent: torch.Tensor) -> torch.Tensor:
    """Raw-space latent [B, 16, T, H, W] -> IMAGE frames [B*T', 8H, 8W, 3] in 0..1 (T' = 4(T-1)+1)."""
    param = next(vae.parameters())
    video = vae.decode(latent.to(device=param.device, dtype=param.dtype)).sample  # (B, 3, T', H', W') in -1..1
    frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # (B, T', H', W', 3)
    return frames.flatten(0, 1).cpu()

"""What every video VAE's decode shares: a raw latent in, ComfyUI IMAGE frames out."""

from __future__ import annotations

import torch


@torch.no_grad()
def decode_video(vae, latent: torch.Tensor) -> torch.Tensor:
    """Raw-space latent [B, C, T, H, W] -> IMAGE frames [B*T', H', W', 3] in 0..1 on the CPU
    (diffusers' vae.decode; T' = 4(T-1)+1 for the 4x causal video VAEs)."""
    param = next(vae.parameters())
    video = vae.decode(latent.to(device=param.device, dtype=param.dtype)).sample  # (B, 3, T', H', W') in -1..1
    frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # (B, T', H', W', 3)
    return frames.flatten(0, 1).cpu()

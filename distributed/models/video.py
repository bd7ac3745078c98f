"""What every video VAE's decode and encode share: a raw latent in, ComfyUI IMAGE frames out, and back."""

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


def comfy_upscale(x: torch.Tensor, width: int, height: int, mode: str = "bilinear") -> torch.Tensor:
    """A [B, C, T, H, W] (or [B, C, H, W]) tensor at width x height as ComfyUI's common_upscale(..., mode,
    "center") makes it: the aspect ratio matched by a centred crop, then interpolation per frame (torch's modes:
    "bilinear", "area", "nearest-exact"; nothing changes at the same size)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    shape = tuple(x.shape)
    frames = x.movedim(1, -3).reshape(-1, shape[1], *shape[-2:]) if x.dim() == 5 else x  # (B*T, C, H, W)
    old_height, old_width = frames.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    left = round((old_width - old_width * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    top = round((old_height - old_height * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    frames = frames.narrow(-2, top, old_height - 2 * top).narrow(-1, left, old_width - 2 * left)
    out = torch.nn.functional.interpolate(frames, size=(height, width), mode=mode)
    if x.dim() == 4:
        return out
    return out.reshape(shape[0], shape[2], shape[1], height, width).movedim(1, 2)


def resize_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x with `batch` entries along dimension 0, as ComfyUI's resize_to_batch_size picks them (repeating or
    spreading the ones there are)."""
    have = x.shape[0]
    if have == batch:
        return x
    if batch <= 1:
        return x[:batch]
    if batch < have:
        scale = (have - 1) / (batch - 1)
        picks = [min(round(i * scale), have - 1) for i in range(batch)]
    else:
        scale = have / batch
        picks = [min(int((i + 0.5) * scale), have - 1) for i in range(batch)]
    return x[picks]


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 (one video) -> its raw-space latent [1, C, T, H/s, W/s] on the CPU:
    the mean of diffusers' latent distribution (vae.encode), which is what ComfyUI's VAEEncode returns (the
    encoder's mu, no scaling)."""
    param = next(vae.parameters())
    # -1..1 before the cast to the VAE's dtype, as ComfyUI's process_input does
    video = (frames.float() * 2 - 1).to(device=param.device, dtype=param.dtype).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, F, H, W)
    return vae.encode(video).latent_dist.mode().float().cpu()


def resized_frames(image: torch.Tensor, width: int, height: int, length: int, mode: str = "bilinear") -> torch.Tensor:
    """The first `length` IMAGE frames [n, H, W, C] at width x height, as ComfyUI's Wan image-to-video nodes resize
    a start image (common_upscale, bilinear, centred crop; WanAnimateToVideo's "area")."""
    return comfy_upscale(image[:length].movedim(-1, 1), width, height, mode).movedim(1, -1)


def start_video(start_image: torch.Tensor, width: int, height: int, length: int) -> torch.Tensor:
    """The video ComfyUI's WanImageToVideo encodes from IMAGE start frames [n, H, W, C]: the first `length` of them
    resized to width x height (bilinear, after a centred crop to the aspect ratio: common_upscale), then gray
    (0.5) frames up to `length`; [length, height, width, 3]."""
    frames = resized_frames(start_image, width, height, length)
    video = torch.full((length, height, width, frames.shape[-1]), 0.5, dtype=frames.dtype)
    video[:frames.shape[0]] = frames
    return video[..., :3]


def start_mask(start_frames: int, latent_frames: int, height: int, width: int) -> torch.Tensor:
    """WanImageToVideo's concat_mask [1, 1, T, h, w]: 0 on the latent frames the start frames cover, 1 after."""
    mask = torch.ones(1, 1, latent_frames, height, width)
    mask[:, :, :(start_frames - 1) // 4 + 1] = 0.0
    return mask

"""Wan-VAE (diffusers AutoencoderKLWan) from ComfyUI's vae single file or a diffusers folder, and its
decode and encode split by rows across the ranks (parallel/vae_split.py: halo exchange before every
padded convolution, the mid-block attention on the gathered frame; exact)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ...parallel.vae_split import RowSplit, VaeSplit, decode_rows, encode_rows
from ..video import decode_video, encode_video

from ...formats.checkpoint import (CheckpointError, build_on_meta, config_from_metadata, dequantize, from_folder, load_state_dict,
                          read_header)

CONFIG_METADATA_KEY = "usp_video.wan_vae_config"


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path)
    if path.is_dir():
        return from_folder(AutoencoderKLWan, path, dtype, device, "a diffusers AutoencoderKLWan folder")
    shapes, metadata = read_header(path)
    if "decoder.middle.0.residual.0.gamma" not in shapes:
        from .. import describe_keys

        raise CheckpointError(f"{path.name} is not a Wan 2.1 VAE ({describe_keys(shapes)}); pick wan_2.1_vae.safetensors")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY) or {
        "base_dim": shapes["encoder.conv1.weight"][0][0], "z_dim": shapes["conv2.weight"][0][0]}
    state = convert_wan_vae_to_diffusers(dequantize(load_state_dict(path), dtype))
    vae = build_on_meta(lambda: AutoencoderKLWan(**config), state, path, "the Wan VAE")
    return vae.to(device).eval()


@contextmanager
def split_layers(root: torch.nn.Module, rows: RowSplit):
    """Patch the layers under root (a Wan-VAE's encoder or decoder) of this instance for the row split
    (restored on exit): a halo exchange replaces the rows padding of every spatially padded convolution,
    and every attention block runs on the gathered frame."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    patched = []

    def causal_conv(module):
        def forward(x, cache_x=None):  # (B, C, T, rows, W)
            padding = list(module._padding)  # (w, w, h, h, t, 0)
            if cache_x is not None and padding[4] > 0:
                x = torch.cat([cache_x.to(x.device), x], dim=2)
                padding[4] -= cache_x.shape[2]
            x = rows.halo(x, padding[2], dim=3)
            padding[2] = padding[3] = 0
            return torch.nn.Conv3d.forward(module, F.pad(x, padding))
        return forward

    def conv2d(module):
        pad_h, pad_w = module.padding

        def forward(x):  # (B*T, C, rows, W)
            x = F.pad(rows.halo(x, pad_h, dim=2), (pad_w, pad_w, 0, 0))
            return F.conv2d(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        return forward

    def zero_pad2d(module):
        left, right, top, bottom = module.padding

        def forward(x):  # (B*T, C, rows, W); the downsampling's (0, 1, 0, 1): one row of the rank below
            return F.pad(rows.halo(x, top, dim=2, bottom=bottom), (left, right, 0, 0))
        return forward

    def attention(module):
        whole = module.forward

        def forward(x):  # (B, C, T, H, W) at the latent resolution
            scale = x.shape[3] // rows.counts[rows.rank]
            return rows.my_rows(whole(rows.gather_rows(x, 3, scale)), 3, scale)
        return forward

    for module in root.modules():
        if isinstance(module, WanCausalConv3d) and module._padding[2] > 0:
            patched.append((module, causal_conv(module)))
        elif isinstance(module, torch.nn.Conv2d) and module.padding[0] > 0:
            patched.append((module, conv2d(module)))
        elif isinstance(module, torch.nn.ZeroPad2d) and module.padding[2:] != (0, 0):
            patched.append((module, zero_pad2d(module)))
        elif isinstance(module, WanAttentionBlock):
            patched.append((module, attention(module)))
    for module, forward in patched:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward  # back to the class's forward


def split_decoder(vae, rows: RowSplit):
    """Patch this VAE's decoder for the row split (a context manager)."""
    return split_layers(vae.decoder, rows)


def split_encoder(vae, rows: RowSplit):
    """Patch this VAE's encoder for the row split (a context manager). The rows a rank encodes must be
    whole latent rows (8 pixels each) so that every stride-2 downsampling starts at an even row."""
    return split_layers(vae.encoder, rows)


def decode(vae, latent: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    """Frames of a raw Wan latent: whole in this process, or rows shared out across the split's ranks."""
    if split is None:
        return decode_video(vae, latent)
    return decode_rows(vae, decode_video, latent, split, split_decoder)


def encode(vae, frames: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
    """The raw latent of IMAGE frames [F, H, W, 3] (F = 1 + 4k, H and W multiples of 8): whole in this
    process, or rows shared out across the split's ranks (the latent on rank 0)."""
    if split is None:
        return encode_video(vae, frames)
    return encode_rows(vae, encode_video, frames, split, split_encoder)

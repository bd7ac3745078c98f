"""Parallel VAE decode, exact: the frame's rows split across the ranks, with halo exchange.

Rank r decodes latent rows [a_r, b_r) of every frame. The decoders (Wan-VAE and HunyuanVideo's) are
local in space except for a few things, each handled so that the result equals the one-process decode:
  - 3x3 convolutions need one row from each neighbour: before each of them the ranks swap their
    edge rows (at the frame's edges, what the layer's own padding would add: zeros for Wan,
    replicated rows for HunyuanVideo);
  - mid-block attention sees the whole frame (Wan) or the whole video (HunyuanVideo, causal over
    frames): the ranks all-gather its input (at the latent resolution, the smallest), run it whole
    and keep their rows;
  - GroupNorm (HunyuanVideo) takes its statistics over the whole frame: the ranks all-reduce the
    sums (in float64);
  - nearest upsampling, RMS norms (per position) and 1x1 convolutions are local.
Rank 0 gathers the decoded rows. Per-rank activation memory and time are about 1/N of a
whole-frame decode. Every rank must call `decode_split` with the same latent.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def row_split(rows: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges, one per rank (rows >= ranks)."""
    base, extra = divmod(rows, ranks)
    bounds, start = [], 0
    for r in range(ranks):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class _Rows:
    """This rank's place in the split: rank, ranks, and every rank's latent row count."""

    def __init__(self, rank: int, ranks: int, counts: list[int], device: torch.device):
        self.rank, self.ranks, self.counts, self.device = rank, ranks, counts, device

    def halo(self, x: torch.Tensor, pad: int, dim: int, replicate: bool = False) -> torch.Tensor:
        """x with `pad` rows of each neighbour added along dim; at the frame's edges zeros, or
        copies of the edge row with replicate."""
        if pad == 0:
            return x
        size = list(x.shape)
        size[dim] = pad
        n = x.shape[dim]
        if replicate:  # what the layer's replicate padding adds at the frame's edges
            top, bottom = x.narrow(dim, 0, 1).expand(size), x.narrow(dim, n - 1, 1).expand(size)
        else:
            top = bottom = x.new_zeros(size)
        ops = []
        if self.rank > 0:
            top = torch.empty(size, dtype=x.dtype, device=x.device)
            ops += [dist.P2POp(dist.isend, x.narrow(dim, 0, pad).contiguous(), self.rank - 1),
                    dist.P2POp(dist.irecv, top, self.rank - 1)]
        if self.rank < self.ranks - 1:
            bottom = torch.empty(size, dtype=x.dtype, device=x.device)
            ops += [dist.P2POp(dist.isend, x.narrow(dim, n - pad, pad).contiguous(), self.rank + 1),
                    dist.P2POp(dist.irecv, bottom, self.rank + 1)]
        for request in dist.batch_isend_irecv(ops):  # ranks >= 2: every rank has a neighbour
            request.wait()
        return torch.cat([top, x, bottom], dim=dim)

    def gather_rows(self, x: torch.Tensor, dim: int, scale: int) -> torch.Tensor:
        """All ranks' rows along dim (each rank holds counts[r] * scale rows)."""
        most = max(self.counts) * scale
        padded = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, most - x.shape[dim]]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded)
        return torch.cat([p.narrow(dim, 0, n * scale) for p, n in zip(parts, self.counts)], dim=dim)

    def my_rows(self, x: torch.Tensor, dim: int, scale: int) -> torch.Tensor:
        start = sum(self.counts[:self.rank]) * scale
        return x.narrow(dim, start, self.counts[self.rank] * scale)


@contextmanager
def _split_decoder(vae, rows: _Rows):
    """Patch the decoder's layers of this VAE instance for the split (restored on exit)."""
    from diffusers import AutoencoderKLHunyuanVideo

    if isinstance(vae, AutoencoderKLHunyuanVideo):
        with _split_hunyuan_decoder(vae, rows):
            yield
        return
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    patched = []

    def causal_conv(module):
        def forward(x, cache_x=None):
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

        def forward(x):
            x = F.pad(rows.halo(x, pad_h, dim=2), (pad_w, pad_w, 0, 0))
            return F.conv2d(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        return forward

    def attention(module):
        whole = module.forward

        def forward(x):  # (B, C, T, H, W) at the latent resolution
            scale = x.shape[3] // rows.counts[rows.rank]
            return rows.my_rows(whole(rows.gather_rows(x, 3, scale)), 3, scale)
        return forward

    for module in vae.decoder.modules():
        if isinstance(module, WanCausalConv3d) and module._padding[2] > 0:
            patched.append((module, causal_conv(module)))
        elif isinstance(module, torch.nn.Conv2d) and module.padding[0] > 0:
            patched.append((module, conv2d(module)))
        elif isinstance(module, WanAttentionBlock):
            patched.append((module, attention(module)))
    for module, forward in patched:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward  # back to the class's forward


@contextmanager
def _split_hunyuan_decoder(vae, rows: _Rows):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import (HunyuanVideoCausalConv3d,
                                                                            HunyuanVideoMidBlock3D,
                                                                            prepare_causal_attention_mask)

    patched, shape = [], {}

    def causal_conv(module):
        w, _, h, _, t, _ = module.time_causal_padding

        def forward(x):
            x = rows.halo(x, h, dim=3, replicate=module.pad_mode == "replicate")
            return module.conv(F.pad(x, (w, w, 0, 0, t, 0), mode=module.pad_mode))
        return forward

    def group_norm(module):
        def forward(x):
            batch, channels = x.shape[:2]
            grouped = x.reshape(batch, module.num_groups, -1).double()
            stats = torch.stack([grouped.sum(-1), (grouped * grouped).sum(-1),
                                 torch.full_like(grouped[..., 0], grouped.shape[-1])])
            dist.all_reduce(stats)
            mean, var = stats[0] / stats[2], stats[1] / stats[2] - (stats[0] / stats[2]) ** 2
            out = (grouped - mean[..., None]) / torch.sqrt(var[..., None] + module.eps)
            out = out.reshape(x.shape).to(x.dtype)
            view = (1, channels) + (1,) * (x.dim() - 2)
            return out * module.weight.view(view) + module.bias.view(view) if module.affine else out
        return forward

    def remember_shape(module, args):
        shape["frames"], shape["width"] = args[0].shape[2], args[0].shape[4]

    def attention(module):
        whole = module.forward

        def forward(hidden_states, attention_mask=None, **kwargs):  # (B, T * h * W, C), h = local rows
            batch, _, channels = hidden_states.shape
            frames, width = shape["frames"], shape["width"]
            x = hidden_states.reshape(batch, frames, -1, width, channels)
            full = rows.gather_rows(x, 2, x.shape[2] // rows.counts[rows.rank])
            mask = prepare_causal_attention_mask(frames, full.shape[2] * width, full.dtype, full.device,
                                                 batch_size=batch)
            out = whole(full.flatten(1, 3), attention_mask=mask, **kwargs).reshape(full.shape)
            return rows.my_rows(out, 2, x.shape[2] // rows.counts[rows.rank]).flatten(1, 3)
        return forward

    hooks = []
    for module in vae.decoder.modules():
        if isinstance(module, HunyuanVideoCausalConv3d):
            patched.append((module, causal_conv(module)))
        elif isinstance(module, torch.nn.GroupNorm):
            patched.append((module, group_norm(module)))
        elif isinstance(module, HunyuanVideoMidBlock3D):
            hooks.append(module.register_forward_pre_hook(remember_shape))
            patched += [(attn, attention(attn)) for attn in module.attentions if attn is not None]
    tiling = (vae.use_tiling, vae.use_framewise_decoding)
    vae.use_tiling = vae.use_framewise_decoding = False  # the split replaces tiling
    for module, forward in patched:
        module.forward = forward
    try:
        yield
    finally:
        vae.use_tiling, vae.use_framewise_decoding = tiling
        for hook in hooks:
            hook.remove()
        for module, _ in patched:
            del module.forward


def decode_split(vae, decode: Callable[[object, torch.Tensor], torch.Tensor], latent: torch.Tensor, rank: int,
                 ranks: int, device: torch.device, scale: int = 8) -> torch.Tensor | None:
    """Decode latent [B, C, T, H, W] across `ranks` ranks of the default group, exactly.

    decode(vae, latent) -> frames [F, h, w, 3] in 0..1 on the CPU (wan_vae.decode_video). Returns
    the frames on rank 0, None elsewhere. With fewer latent rows than ranks, rank 0 decodes alone.
    """
    height = latent.shape[3]
    if ranks == 1 or height < ranks:
        return decode(vae, latent) if rank == 0 else None
    bounds = row_split(height, ranks)
    rows = _Rows(rank, ranks, [b - a for a, b in bounds], device)
    start, end = bounds[rank]
    with _split_decoder(vae, rows):
        mine = decode(vae, latent[:, :, :, start:end])  # (F, rows * scale, W, 3)
    frames = rows.gather_rows(mine.to(device), 1, scale)
    return frames.cpu() if rank == 0 else None

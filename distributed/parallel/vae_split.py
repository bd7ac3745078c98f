"""Parallel VAE decode: every rank decodes a part of the video, rank 0 gets the frames.

Wan-VAE, exact: rank r decodes latent rows [a_r, b_r) of every frame. The decoder is local in space
except for two things, each handled so that the result equals the one-process decode:
  - 3x3 convolutions need one row from each neighbour: before each of them the ranks swap their edge
    rows (halo exchange; zeros at the frame's edges, as the layer's own padding);
  - the mid-block attention sees the whole frame: the ranks all-gather its input (at the latent
    resolution, the smallest), run it whole and keep their rows.
Nearest upsampling, RMS norms (per position) and 1x1 convolutions are local. The decoder runs frame by
frame with a causal cache, so per-rank activation memory and time are about 1/N of a whole decode.

HunyuanVideo VAE: its decoder takes all frames at once (GroupNorm and a causal attention over the
whole video), so one decode of a 720p video does not fit any GPU; diffusers and ComfyUI decode it in
overlapping tiles blended together. The ranks share out those tiles (_TileDecoder) and rank 0 blends
them: the result is the one-process tiled decode's, time about 1/N, each rank holding one tile's
activations and its own decoded tiles.

Every rank must call `decode_split` with the same latent.
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

    def halo(self, x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
        """x with `pad` rows of each neighbour added along dim (zeros at the frame's edges)."""
        if pad == 0:
            return x
        size = list(x.shape)
        size[dim] = pad
        top, bottom = x.new_zeros(size), x.new_zeros(size)
        ops = []
        if self.rank > 0:
            ops += [dist.P2POp(dist.isend, x.narrow(dim, 0, pad).contiguous(), self.rank - 1),
                    dist.P2POp(dist.irecv, top, self.rank - 1)]
        if self.rank < self.ranks - 1:
            ops += [dist.P2POp(dist.isend, x.narrow(dim, x.shape[dim] - pad, pad).contiguous(), self.rank + 1),
                    dist.P2POp(dist.irecv, bottom, self.rank + 1)]
        for request in dist.batch_isend_irecv(ops):
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


class _TileDecoder:
    """Stands in for vae.decoder during diffusers' tiled decode (AutoencoderKLHunyuanVideo).

    diffusers calls the decoder once per tile, in the same order on every rank; call k belongs to
    rank k % ranks. First pass (every rank): the rank decodes its own tiles (kept in `mine`) and
    answers every call with a meta tensor of the decoded shape, so that diffusers' blending runs on
    nothing and costs nothing. Replay (rank 0, `replay` set): call k answers with tile k, decoded by
    its owner, and diffusers blends the real tiles: the computation of a one-process tiled decode."""

    def __init__(self, decoder, rank: int, ranks: int, temporal: int, spatial: int):
        self.decoder, self.whole = decoder, decoder.forward
        self.rank, self.ranks = rank, ranks
        self.temporal, self.spatial = temporal, spatial
        self.shapes: list[tuple[torch.Size, torch.dtype]] = []  # every decoded tile's, in call order
        self.mine: dict[int, torch.Tensor] = {}
        self.replay: list[torch.Tensor] | None = None
        self.calls = 0

    def decoded_shape(self, tile: torch.Tensor) -> torch.Size:
        batch, _, frames, height, width = tile.shape  # causal in time: frames -> 1 + (frames - 1) * temporal
        return torch.Size((batch, self.decoder.conv_out.conv.out_channels, (frames - 1) * self.temporal + 1,
                           height * self.spatial, width * self.spatial))

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        k, self.calls = self.calls, self.calls + 1
        if self.replay is not None:
            return self.replay[k]
        shape = self.decoded_shape(tile)
        self.shapes.append((shape, tile.dtype))
        if k % self.ranks == self.rank:
            decoded = self.whole(tile)
            if decoded.shape != shape:
                raise RuntimeError(f"tile {k} decoded to {tuple(decoded.shape)}, expected {tuple(shape)}")
            self.mine[k] = decoded
        return torch.empty(shape, dtype=tile.dtype, device="meta")


def _decode_tiles_split(vae, decode: Callable, latent: torch.Tensor, rank: int, ranks: int) -> torch.Tensor | None:
    """diffusers' tiled decode with its tiles shared out among the ranks; rank 0 blends them."""
    decoder = vae.decoder
    tiles = _TileDecoder(decoder, rank, ranks, vae.temporal_compression_ratio, vae.spatial_compression_ratio)
    decoder.forward = tiles
    try:
        param = next(decoder.parameters())
        with torch.no_grad():
            vae.decode(latent.to(device=param.device, dtype=param.dtype))  # this rank's tiles (blended on meta)
        if rank != 0:
            for k in sorted(tiles.mine):
                dist.send(tiles.mine.pop(k).contiguous(), dst=0)
            return None
        received = []
        for k, (shape, dtype) in enumerate(tiles.shapes):
            if k % ranks == 0:
                received.append(tiles.mine.pop(k))
            else:
                received.append(torch.empty(shape, dtype=dtype, device=param.device))
                dist.recv(received[-1], src=k % ranks)
        tiles.replay, tiles.calls = received, 0
        return decode(vae, latent)
    finally:
        del decoder.forward  # back to the class's forward


def decode_split(vae, decode: Callable[[object, torch.Tensor], torch.Tensor], latent: torch.Tensor, rank: int,
                 ranks: int, device: torch.device, scale: int = 8) -> torch.Tensor | None:
    """Decode latent [B, C, T, H, W] across `ranks` ranks of the default group, with the result of
    decode(vae, latent) in one process (for the HunyuanVideo VAE: its tiled decode).

    decode(vae, latent) -> frames [F, h, w, 3] in 0..1 on the CPU (wan_vae.decode_video). Returns
    the frames on rank 0, None elsewhere. Wan-VAE latents with fewer rows than ranks, and HunyuanVideo
    latents that fit one tile, are decoded by rank 0 alone.
    """
    from diffusers import AutoencoderKLHunyuanVideo

    if ranks > 1 and isinstance(vae, AutoencoderKLHunyuanVideo):
        return _decode_tiles_split(vae, decode, latent, rank, ranks)
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

"""Parallel VAE decode and encode: every rank does a part of the video, rank 0 gets the result.

Two ways to decode, each exact with respect to its one-process decode; a model family picks one for its VAE:

- By rows (`decode_rows`): rank r decodes latent rows [a_r, b_r) of every frame. A decoder that is
  local in space except for its padded convolutions and a whole-frame attention is patched by the
  family (a context manager given a RowSplit): before each padded convolution the ranks swap their
  edge rows (RowSplit.halo; zeros at the frame's edges, as the layer's own padding), and the attention
  runs on the all-gathered frame (RowSplit.gather_rows, then my_rows). Per-rank activation memory and
  time are about 1/N of a whole decode (Wan-VAE).
- By tiles (`decode_tiles`): a VAE that decodes in overlapping tiles blended together (diffusers'
  tiled decode) has its tiles shared out among the ranks (TileDecoder) and rank 0 blends them: the
  result is the one-process tiled decode's, time about 1/N (HunyuanVideo VAE).

The encode splits by rows too (`encode_rows`): rank r encodes pixel rows [a_r * s, b_r * s) of every
frame, s being the VAE's pixels per latent row, so that at each stride-2 downsampling every rank's rows
start at an even row and are even in number: a downsampling convolution (padded at the bottom only) then
needs one row from the rank below (RowSplit.halo with no rows from above), and the rest is as the decode.

Every rank of the split must call with the same input. Collectives run on split.group.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class VaeSplit:
    """The ranks sharing a decode: this rank, their number, the compute device and their process group
    (ranks are the group's; None: the default group)."""

    rank: int
    ranks: int
    device: torch.device
    group: object = None

    def peer(self, rank: int) -> int:
        """The global rank of the split's rank `rank` (point-to-point needs global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


class RowSplit:
    """This rank's place in a row split: the split, and every rank's latent row count."""

    def __init__(self, split: VaeSplit, counts: list[int]):
        self.split, self.counts = split, counts
        self.rank, self.ranks, self.device = split.rank, split.ranks, split.device

    def halo(self, x: torch.Tensor, pad: int, dim: int, bottom: int | None = None) -> torch.Tensor:
        """x with `pad` rows of the neighbour above and `bottom` rows (default: pad) of the one below added
        along dim (zeros at the frame's edges, as a layer's own zero padding)."""
        top = pad
        bottom = pad if bottom is None else bottom
        if top == 0 and bottom == 0:
            return x
        size = list(x.shape)
        size[dim] = top
        above_rows = x.new_zeros(size)
        size[dim] = bottom
        below_rows = x.new_zeros(size)
        ops, group = [], self.split.group
        if self.rank > 0:  # the rank above takes my first rows as its bottom halo
            above = self.split.peer(self.rank - 1)
            if bottom:
                ops.append(dist.P2POp(dist.isend, x.narrow(dim, 0, bottom).contiguous(), above, group))
            if top:
                ops.append(dist.P2POp(dist.irecv, above_rows, above, group))
        if self.rank < self.ranks - 1:  # the rank below takes my last rows as its top halo
            below = self.split.peer(self.rank + 1)
            if top:
                ops.append(dist.P2POp(dist.isend, x.narrow(dim, x.shape[dim] - top, top).contiguous(), below, group))
            if bottom:
                ops.append(dist.P2POp(dist.irecv, below_rows, below, group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return torch.cat([above_rows, x, below_rows], dim=dim)

    def gather_rows(self, x: torch.Tensor, dim: int, scale: int) -> torch.Tensor:
        """All ranks' rows along dim (each rank holds counts[r] * scale rows)."""
        most = max(self.counts) * scale
        padded = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, most - x.shape[dim]]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded, group=self.split.group)
        return torch.cat([p.narrow(dim, 0, n * scale) for p, n in zip(parts, self.counts)], dim=dim)

    def my_rows(self, x: torch.Tensor, dim: int, scale: int) -> torch.Tensor:
        start = sum(self.counts[:self.rank]) * scale
        return x.narrow(dim, start, self.counts[self.rank] * scale)


class TileDecoder:
    """Stands in for vae.decoder during diffusers' tiled decode (AutoencoderKLHunyuanVideo, say).

    diffusers calls the decoder once per tile, in the same order on every rank; call k belongs to
    rank k % ranks. First pass (every rank): the rank decodes its own tiles (kept in `mine`) and
    answers every call with a meta tensor of the decoded shape, so that diffusers' blending runs on
    nothing and costs nothing. Replay (rank 0, `replay` set): call k answers with tile k, decoded by
    its owner, and diffusers blends the real tiles: the computation of a one-process tiled decode."""

    def __init__(self, decoder, rank: int, ranks: int, decoded_shape: Callable[[torch.Tensor], torch.Size]):
        self.decoder, self.whole = decoder, decoder.forward
        self.rank, self.ranks = rank, ranks
        self.decoded_shape = decoded_shape  # a latent tile -> the shape its decode has
        self.shapes: list[tuple[torch.Size, torch.dtype]] = []  # every decoded tile's, in call order
        self.mine: dict[int, torch.Tensor] = {}
        self.replay: list[torch.Tensor] | None = None
        self.calls = 0

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


def decode_tiles(vae, decode: Callable, latent: torch.Tensor, split: VaeSplit,
                 decoded_shape: Callable[[torch.Tensor], torch.Size]) -> torch.Tensor | None:
    """decode(vae, latent), a tiled decode that calls vae.decoder once per tile, with its tiles shared
    out among the ranks; rank 0 blends them and returns the frames (None on the other ranks)."""
    def tiled(v, x):
        param = next(v.decoder.parameters())
        return v.decode(x.to(device=param.device, dtype=param.dtype))

    return run_tiles(vae, "decoder", tiled, decode, latent, split, decoded_shape)


def run_tiles(vae, module: str, tiled: Callable, run: Callable, x: torch.Tensor, split: VaeSplit,
              tile_shape: Callable[[torch.Tensor], torch.Size]) -> torch.Tensor | None:
    """run(vae, x), whose tiled(vae, x) calls getattr(vae, module) once per tile (a tiled decode, or a tiled
    encode with module "encoder"), with the tiles shared out among the ranks (TileDecoder); tile_shape(tile):
    what the module makes of a tile. Rank 0 blends them and returns run's result (None on the other ranks)."""
    if split.ranks == 1:
        return run(vae, x)
    decoder = getattr(vae, module)
    tiles = TileDecoder(decoder, split.rank, split.ranks, tile_shape)
    decoder.forward = tiles
    try:
        param = next(decoder.parameters())
        with torch.no_grad():
            tiled(vae, x)  # this rank's tiles (blended on meta)
        if split.rank != 0:
            for k in sorted(tiles.mine):
                dist.send(tiles.mine.pop(k).contiguous(), dst=split.peer(0), group=split.group)
            return None
        received = []
        for k, (shape, dtype) in enumerate(tiles.shapes):
            if k % split.ranks == 0:
                received.append(tiles.mine.pop(k))
            else:
                received.append(torch.empty(shape, dtype=dtype, device=param.device))
                dist.recv(received[-1], src=split.peer(k % split.ranks), group=split.group)
        tiles.replay, tiles.calls = received, 0
        return run(vae, x)
    finally:
        del decoder.forward  # back to the class's forward


def _by_rows(vae, run: Callable, x: torch.Tensor, split: VaeSplit, patch: Callable[[object, RowSplit], AbstractContextManager],
             rows_in: tuple[int, int], rows_out: tuple[int, int]) -> torch.Tensor | None:
    """run(vae, x) with x's latent rows shared out among the ranks and vae patched by patch(vae, rows) for the
    halo exchange: rows_in = (x's row dimension, its rows per latent row), rows_out = the same for run's output,
    which is gathered on rank 0 (None elsewhere). Fewer latent rows than ranks: rank 0 runs alone."""
    (dim_in, scale_in), (dim_out, scale_out) = rows_in, rows_out
    height = x.shape[dim_in] // scale_in
    if split.ranks == 1 or height < split.ranks:
        return run(vae, x) if split.rank == 0 else None
    bounds = row_split(height, split.ranks)
    rows = RowSplit(split, [b - a for a, b in bounds])
    start, end = bounds[split.rank]
    with patch(vae, rows):
        mine = run(vae, x.narrow(dim_in, start * scale_in, (end - start) * scale_in))
    out = rows.gather_rows(mine.to(split.device), dim_out, scale_out)
    return out.cpu() if split.rank == 0 else None


def decode_rows(vae, decode: Callable[[object, torch.Tensor], torch.Tensor], latent: torch.Tensor, split: VaeSplit,
                patch: Callable[[object, RowSplit], AbstractContextManager], scale: int = 8) -> torch.Tensor | None:
    """decode(vae, latent) -> frames [F, H, W, 3] (CPU), with the latent's rows shared out among the ranks
    and vae's decoder patched by patch(vae, rows) for the halo exchange; frames on rank 0, None elsewhere.
    A latent with fewer rows than ranks is decoded by rank 0 alone (the other ranks wait)."""
    return _by_rows(vae, decode, latent, split, patch, rows_in=(3, 1), rows_out=(1, scale))  # frames (F, H, W, 3)


def encode_rows(vae, encode: Callable[[object, torch.Tensor], torch.Tensor], frames: torch.Tensor, split: VaeSplit,
                patch: Callable[[object, RowSplit], AbstractContextManager], scale: int = 8) -> torch.Tensor | None:
    """encode(vae, frames) -> raw latent [1, C, T, H / scale, W / scale] (CPU), frames [F, H, W, 3] (H a multiple
    of scale), with the latent rows shared out among the ranks (rank r encodes pixel rows [a_r * scale, b_r *
    scale)) and vae's encoder patched by patch(vae, rows); the latent on rank 0, None elsewhere. Frames with
    fewer latent rows than ranks are encoded by rank 0 alone (the other ranks wait)."""
    return _by_rows(vae, encode, frames, split, patch, rows_in=(1, scale), rows_out=(3, 1))  # latent (1, C, T, h, w)

"""Splitting a token sequence across the SP ranks and putting it back together.

A sequence of S tokens is padded at its end to a multiple of the SP degree N; rank g holds
tokens [g * S_pad/N, (g+1) * S_pad/N). The padded tokens carry zeros through the blocks and
are excluded from attention (see usp_attention) and dropped when the output is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import SequenceParallel


def padded_length(seq_len: int, degree: int) -> int:
    return -(-seq_len // degree) * degree


def shard_sequence(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    """Pad dim of x to a multiple of sp.degree and return this rank's contiguous slice."""
    if sp.degree == 1:
        return x
    seq_len = x.shape[dim]
    pad = padded_length(seq_len, sp.degree) - seq_len
    if pad:
        pad_shape = list(x.shape)
        pad_shape[dim] = pad
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return x.chunk(sp.degree, dim=dim)[sp.rank].contiguous()


def gather_sequence(x: torch.Tensor, dim: int, sp: SequenceParallel, seq_len: int) -> torch.Tensor:
    """Inverse of shard_sequence: all-gather the shards along dim and drop the padding."""
    if sp.degree == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(sp.degree)]
    dist.all_gather(parts, x.contiguous(), group=sp.group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, seq_len)

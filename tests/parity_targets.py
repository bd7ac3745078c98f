"""Functions run on N gloo ranks by the parity tests (see usp_video.distributed.parallel.spawn)."""

import torch

from usp_video.distributed.parallel.mesh import build_sequence_parallel
from usp_video.distributed.parallel.sharding import gather_sequence, shard_sequence
from usp_video.distributed.parallel.usp_attention import usp_attention


def attention_inputs(seq_len: int, heads: int, head_dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq_len, heads, head_dim, generator=g) for _ in range(3)]


def usp_attention_rank(rank, world_size, ulysses, ring, seq_len, heads, backend="sdpa"):
    sp = build_sequence_parallel(ulysses, ring)
    q, k, v = (shard_sequence(t, 1, sp) for t in attention_inputs(seq_len, heads))
    out = usp_attention(q, k, v, sp, seq_len, backend)
    return {"out": gather_sequence(out, 1, sp, seq_len)}

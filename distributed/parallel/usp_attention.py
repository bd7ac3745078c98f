"""Unified Sequence Parallel attention: Ulysses all-to-all x Ring, exact with padded sequences.

Built on yunchang's primitives (the 4-D all-to-all, RingComm and the log-sum-exp merge); the
attention kernels are ours so that every block can return a correct log-sum-exp on CPU too
(yunchang's TORCH_MATH ring kernel returns an all-zero LSE on CPU, see DESIGN.md section 5).

Padding: a sequence of S tokens is padded at its end to a multiple of the SP degree. After the
Ulysses all-to-all, ring position c holds the contiguous chunk c of the padded sequence, so the
padded keys all sit at the tail of the last chunks. Instead of masking, keys past the valid
length are sliced off before the kernel runs; the result equals unpadded attention exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mesh import SequenceParallel

BACKENDS = ("auto", "sdpa", "flash_attn", "math")


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Pick a concrete attention backend; raises ValueError for an unknown or unusable one."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "sdpa"
    if backend == "flash_attn" and (device.type != "cuda" or not _flash_attn_available()):
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package and a CUDA device; "
                         "use 'sdpa' or 'auto'")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Plain softmax attention. q: (B, Sq, H, D), k/v: (B, Sk, H, D) -> (B, Sq, H, D)."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v)
    if backend == "math":
        out, _ = attention_with_lse(q, k, v, "math")
        return out.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp, for merging ring blocks.

    q: (B, Sq, H, D), k/v: (B, Sk, H, D) -> out (B, Sq, H, D), lse (B, H, Sq) in float32.
    """
    if backend == "flash_attn":
        from flash_attn import flash_attn_func
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
        return out, lse.float()
    if backend == "math":
        # (B, H, Sq, Sk) scores in float32: exact reference, memory heavy.
        scale = q.shape[-1] ** -0.5
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v.float())
        return out, lse
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., : q.shape[1]]  # the efficient kernel pads the LSE to a multiple of 32
    return out.transpose(1, 2), lse.float()


def _valid_in_chunk(chunk: int, chunk_len: int, valid_len: int) -> int:
    return max(0, min(chunk_len, valid_len - chunk * chunk_len))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                   valid_len: int, backend: str = "sdpa") -> torch.Tensor:
    """Ring attention over sp.ring_group, where this rank holds query/key chunk sp.ring_rank.

    q/k/v: (B, L, H, D) with L the chunk length; valid_len counts the unpadded tokens of the
    whole ring sequence (ring_degree * L). Returns (B, L, H, D) in q's dtype.
    """
    chunk_len = q.shape[1]
    if sp.ring_degree == 1:
        valid = min(valid_len, chunk_len)
        return attention(q, k[:, :valid], v[:, :valid], backend)

    from yunchang.ring.utils import RingComm, update_out_and_lse

    comm = RingComm(sp.ring_group)
    out = lse = None
    kv_chunk = sp.ring_rank
    for step in range(sp.ring_degree):
        if step + 1 < sp.ring_degree:  # start passing K/V on before computing with them
            next_k, next_v = comm.send_recv(k.contiguous()), comm.send_recv(v.contiguous())
            comm.commit()
        valid = _valid_in_chunk(kv_chunk, chunk_len, valid_len)
        if valid > 0:
            block_out, block_lse = attention_with_lse(q, k[:, :valid], v[:, :valid], backend)
            out, lse = update_out_and_lse(out, lse, block_out, block_lse)
        if step + 1 < sp.ring_degree:
            comm.wait()
            k, v = next_k, next_v
        kv_chunk = (kv_chunk - 1) % sp.ring_degree  # we receive from the previous ring rank
    return out.to(q.dtype)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                  valid_len: int, backend: str = "sdpa") -> torch.Tensor:
    """Self-attention over a sequence sharded across sp.degree ranks.

    q/k/v: (B, S/N, H, D), this rank's shard (shard index = global SP rank) of a sequence padded
    to S = N * (S/N) whose first valid_len tokens are real. Returns (B, S/N, H, D).
    """
    if sp.ulysses_degree > 1:
        from yunchang.comm.all_to_all import SeqAllToAll4D

        # (B, S/N, H, D) -> (B, S/R, H/U, D): gather the Ulysses group's shards, scatter heads
        q, k, v = (SeqAllToAll4D.apply(sp.ulysses_group, t.contiguous(), 2, 1) for t in (q, k, v))
    out = ring_attention(q, k, v, sp, valid_len, backend)
    if sp.ulysses_degree > 1:
        # (B, S/R, H/U, D) -> (B, S/N, H, D)
        out = SeqAllToAll4D.apply(sp.ulysses_group, out.contiguous(), 1, 2)
    return out

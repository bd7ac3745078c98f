"""Unified Sequence Parallel attention: Ulysses all-to-all x Ring, exact with padded sequences.

Built on yunchang's primitives (the 4-D all-to-all, RingComm and the log-sum-exp merge); the
attention kernels are ours so that every block can return a correct log-sum-exp on CPU too.
Measured with yunchang 0.6.4 on CPU (torch 2.13, gloo): its Ulysses all-to-all is exact (rel. error
2e-7), but its ring with the TORCH_MATH kernel returns an all-zero log-sum-exp, so the ring merge
averages the blocks (rel. error 0.17 at ring degree 2); its TORCH_FLASH / TORCH_EFFICIENT /
basic_pytorch kernels do not run on CPU. torch's _scaled_dot_product_flash_attention_for_cpu returns
a correct log-sum-exp, which attention_with_lse uses; the parity tests check every ring path.

Padding: a sequence of S tokens is padded at its end to a multiple of the SP degree. After the
Ulysses all-to-all, ring position c holds the contiguous chunk c of the padded sequence, so the
padded keys all sit at the tail of the last chunks. Instead of masking, keys past the valid
length are sliced off before the kernel runs; the result equals unpadded attention exactly.
"""

from __future__ import annotations

import torch

from .kernels import BACKENDS, attention, attention_with_lse, eager_outside_compile, resolve_backend  # noqa: F401
from .mesh import SequenceParallel


def _valid_in_chunk(chunk: int, chunk_len: int, valid_len: int) -> int:
    return max(0, min(chunk_len, valid_len - chunk * chunk_len))


class KeyLayout:
    """Which positions of every SP rank's local sequence are real keys (the rest is padding).

    `valid` is a bool tensor (sp.degree, local_len), row g for SP rank g. After the Ulysses
    all-to-all, ring position c holds the local sequences of SP ranks c*U .. c*U+U-1 one after
    another, so its key mask is rows c*U .. c*U+U-1 laid end to end. For each ring chunk we
    keep a selector: everything, a prefix (a free slice), or an index list (a copy).
    """

    def __init__(self, valid: torch.Tensor, sp: SequenceParallel):
        self.valid = valid.bool()
        u = sp.ulysses_degree
        self.selectors = [_selector(self.valid[c * u:(c + 1) * u].flatten()) for c in range(sp.ring_degree)]

    @classmethod
    def tail_padded(cls, valid_len: int, local_len: int, sp: SequenceParallel) -> "KeyLayout":
        """The layout of shard_sequence: one sequence of valid_len real tokens padded at its end."""
        return cls(tail_padding_mask(valid_len, local_len, sp.degree), sp)


def tail_padding_mask(valid_len: int, local_len: int, degree: int) -> torch.Tensor:
    """(degree, local_len) bool: which positions of each rank's shard (shard_sequence) are real."""
    return torch.arange(degree * local_len).view(degree, local_len) < valid_len


def _selector(mask: torch.Tensor) -> slice | torch.Tensor | None:
    count = int(mask.sum())
    if count == 0:
        return None
    if bool(mask[:count].all()):
        return slice(0, count)
    return mask.nonzero().squeeze(1)


def _keys(t: torch.Tensor, selector: slice | torch.Tensor) -> torch.Tensor:
    if isinstance(selector, slice):
        return t[:, selector]
    return t.index_select(1, selector.to(t.device))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                   layout: KeyLayout, backend: str = "sdpa",
                   extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Ring attention over sp.ring_group, where this rank holds query/key chunk sp.ring_rank.

    q/k/v: (B, L, H, D), this rank's chunk; layout says which keys of every chunk are real.
    extra_kv: keys/values that every rank holds whole (joint text tokens), attended once.
    The queries may be longer than the key chunk (joint text queries appended). Returns
    (B, Lq, H, D) in q's dtype.
    """
    out = lse = None

    def attend(keys: torch.Tensor, values: torch.Tensor) -> None:
        nonlocal out, lse
        from yunchang.ring.utils import update_out_and_lse

        out, lse = update_out_and_lse(out, lse, *attention_with_lse(q, keys, values, backend))

    if extra_kv is not None and extra_kv[0].shape[1] > 0:
        attend(*extra_kv)
    if sp.ring_degree == 1:
        selector = layout.selectors[0]
        if selector is not None:
            if out is None:  # the common case: one block, no merge
                return attention(q, _keys(k, selector), _keys(v, selector), backend)
            attend(_keys(k, selector), _keys(v, selector))
        return out.to(q.dtype)

    from yunchang.ring.utils import RingComm

    comm = RingComm(sp.ring_group)
    kv_chunk = sp.ring_rank
    for step in range(sp.ring_degree):
        if step + 1 < sp.ring_degree:  # start passing K/V on before computing with them
            next_k, next_v = comm.send_recv(k.contiguous()), comm.send_recv(v.contiguous())
            comm.commit()
        selector = layout.selectors[kv_chunk]
        if selector is not None:
            attend(_keys(k, selector), _keys(v, selector))
        if step + 1 < sp.ring_degree:
            comm.wait()
            k, v = next_k, next_v
        kv_chunk = (kv_chunk - 1) % sp.ring_degree  # we receive from the previous ring rank
    return out.to(q.dtype)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                  valid: int | KeyLayout, backend: str = "sdpa",
                  joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Self-attention over a sequence sharded across sp.degree ranks (see _usp_attention). Under
    torch.compile (compile.py) one process's attention joins the compiled graph; with several ranks
    the collectives, the ring's point-to-point passes and the key layout run eagerly, between graphs."""
    if sp.degree == 1 and joint is None:  # no collectives, no merge (yunchang's is TorchScript): traceable
        return _usp_attention(q, k, v, sp, valid, backend, joint)
    return _eager_usp_attention(q, k, v, sp, valid, backend, joint)


def _usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                   valid: int | KeyLayout, backend: str = "sdpa",
                   joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Self-attention over a sequence sharded across sp.degree ranks.

    q/k/v: (B, S/N, H, D), this rank's shard (shard index = global SP rank). `valid` is either
    the count of real tokens of a tail-padded sequence (shard_sequence's layout) or a KeyLayout.
    Returns (B, S/N, H, D).

    joint: optional (q, k, v) of tokens every rank holds whole, (B, T, H, D) with all heads
    (HunyuanVideo's text when its length does not divide the degree). They attend to, and are
    attended by, the whole sharded sequence, each counted once; returns (out, joint_out) with
    joint_out (B, T, H, D), the same on every rank up to rounding.
    """
    layout = valid if isinstance(valid, KeyLayout) else KeyLayout.tail_padded(valid, q.shape[1], sp)
    local_len = q.shape[1]
    if sp.ulysses_degree > 1:
        from yunchang.comm.all_to_all import SeqAllToAll4D

        # (B, S/N, H, D) -> (B, S/R, H/U, D): gather the Ulysses group's shards, scatter heads
        q, k, v = (SeqAllToAll4D.apply(sp.ulysses_group, t.contiguous(), 2, 1) for t in (q, k, v))
    extra_kv = None
    if joint is not None:
        heads = q.shape[2]  # this Ulysses rank's heads: block ulysses_rank of the full set
        first = (sp.rank % sp.ulysses_degree) * heads
        jq, jk, jv = (t[:, :, first:first + heads] for t in joint)
        q = torch.cat([q, jq], dim=1)
        extra_kv = (jk, jv)
    out = ring_attention(q, k, v, sp, layout, backend, extra_kv)
    if joint is not None:
        out, joint_out = out[:, :-jq.shape[1]], out[:, -jq.shape[1]:]
        joint_out = _gather_heads(joint_out, sp)
    if sp.ulysses_degree > 1:
        # (B, S/R, H/U, D) -> (B, S/N, H, D)
        out = SeqAllToAll4D.apply(sp.ulysses_group, out.contiguous(), 1, 2)
    assert out.shape[1] == local_len
    return out if joint is None else (out, joint_out)


_eager_usp_attention = eager_outside_compile(_usp_attention)


def _gather_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, T, H/U, D) on every Ulysses rank -> (B, T, H, D)."""
    if sp.ulysses_degree == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(sp.ulysses_degree)]
    dist.all_gather(parts, x.contiguous(), group=sp.ulysses_group)
    return torch.cat(parts, dim=2)

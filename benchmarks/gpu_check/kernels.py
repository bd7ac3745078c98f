"""Section 1: are the attention kernels right on this device? Each backend that imports here, in each dtype,
against an fp64 reference: the output, its log-sum-exp (what Ring attention merges), and a 4-chunk ring merge
with a padded last chunk, done in one process with the same merge code the ranks use.

Report key "kernels": one row per (backend, dtype) with relative errors, or "error" where the kernel raised.
"""

from __future__ import annotations

import torch

from .common import Context, backends_available, rel


def run(ctx: Context) -> list[dict]:
    from usp_video.distributed.parallel.kernels import HALF_ONLY, NO_LSE
    from usp_video.distributed.parallel.usp_attention import attention, attention_with_lse

    seq, heads, dim = (300, 4, 32) if ctx.small else (4096, 12, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    reference = tuple(torch.randn(1, seq, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    ref_out, ref_lse = attention_with_lse(*reference, "math")
    rows = []
    half = [torch.bfloat16, torch.float16] if ctx.device.type == "cuda" else [torch.bfloat16]
    for backend in backends_available(ctx):
        for dtype in [torch.float32] + half:
            if backend in HALF_ONLY and dtype == torch.float32:
                continue
            q, k, v = (t.to(ctx.device, dtype) for t in reference)
            row = {"backend": backend, "dtype": str(dtype).removeprefix("torch.")}
            try:
                if backend in NO_LSE:  # no log-sum-exp, never merged: the plain output only
                    row["plain_rel_err"] = rel(attention(q, k, v, backend), ref_out)
                else:
                    out, lse = attention_with_lse(q, k, v, backend)
                    row["out_rel_err"] = rel(out, ref_out)
                    row["lse_max_abs_err"] = float((lse.double().cpu() - ref_lse).abs().max())
                    row["plain_rel_err"] = rel(attention(q, k, v, backend), ref_out)
                    row["ring_merge_rel_err"] = _ring_merge_error(q, k, v, reference, backend)
            except Exception as exc:  # report, do not stop the run
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def _ring_merge_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: tuple, backend: str) -> float:
    """What the ranks do, in one process: the keys and values in 4 chunks, the last one padded and the last 3
    tokens invalid, each chunk attended and merged by its log-sum-exp; the error against the fp64 reference
    over the valid tokens."""
    from yunchang.ring.utils import update_out_and_lse

    from usp_video.distributed.parallel.usp_attention import _valid_in_chunk, attention_with_lse

    _, seq, heads, dim = q.shape
    chunks, valid_len = 4, seq - 3
    chunk_len = -(-seq // chunks)
    pad = chunk_len * chunks - seq
    kp = torch.cat([k, k.new_zeros(1, pad, heads, dim)], 1)
    vp = torch.cat([v, v.new_zeros(1, pad, heads, dim)], 1)
    merged = lse_acc = None
    for c in range(chunks):
        n = _valid_in_chunk(c, chunk_len, valid_len)
        if n:
            kc = kp[:, c * chunk_len: c * chunk_len + n]
            vc = vp[:, c * chunk_len: c * chunk_len + n]
            block_out, block_lse = attention_with_lse(q, kc, vc, backend)
            merged, lse_acc = update_out_and_lse(merged, lse_acc, block_out, block_lse)
    q64, k64, v64 = reference
    ref_valid, _ = attention_with_lse(q64, k64[:, :valid_len], v64[:, :valid_len], "math")
    return rel(merged, ref_valid)


def show(rows: list[dict], ctx: Context) -> None:
    print(f"{'kernel':<12}{'dtype':<10}{'out err':>10}{'lse err':>10}{'ring err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<12}{r['dtype']:<10}  {r['error']}")
        elif "out_rel_err" not in r:
            print(f"{r['backend']:<12}{r['dtype']:<10}{r['plain_rel_err']:>10.1e}{'(no LSE)':>10}{'-':>10}")
        else:
            print(f"{r['backend']:<12}{r['dtype']:<10}{r['out_rel_err']:>10.1e}{r['lse_max_abs_err']:>10.1e}"
                  f"{r['ring_merge_rel_err']:>10.1e}")

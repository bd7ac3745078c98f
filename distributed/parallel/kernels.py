"""Attention kernels: which backends exist, which one runs here, and the calls themselves.

Ring attention merges its blocks by their log-sum-exp (LSE), so a backend is usable with ring > 1
only if it returns one. sdpa (torch), flash_attn and math do; sageattention (PyPI 1.0.6: INT8 Q.K,
fp16 P.V, Triton) does not, so it runs only where the ring degree is 1 (pure Ulysses, or one rank),
and any call that must merge blocks there (HunyuanVideo's whole-text keys) runs sdpa instead, said
once in the log. flash_attn and sageattention need a CUDA GPU and bf16/fp16; on CPU "auto" is sdpa.

"auto" on CUDA takes the first usable backend of AUTO_ORDER_CUDA. That order is a guess from the
kernels' published speeds, not yet measured by us on a GPU (benchmarks/gpu_check.py times them).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys

import torch
import torch.nn.functional as F

log = logging.getLogger("usp_video")

BACKENDS = ("auto", "sdpa", "flash_attn", "sageattention", "math")
PACKAGES = {"flash_attn": "flash-attn", "sageattention": "sageattention"}  # backend -> pip package
NO_LSE = ("sageattention",)  # no log-sum-exp: ring degree 1 only
HALF_ONLY = ("flash_attn", "sageattention")  # bf16 / fp16 inputs only
AUTO_ORDER_CUDA = ("sageattention", "flash_attn", "sdpa")  # not yet measured on a GPU


def installed(backend: str) -> bool:
    """Is the package a third-party backend needs importable (sdpa and math always are)?"""
    return backend not in PACKAGES or importlib.util.find_spec(backend) is not None


def unusable(backend: str, device: torch.device | str, dtype: torch.dtype, ring_degree: int = 1) -> str | None:
    """Why `backend` (a concrete one) cannot run here, or None when it can."""
    device = torch.device(device)
    if backend in PACKAGES and device.type != "cuda":
        return f"attention '{backend}' needs a CUDA GPU (this group runs on {device.type})"
    if not installed(backend):
        return f"attention '{backend}' needs the {PACKAGES[backend]} package (pip install {PACKAGES[backend]})"
    if backend in HALF_ONLY and dtype not in (torch.bfloat16, torch.float16):
        return f"attention '{backend}' runs in bf16 or fp16 only, not {str(dtype).removeprefix('torch.')}"
    if backend in NO_LSE and ring_degree > 1:
        return (f"attention '{backend}' returns no log-sum-exp, which Ring attention needs to merge its blocks, "
                f"so it runs only with ring 1 (ulysses = the ranks), not ring {ring_degree}")
    return None


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                    ring_degree: int = 1) -> str:
    """The concrete backend that runs: `backend` itself, or for "auto" the first usable one (sdpa on
    CPU). ValueError naming the valid choices for an unknown or unusable one."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        order = AUTO_ORDER_CUDA if torch.device(device).type == "cuda" else ("sdpa",)
        return next(b for b in order if unusable(b, device, dtype, ring_degree) is None)
    reason = unusable(backend, device, dtype, ring_degree)
    if reason is not None:
        usable = [b for b in BACKENDS[1:] if unusable(b, device, dtype, ring_degree) is None]
        raise ValueError(f"{reason}: use attention 'auto' or one of {', '.join(usable)} here")
    return backend


def eager_outside_compile(fn):
    """fn, kept out of torch.compile's graphs (torch.compiler.disable) when anything may be compiling. The
    disabled wrapper is built on the first call made once torch._dynamo is imported: importing it costs about
    1 s, which a process that never compiles (every rank without `compile`, ComfyUI itself) never pays."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:  # torch.compile never imported: nothing can be compiling
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return call


# The third-party kernels run outside torch.compile's graphs (compile.py compiles the blocks around them).
@eager_outside_compile
def _flash_attn(q, k, v, with_lse: bool):
    from flash_attn import flash_attn_func

    if not with_lse:
        return flash_attn_func(q, k, v)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out, lse.float()


@eager_outside_compile
def _sageattention(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)  # (B, S, H, D) in and out


_sdpa_for_lse_said = False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Plain softmax attention. q: (B, Sq, H, D), k/v: (B, Sk, H, D) -> (B, Sq, H, D)."""
    if backend == "flash_attn":
        return _flash_attn(q, k, v, with_lse=False)
    if backend == "sageattention":
        return _sageattention(q, k, v)
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
    global _sdpa_for_lse_said
    if backend == "flash_attn":
        return _flash_attn(q, k, v, with_lse=True)
    if backend in NO_LSE:
        if not _sdpa_for_lse_said:
            log.info("usp-video: attention '%s' returns no log-sum-exp; attention that merges blocks (whole-text "
                     "keys) runs sdpa", backend)
            _sdpa_for_lse_said = True
        backend = "sdpa"
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

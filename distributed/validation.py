"""Checks of sampler inputs, shared by the client side (api.py) and the ranks (worker.py), so that
a bad request is refused with a message naming the input, wherever it comes from."""

from __future__ import annotations

import math

import torch

from .sampling.samplers import SAMPLERS

LATENT_CHANNELS = 16
MAX_SEED = 2**64 - 1


def check_latent(latent: torch.Tensor, name: str = "latent") -> None:
    if isinstance(latent, torch.Tensor) and not latent.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {latent.dtype}")
    if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"{name} must be a video latent [batch, 16, frames, height/8, width/8], got {shape}; "
                         "use an empty video latent node (e.g. EmptyHunyuanLatentVideo)")
    if latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{name} has {latent.shape[1]} channels; Wan 2.1 latents have {LATENT_CHANNELS}, "
                         "as do HunyuanVideo's "
                         "(was it made for another model?)")
    if latent.shape[3] % 2 or latent.shape[4] % 2:
        raise ValueError(f"{name} is {latent.shape[4] * 8}x{latent.shape[3] * 8} pixels; width and height must "
                         "be multiples of 16")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_conditioning(cond: torch.Tensor, name: str, text_dim: int | None) -> None:
    if isinstance(cond, torch.Tensor) and not cond.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {cond.dtype}")
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[1] < 1:
        shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"{name} must be text embeddings [batch, tokens, dim], got {shape}")
    if text_dim is not None and cond.shape[2] != text_dim:
        raise ValueError(f"{name} has dimension {cond.shape[2]} but the model expects {text_dim} "
                         "(Wan 2.1 uses the umt5-xxl text encoder; HunyuanVideo the llava-llama-3 one)")
    if not torch.isfinite(cond).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_pooled(pooled, name: str, cond: torch.Tensor | None) -> None:
    """HunyuanVideo's pooled CLIP-L vector: [batch or 1, dim], batch agreeing with its tokens."""
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or not pooled.is_floating_point():
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"{name} must be the pooled CLIP-L output [batch, 768], got {shape}")
    if cond is not None and pooled.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"{name} has batch {pooled.shape[0]} for conditioning of batch {cond.shape[0]}")
    if not torch.isfinite(pooled).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_guidance(guidance) -> None:
    if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)
            and 0.0 <= guidance <= 100.0):
        raise ValueError(f"guidance (HunyuanVideo's embedded guidance) must be in 0..100, got {guidance!r}")


def check_sampling(*, seed: int, steps: int, cfg: float, shift: float, sampler: str, denoise: float) -> None:
    problems = []
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 10000:
        problems.append(f"steps must be an integer in 1..10000, got {steps!r}")
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and 0.0 <= cfg <= 100.0):
        problems.append(f"cfg must be in 0..100, got {cfg!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and 0.0 < shift <= 100.0):
        problems.append(f"shift must be in (0, 100], got {shift!r}")
    if sampler not in SAMPLERS:
        problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not (isinstance(denoise, (int, float)) and 0.0 < denoise <= 1.0):
        problems.append(f"denoise must be in (0, 1], got {denoise!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_sample_tensors(positive, negative, latent, text_dim: int | None = None) -> None:
    """All tensor inputs of a sample request, including batch agreement."""
    check_latent(latent, "latent_image")
    check_conditioning(positive, "positive", text_dim)
    if negative is not None:
        check_conditioning(negative, "negative", text_dim)
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None and cond.shape[0] not in (1, latent.shape[0]):
            raise ValueError(f"{name} has batch {cond.shape[0]} for a latent batch of {latent.shape[0]}")

"""Client-side operations shared by the ComfyUI nodes and the CLI: validate, then ask the group.

Everything here runs in the calling process (ComfyUI or the CLI) and never imports
torch.distributed; bad input is rejected here, with a message naming the input, before the
group sees it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .client import GroupConfig, get_group
from .models.checkpoint import read_header
from .models.wan import infer_wan_config
from .sampling.samplers import SAMPLERS

LATENT_CHANNELS = 16
MAX_SEED = 2**64 - 1


def check_dit_file(path: str | Path) -> dict:
    """Fail fast, in the calling process, on a file that is not a Wan 2.1 T2V DiT."""
    path = Path(path)
    if path.is_dir():
        return {}
    shapes, metadata = read_header(path)
    return infer_wan_config(path, shapes, metadata)


def load_dit(group: GroupConfig, path: str | Path) -> dict:
    """Load the DiT on every rank; returns heads, layers, text_dim and the chosen degrees."""
    check_dit_file(path)
    info, _ = get_group(group).request({"type": "load_dit", "path": str(path)})
    return info


def encode_text(group: GroupConfig, path: str | Path, prompt: str) -> torch.Tensor:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    _, out = get_group(group).request({"type": "encode", "path": str(path), "prompt": prompt})
    return out["cond"]


def check_latent(latent: torch.Tensor, name: str = "latent") -> None:
    if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"{name} must be a video latent [batch, 16, frames, height/8, width/8], got {shape}; "
                         "use an empty video latent node (e.g. EmptyHunyuanLatentVideo)")
    if latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{name} has {latent.shape[1]} channels; Wan 2.1 latents have {LATENT_CHANNELS} "
                         "(was it made for another model?)")
    if latent.shape[3] % 2 or latent.shape[4] % 2:
        raise ValueError(f"{name} is {latent.shape[4] * 8}x{latent.shape[3] * 8} pixels; width and height must "
                         "be multiples of 16")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_conditioning(cond: torch.Tensor, name: str, text_dim: int | None) -> None:
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[1] < 1:
        shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"{name} must be text embeddings [batch, tokens, dim], got {shape}")
    if text_dim is not None and cond.shape[2] != text_dim:
        raise ValueError(f"{name} has dimension {cond.shape[2]} but the model expects {text_dim} "
                         "(Wan 2.1 uses the umt5-xxl text encoder)")
    if not torch.isfinite(cond).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_sampling(*, seed: int, steps: int, cfg: float, shift: float, sampler: str, denoise: float) -> None:
    problems = []
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if not isinstance(steps, int) or not 1 <= steps <= 10000:
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


def sample(group: GroupConfig, dit: str | Path, *, positive: torch.Tensor, negative: torch.Tensor | None,
           latent: torch.Tensor, seed: int, steps: int, cfg: float, shift: float, sampler: str = "unipc",
           denoise: float = 1.0, text_dim: int | None = None,
           on_progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None,
           preview: bool = False, fault: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Sample a raw-space latent on the group. Raises client.Interrupted when cancelled.

    on_progress gets {"step", "total", "elapsed"} after every step, plus "x0" (the first frame of
    the current denoised estimate, [1, 16, 1, H/8, W/8], normalised space) when preview is set."""
    check_latent(latent, "latent_image")
    check_conditioning(positive, "positive", text_dim)
    if negative is not None:
        check_conditioning(negative, "negative", text_dim)
    check_sampling(seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler, denoise=denoise)
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None and cond.shape[0] not in (1, latent.shape[0]):
            raise ValueError(f"{name} has batch {cond.shape[0]} for a latent batch of {latent.shape[0]}")
    header = {"type": "sample", "dit": str(dit), "seed": seed, "steps": steps, "cfg": cfg, "shift": shift,
              "sampler": sampler, "denoise": denoise, "preview": bool(preview)}
    if fault is not None:
        header["fault"] = fault
    tensors = {"positive": positive.float(), "latent": latent.float()}
    if negative is not None:
        tensors["negative"] = negative.float()
    info, out = get_group(group).request(header, tensors, on_progress=on_progress, should_cancel=should_cancel)
    return out["latent"], info


def decode(group: GroupConfig, vae: str | Path, latent: torch.Tensor) -> torch.Tensor:
    """Raw-space latent -> IMAGE frames [frames, H, W, 3] in 0..1."""
    check_latent(latent, "samples")
    _, out = get_group(group).request({"type": "decode", "path": str(vae)}, {"latent": latent.float()})
    return out["frames"]

"""Client-side operations shared by the ComfyUI nodes and the CLI: validate, then ask the group.

Everything here runs in the calling process (ComfyUI or the CLI) and never imports
torch.distributed; bad input is rejected here, with a message naming the input, before the
group sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .client import GroupConfig, UspGroup, get_group
from .models import families
from .validation import MAX_SEED, check_guidance, check_latent, check_pooled, check_sample_tensors, check_sampling

__all__ = ["MAX_SEED", "load_dit", "encode_text", "encode_hunyuan_text", "sample", "decode", "check_dit_file"]


def _group(group: GroupConfig | UspGroup) -> UspGroup:
    """The running group for a config (launched or reused), or an attached group as it is."""
    return group if isinstance(group, UspGroup) else get_group(group)


def check_dit_file(path: str | Path) -> tuple[families.Family, dict]:
    """Fail fast, in the calling process, on a file that is not a Wan 2.1 or HunyuanVideo T2V DiT;
    returns its family and (for single files) its config."""
    return families.check_dit_file(path)


def load_dit(group: GroupConfig | UspGroup, path: str | Path, family: str | None = None) -> dict:
    """Load the DiT on every rank; returns its family, heads, layers, text_dim and the chosen degrees.
    With `family` ("wan2.1", "hunyuan-video"), a file of the other family is refused by name."""
    found, _ = check_dit_file(path)
    if family is not None and found.name != family:
        wanted = families.FAMILIES[family]
        raise ValueError(f"{Path(path).name} is a {found.label} model, not {wanted.label}; load it with the "
                         f"USP {found.label} loader (or pick a {wanted.label} file)")
    info, _ = _group(group).request({"type": "load_dit", "path": str(path)})
    return info


def encode_text(group: GroupConfig | UspGroup, path: str | Path, prompt: str) -> torch.Tensor:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    _, out = _group(group).request({"type": "encode", "path": str(path), "prompt": prompt})
    return out["cond"]


def encode_hunyuan_text(group: GroupConfig | UspGroup, llama: str | Path, clip: str | Path, tokenizers: str | Path,
                        prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanVideo's text encoding: (Llama tokens [1, n, 4096], CLIP-L pooled [1, 768])."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    _, out = _group(group).request({"type": "encode_hunyuan", "llama": str(llama), "clip": str(clip),
                                    "tokenizers": str(tokenizers), "prompt": prompt})
    return out["cond"], out["pooled"]


def sample(group: GroupConfig | UspGroup, dit: str | Path, *, positive: torch.Tensor, negative: torch.Tensor | None,
           latent: torch.Tensor, seed: int, steps: int, cfg: float, shift: float, sampler: str = "unipc",
           denoise: float = 1.0, text_dim: int | None = None, positive_pooled: torch.Tensor | None = None,
           negative_pooled: torch.Tensor | None = None, guidance: float = 6.0,
           on_progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None,
           preview: bool = False, fault: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Sample a raw-space latent on the group. Raises client.Interrupted when cancelled.

    on_progress gets {"step", "total", "elapsed"} after every step, plus "x0" (the first frame of
    the current denoised estimate, [1, 16, 1, H/8, W/8], normalised space) when preview is set."""
    check_sample_tensors(positive, negative, latent, text_dim)
    check_sampling(seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler, denoise=denoise)
    check_guidance(guidance)
    header = {"type": "sample", "dit": str(dit), "seed": seed, "steps": steps, "cfg": cfg, "shift": shift,
              "sampler": sampler, "denoise": denoise, "preview": bool(preview), "guidance": float(guidance)}
    if fault is not None:
        header["fault"] = fault
    tensors = {"positive": positive.float(), "latent": latent.float()}
    if negative is not None:
        tensors["negative"] = negative.float()
    for name, pooled, cond in (("positive_pooled", positive_pooled, positive),
                               ("negative_pooled", negative_pooled, negative)):
        if pooled is not None:
            check_pooled(pooled, name, cond)
            tensors[name] = pooled.float()
    info, out = _group(group).request(header, tensors, on_progress=on_progress, should_cancel=should_cancel)
    return out["latent"], info


def decode(group: GroupConfig | UspGroup, vae: str | Path, latent: torch.Tensor) -> torch.Tensor:
    """Raw-space latent -> IMAGE frames [frames, H, W, 3] in 0..1."""
    check_latent(latent, "samples")
    _, out = _group(group).request({"type": "decode", "path": str(vae)}, {"latent": latent.float()})
    return out["frames"]

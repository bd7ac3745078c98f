"""Client-side operations shared by the ComfyUI nodes and the CLI: validate, then ask the group.

Everything here runs in the calling process (ComfyUI or the CLI) and never imports
torch.distributed; bad input is rejected here, with a message naming the input, before the
group sees it. The requests are those of requests.py; model families are known only through
models/family.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import models
from .client import UspGroup
from .config import GroupConfig
from .registry import get_group
from .requests import Cond, DecodeRequest, EncodeRequest, EncodeVideoRequest, LoadRequest, SampleRequest
from .validation import MAX_SEED, check_frames, check_latent, check_sample_request

__all__ = ["MAX_SEED", "load_dit", "encode", "sample", "decode", "encode_video", "encode_start_image", "check_dit_file", "check_model_files",
           "SampleRequest"]


def _group(group: GroupConfig | UspGroup) -> UspGroup:
    """The running group for a config (launched or reused), or an attached group as it is."""
    return group if isinstance(group, UspGroup) else get_group(group)


def check_dit_file(path: str | Path, family: str | None = None) -> tuple[models.ModelFamily, dict]:
    """Fail fast, in the calling process, on a file that is no family's DiT (or, with `family`, not
    that family's); returns its family and (for single files) its config."""
    return models.check_dit_file(path, family)


def check_model_files(paths: list[str], family: str | None = None) -> tuple[models.ModelFamily, list[str]]:
    """The DiT files of one model (one file, or a family's experts in order): their family and the
    warnings to show; CheckpointError/ValueError names a file that does not fit."""
    if family is None:
        found, _ = check_dit_file(paths[0])
        if found.experts:
            raise ValueError(f"{Path(paths[0]).name} looks like a {found.label} expert; name the family "
                             f"and give its experts ({', '.join(found.experts)})")
    else:
        found = models.get(family)
    configs = []
    for one in paths:
        try:
            other, config = check_dit_file(one)
        except models.CheckpointError:
            other = None  # not a file any family claims: the named family's own check says why
        if other is not None and not models.same_latent_space(other.name, found.name) and other is not found:
            raise ValueError(f"{Path(one).name} is a {other.label} model, not {found.label}; load it with the "
                             f"USP {other.label} loader (or pick a {found.label} file)")
        configs.append(check_dit_file(one, found.name)[1])
    return found, found.check_experts(paths, configs)


def load_dit(group: GroupConfig | UspGroup, path: str | Path | list, family: str | None = None) -> dict:
    """Load a DiT (or the experts of one model, a list, in the family's expert order) on every rank,
    freeing any other; returns the first one's family, heads, layers, text_dim and the chosen degrees,
    and "warnings". With `family` (a family's name), a file of another family is refused by name."""
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    found, warnings = check_model_files(paths, family)
    info, _ = _group(group).request(*LoadRequest(paths=paths, family=found.name).to_frame())
    return {**info, "warnings": warnings}


def encode(group: GroupConfig | UspGroup, family: str, files: dict[str, str | Path], prompt: str) -> Cond:
    """A prompt's conditioning with a family's text encoder, made of `files` ({text input: path}, the
    family's text_parts): {"tokens": [1, L, D], ...the family's other tensors}."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    found = models.get(family)
    missing = [part.input for part in found.text_parts if not files.get(part.input)]
    if missing:
        raise ValueError(f"{found.label} text encoding needs {', '.join(missing)}")
    request = EncodeRequest(family=family, files={k: str(v) for k, v in files.items()}, prompt=prompt)
    _, out = _group(group).request(*request.to_frame())
    return out


def sample(group: GroupConfig | UspGroup, request: SampleRequest, *, text_dim: int | None = None,
           on_progress: Callable[[dict], None] | None = None,
           should_cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, dict]:
    """Sample a raw-space latent on the group. Raises client.Interrupted when cancelled.

    on_progress gets {"step", "total", "elapsed"} after every step, plus "x0" (the first frame of
    the current denoised estimate, [1, C, 1, h, w], normalised space) when request.preview is set."""
    request.check_experts()
    family, _ = check_dit_file(request.experts[0], request.family)
    check_sample_request(request, family, text_dim)
    info, out = _group(group).request(*request.to_frame(), on_progress=on_progress, should_cancel=should_cancel)
    return out["latent"], info


def decode(group: GroupConfig | UspGroup, vae: str | Path, latent: torch.Tensor,
           family: str | None = None, on_progress: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Raw-space latent -> IMAGE frames [frames, H, W, 3] in 0..1. With `family` (the family whose
    sampler made the latent), a VAE of another family is refused before anything runs. on_progress
    gets {"step", "total", "elapsed"} after each latent frame (Wan VAEs) or tile (HunyuanVideo's)."""
    check_latent(latent, "samples")
    vae_family = models.detect_vae(vae)
    if family is not None and not models.same_latent_space(vae_family.name, family):
        made_by = models.get(family)
        raise ValueError(f"samples were made by a {made_by.label} model, but {Path(vae).name} is the "
                         f"{vae_family.label} VAE; pick the {made_by.label} VAE")
    check_latent(latent, "samples", vae_family, check_size=False)
    _, out = _group(group).request(*DecodeRequest(path=str(vae), latent=latent).to_frame(), on_progress=on_progress)
    return out["frames"]



def encode_start_image(group: GroupConfig | UspGroup, vae: str | Path, image: torch.Tensor, width: int, height: int,
                       length: int) -> dict[str, torch.Tensor]:
    """A Wan image-to-video start image (IMAGE [n, H, W, C]) as WanImageToVideo turns it into conditioning: the
    start video (models/video.start_video) encoded by the group's Wan 2.1 VAE, and its mask
    ({"concat_latent_image", "concat_mask"})."""
    from .models.video import start_mask, start_video

    concat, family = encode_video(group, vae, start_video(image, width, height, length))
    if concat.shape[1] != 16:
        raise ValueError(f"vae: {models.get(family).label} latents have {concat.shape[1]} channels; Wan image to video "
                         "uses the Wan 2.1 VAE (16 channels): load wan_2.1_vae.safetensors")
    mask = start_mask(min(image.shape[0], length), concat.shape[2], *concat.shape[-2:])
    return {"concat_latent_image": concat, "concat_mask": mask}


def encode_video(group: GroupConfig | UspGroup, vae: str | Path, frames: torch.Tensor,
                 on_progress: Callable[[dict], None] | None = None) -> tuple[torch.Tensor, str]:
    """IMAGE frames [F, H, W, 3] in 0..1 (one video; F = 1 + 4k, sizes in multiples of the VAE's pixels per
    latent row) -> (its raw-space latent [1, C, (F - 1) / 4 + 1, H / s, W / s], the VAE's family name). The
    latent is the one ComfyUI's VAE Encode gives with the same VAE file. on_progress gets {"step", "total",
    "elapsed"} after each latent frame."""
    family = models.detect_vae(vae)
    if not family.vae_encodes:
        family.encode(None, frames, None)  # its refusal, by name
    check_frames(frames, "pixels", family)
    _, out = _group(group).request(*EncodeVideoRequest(path=str(vae), frames=frames).to_frame(), on_progress=on_progress)
    return out["latent"], family.name

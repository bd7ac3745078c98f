"""Client-side operations shared by the ComfyUI nodes and the CLI: validate, then ask the group.

Everything here runs in the calling process (ComfyUI or the CLI) and never imports
torch.distributed; bad input is rejected here, with a message naming the input, before the
group sees it. The requests are those of requests.py; model families are known only through
models/family.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import models
from .client import UspGroup
from .config import GroupConfig
from .registry import get_group
from .requests import Cond, DecodeRequest, EncodeRequest, EncodeVideoRequest, LoadRequest, SampleRequest
from .validation import MAX_SEED, check_frames, check_latent, check_sample_inputs

__all__ = ["MAX_SEED", "load_dit", "encode", "sample", "decode", "encode_video", "encode_start_image", "check_dit_file",
           "check_model", "check_model_files", "CheckedModel", "SampleRequest"]


def _group(group: GroupConfig | UspGroup) -> UspGroup:
    """The running group for a config (launched or reused), or an attached group as it is."""
    return group if isinstance(group, UspGroup) else get_group(group)


def check_dit_file(path: str | Path, family: str | None = None) -> tuple[models.ModelFamily, dict]:
    """Fail fast, in the calling process, on a file that is no family's DiT (or, with `family`, not
    that family's); returns its family and (for single files) its config."""
    return models.check_dit_file(path, family)


@dataclass(frozen=True)
class CheckedModel:
    """The DiT files of one model, checked in the calling process (check_model): their family, found once
    and handed on to load_dit, sample and the start-image conditioning; each file's config ({} for a
    folder); the warnings to show."""

    family: models.ModelFamily
    paths: list[str]
    configs: list[dict]
    warnings: list[str]


def check_model(paths: list[str], family: str | None = None) -> CheckedModel:
    """The DiT files of one model (one file, or a family's experts in order), checked: CheckpointError/
    ValueError names a file that does not fit. Each file's header is read once for the detection and, only
    where the named family is not the one its tensors say (Wan 2.2 A14B's experts), once more for its checks."""
    paths = [str(p) for p in paths]
    if family is None and len(paths) > 1:
        return _check_experts(paths)
    detected = {}  # {path: (family, config)} found from the tensors alone
    if family is None:
        found, _ = detected[paths[0]] = check_dit_file(paths[0])
        if found.experts:
            raise ValueError(f"{Path(paths[0]).name} looks like a {found.label} expert; name the family "
                             f"and give its experts ({', '.join(found.experts)})")
    else:
        found = models.get(family)
    configs = []
    for one in paths:
        try:
            other, config = detected[one] if one in detected else check_dit_file(one)
        except models.CheckpointError:
            other = None  # not a file any family claims: the named family's own check says why
        if other is not None and not models.same_latent_space(other.name, found.name) and other is not found:
            raise ValueError(f"{Path(one).name} is a {other.label} model, not {found.label}; load it with the "
                             f"USP {other.label} loader (or pick a {found.label} file)")
        configs.append(config if other is found else check_dit_file(one, found.name)[1])
    return CheckedModel(found, paths, configs, found.check_experts(paths, configs))


def _check_experts(paths: list[str]) -> CheckedModel:
    """Several DiT files and no family named: the model of the family made of that many experts whose checks
    the files pass (the first, in the families' order); the first family's reason when none takes them."""
    families = [f for f in models.FAMILIES.values() if len(f.experts) == len(paths)]
    if not families:
        raise ValueError(f"{len(paths)} diffusion model files were given; no model family is made of "
                         f"{len(paths)} experts (give one file)")
    errors = []
    for found in families:
        try:
            return check_model(paths, found.name)
        except (models.CheckpointError, ValueError) as exc:
            errors.append(exc)
    raise errors[0]


def check_model_files(paths: list[str], family: str | None = None) -> tuple[models.ModelFamily, list[str]]:
    """The DiT files of one model (one file, or a family's experts in order): their family and the
    warnings to show; CheckpointError/ValueError names a file that does not fit."""
    checked = check_model(paths, family)
    return checked.family, checked.warnings


def load_dit(group: GroupConfig | UspGroup, path: str | Path | list | CheckedModel, family: str | None = None,
             keep: list[str] | None = None) -> dict:
    """Load a DiT (or the experts of one model, a list, in the family's expert order) on every rank,
    freeing any other; returns the first one's family, heads, layers, text_dim and the chosen degrees,
    and "warnings". With `family` (a family's name), a file of another family is refused by name. A
    CheckedModel (check_model's) is loaded as it was checked."""
    if isinstance(path, CheckedModel):
        checked = path
    else:
        checked = check_model([str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)], family)
    request = LoadRequest(paths=checked.paths, family=checked.family.name, keep=[str(p) for p in keep or []])
    info, _ = _group(group).request(*request.to_frame())
    return {**info, "warnings": checked.warnings}


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
           should_cancel: Callable[[], bool] | None = None,
           on_start: Callable[[], None] | None = None,
           family: models.ModelFamily | None = None) -> tuple[torch.Tensor, dict]:
    """Sample a raw-space latent on the group. Raises client.Interrupted when cancelled.

    on_progress gets {"step", "total", "elapsed"} after every step, plus "x0" (the first frame of
    the current denoised estimate, [1, C, 1, h, w], normalised space) when request.preview is set.
    `family`: the model's, where the caller found it already (check_model); else it is read from the
    first expert's file, once. on_start() runs once the group has loaded the models and begins the first step.
    A Cancel (should_cancel) stops the ranks before the next DiT block; one the group does not answer within
    client.CANCEL_GRACE_S stops the group (Interrupted, group_stopped)."""
    request.check_experts()
    if family is None:
        family, _ = check_dit_file(request.experts[0], request.family)
    check_sample_inputs(request, family, text_dim)
    info, out = _group(group).request(*request.to_frame(), on_progress=on_progress, should_cancel=should_cancel,
                                      on_start=on_start)
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
                       length: int, *, family: str) -> dict[str, torch.Tensor]:
    """An image-to-video start image (IMAGE [n, H, W, C]) as `family` (a family's name) conditions on it, its
    frames encoded by the group's split VAE encode (ModelFamily.start_image_conditioning)."""

    def encode(frames: torch.Tensor) -> tuple[torch.Tensor, models.ModelFamily]:
        latent, vae_family = encode_video(group, vae, frames)
        return latent, models.get(vae_family)

    return models.get(family).start_image_conditioning(encode, image, width, height, length)


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

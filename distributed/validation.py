"""Checks of sampler inputs, shared by the client side (api.py) and the ranks (worker.py), so that
a bad request is refused with a message naming the input, wherever it comes from. What differs
between model families (latent channels, sizes, text dimension, extra conditioning) comes from the
family (models/family.py)."""

from __future__ import annotations

import math

import torch

from .models import FAMILIES
from .sampling.samplers import SAMPLERS
from .sampling.step_cache import CacheSettings

MAX_SEED = 2**64 - 1


def check_latent(latent: torch.Tensor, name: str = "latent", family=None, check_size: bool = True) -> None:
    """A video latent [B, C, T, H, W]: floating, finite; with a family, its channels, and its size
    unless check_size is off (a VAE decodes any size; the DiT needs whole patches)."""
    channels = family.latent_channels if family is not None else "C"
    if isinstance(latent, torch.Tensor) and not latent.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {latent.dtype}")
    if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        pixels = family.spatial_compression if family is not None else "s"
        raise ValueError(f"{name} must be a video latent [batch, {channels}, frames, height/{pixels}, width/{pixels}], "
                         f"got {shape}; "
                         "use an empty video latent node (e.g. EmptyHunyuanLatentVideo)")
    if family is not None:
        if latent.shape[1] != family.latent_channels:
            raise ValueError(f"{name} has {latent.shape[1]} channels; {family.label} latents have "
                             f"{family.latent_channels} (was it made for another model?)")
        pixels = family.spatial_compression  # pixels per latent row/column
        step = family.pixel_multiple // pixels
        if check_size and (latent.shape[3] % step or latent.shape[4] % step):
            raise ValueError(f"{name} is {latent.shape[4] * pixels}x{latent.shape[3] * pixels} "
                             f"pixels; width and height must be multiples of {family.pixel_multiple}")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_noise_mask(mask, latent_shape: tuple[int, ...], family) -> None:
    """A LATENT's noise_mask for a sampler: a family that takes one (ModelFamily.takes_noise_mask), a float
    tensor [1 or B, 1 or C, T, H, W] at the latent's frames, rows and columns (what its noise_mask_node
    makes; ComfyUI would resample another size, which is not done here), values in 0..1."""
    if not family.takes_noise_mask:
        takers = [f for f in FAMILIES.values() if f.takes_noise_mask]
        makers = "".join(f"{node}'s start image, " for node in dict.fromkeys(f.noise_mask_node for f in takers))
        starts = " or ".join(dict.fromkeys(f.start_image_node for f in FAMILIES.values() if f.start_image_node))
        owners = " and ".join(f"{f.label}'s" for f in takers)
        raise ValueError(f"latent_image has a noise_mask (masked sampling: {makers}SetLatentNoiseMask, ...), and "
                         f"{family.label} samplers do not take one ({owners} do). For a start image use {starts} "
                         "with an image-to-video model; else sample an empty latent without a mask")
    batch, channels, *size = latent_shape
    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.dim() != 5 or \
            mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, channels) or list(mask.shape[2:]) != size:
        raise ValueError(f"latent_image's noise_mask is {shape} for a latent of {tuple(latent_shape)}: the "
                         f"{family.label} sampler takes a float mask [1 or {batch}, 1 or {channels}, "
                         f"{', '.join(map(str, size))}] (the latent's frames, rows and columns), as "
                         f"{family.noise_mask_node} makes it with the latent's width, height and length")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("latent_image's noise_mask must hold values in 0..1 (1: sample, 0: keep the latent), got "
                         f"{float(mask.min()):g}..{float(mask.max()):g}")


def check_video_size(width: int, height: int, frames: int, multiple: int) -> None:
    """A video size from the command line (--width, --height, --frames): width and height in multiples of
    the family's pixel_multiple, 1 + 4k frames."""
    problems = []
    if width < multiple or width % multiple:
        problems.append(f"--width {width} must be a positive multiple of {multiple} (e.g. {multiple * 52})")
    if height < multiple or height % multiple:
        problems.append(f"--height {height} must be a positive multiple of {multiple} (e.g. {multiple * 30})")
    if frames < 1 or (frames - 1) % 4:
        problems.append(f"--frames {frames} must be 4k+1 (1, 5, 9, ..., 81)")
    if problems:
        raise ValueError("; ".join(problems))


def check_frames(frames: torch.Tensor, name: str, family) -> None:
    """IMAGE frames to encode as one video [F, H, W, 3] in 0..1 with a family's VAE: F = 1 + 4k (the Wan VAEs
    take the first frame, then 4 at a time: ComfyUI's VAE Encode drops the frames past the last whole 4),
    H and W multiples of the VAE's pixels per latent row (ComfyUI's crops them), floating and finite."""
    if isinstance(frames, torch.Tensor) and not frames.is_floating_point():
        raise ValueError(f"{name} must be a floating-point IMAGE, got {frames.dtype}")
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{name} must be video frames [frames, height, width, 3] (an IMAGE), got {shape}")
    count, height, width = frames.shape[:3]
    if count % 4 != 1:
        lower = count - (count - 1) % 4  # the whole 1 + 4k frames ComfyUI would encode of them
        fix = f"trim to {lower} or extend to {lower + 4} frames" if count else "give at least 1 frame"
        raise ValueError(f"{name} has {count} frames; the {family.label} VAE encodes 1 + 4k frames (1, 5, 9, ..., 81): "
                         f"{fix} (ComfyUI's VAE Encode would drop the frames past the last whole 4)")
    s = family.spatial_compression
    if height % s or width % s or not height or not width:
        fit = f"{width // s * s}x{height // s * s}" if height >= s and width >= s else f"at least {s}x{s}"
        raise ValueError(f"{name} is {width}x{height} pixels; the {family.label} VAE encodes widths and heights in "
                         f"multiples of {s}: crop or scale to {fit} (ComfyUI's VAE Encode would crop)")
    if not torch.isfinite(frames).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_conditioning(cond: dict, name: str, family=None, text_dim: int | None = None) -> None:
    """One side of the conditioning: {"tokens": [batch, tokens, dim], ...the family's other tensors}."""
    if not isinstance(cond, dict) or "tokens" not in cond:
        raise ValueError(f"{name} must be conditioning with text embeddings, got {type(cond).__name__}")
    tokens = cond["tokens"]
    if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1] < 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be text embeddings [batch, tokens, dim], got {shape}")
    if text_dim is not None and tokens.shape[2] != text_dim:
        hint = f" ({family.text_encoder_hint})" if family is not None else ""
        raise ValueError(f"{name} has dimension {tokens.shape[2]} but the model expects {text_dim}{hint}")
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if family is not None:
        unknown = set(cond) - set(family.cond_keys)
        if unknown:
            raise ValueError(f"{name} has tensors {', '.join(sorted(unknown))} that {family.label} does not take "
                             f"(its conditioning: {', '.join(family.cond_keys)}){_whose(unknown, family)}")
        family.check_conditioning(cond, name)


def _whose(keys: set[str], family) -> str:
    """Where keys that one other family alone takes come from: its conditioning node (messages)."""
    from .models import FAMILIES

    owners = {}
    for key in sorted(keys):
        takers = [f for f in FAMILIES.values() if key in f.cond_keys]
        if len(takers) == 1 and takers[0] is not family:
            owners.setdefault(takers[0], []).append(key)
    return "".join(f"; {', '.join(k)} come from {f.start_image_node or 'its nodes'} ({f.label} models only)"
                   for f, k in owners.items())


def check_sampling(*, seed: int, steps: int, cfg, shift: float, sampler: str, denoise: float) -> None:
    problems = []
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 10000:
        problems.append(f"steps must be an integer in 1..10000, got {steps!r}")
    for scale in (cfg if isinstance(cfg, (list, tuple)) else [cfg]):
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0.0 <= scale <= 100.0):
            problems.append(f"cfg must be in 0..100, got {scale!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and 0.0 < shift <= 100.0):
        problems.append(f"shift must be in (0, 100], got {shift!r}")
    if sampler not in SAMPLERS:
        problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not (isinstance(denoise, (int, float)) and 0.0 < denoise <= 1.0):
        problems.append(f"denoise must be in (0, 1], got {denoise!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_sample_request(request, family, text_dim: int | None = None) -> dict[str, float]:
    """Every input of a SampleRequest (requests.py) for a model of `family`; returns its options with
    the family's defaults filled in."""
    request.check_experts()
    return check_sample_inputs(request, family, text_dim)


def check_sample_inputs(request, family, text_dim: int | None = None) -> dict[str, float]:
    """check_sample_request less the experts' check, for a caller that made it already (to find the family)."""
    check_latent(request.latent, "latent_image", family)
    check_conditioning(request.positive, "positive", family, text_dim)
    if request.negative is not None:
        check_conditioning(request.negative, "negative", family, text_dim)
    for name, cond in (("positive", request.positive), ("negative", request.negative)):
        if cond is not None and cond["tokens"].shape[0] not in (1, request.latent.shape[0]):
            raise ValueError(f"{name} has batch {cond['tokens'].shape[0]} for a latent batch of {request.latent.shape[0]}")
    if request.noise_mask is not None:
        check_noise_mask(request.noise_mask, tuple(request.latent.shape), family)
    check_sampling(seed=request.seed, steps=request.steps, cfg=request.cfg, shift=request.shift,
                   sampler=request.sampler, denoise=request.denoise)
    CacheSettings.from_dict(request.cache)
    return family.check_options(request.options)

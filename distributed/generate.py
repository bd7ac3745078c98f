"""The generate pipeline of the command line: model files and a prompt -> a latent, a video.

`usp-video generate` and `usp-video demo` (cli.py) both run it: `check` refuses bad input in this process,
before any group starts (its messages name the command line's flags), then `generate` loads the DiT,
encodes the prompts (and a start image), samples and writes the outputs on a group, through the same
client operations as the ComfyUI nodes (api.py). The model's family is found once, by `check`, and handed
on (api.CheckedModel).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import api, models
from .client import UspGroup
from .config import GroupConfig
from .media import save_latent, write_video
from .requests import SampleRequest
from .validation import check_video_size


@dataclass(frozen=True)
class Settings:
    """What to make and how to sample it; None: the family's default."""

    width: int = 832
    height: int = 480
    frames: int = 33
    negative: str | None = None  # the negative prompt (used when cfg != 1)
    steps: int | None = None
    cfg: str | None = None  # one scale, or one per expert ("4.0,3.0")
    shift: float | None = None
    seed: int = 0
    sampler: str | None = None
    cache: str | None = None  # METHOD:THRESHOLD
    boundary: float | None = None  # where two experts switch
    options: dict[str, float] = field(default_factory=dict)  # the family's own sampler inputs
    image: str | None = None  # a start image file, for an image-to-video model
    fps: float = 16.0
    out: str | None = None  # the video file (.webp, .gif)
    save_latent: str | None = None  # the latent file (ComfyUI's SaveLatent format)
    conditioning: dict = field(default_factory=dict)  # tensors added to both sides (the demo's synthetic inputs)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def dit_paths(family: models.ModelFamily | None, files: dict[str, str | None]) -> list[str]:
    """The DiT files of the model: files["dit"], or a family's experts (files[expert], in their order)."""
    if family is not None and family.experts:
        paths = [files.get(name) for name in family.experts]
        missing = [_flag(name) for name, path in zip(family.experts, paths) if not path]
        flags = " and ".join(_flag(name) for name in family.experts)
        if files.get("dit"):
            raise ValueError(f"{family.label} is made of {len(family.experts)} experts: give {flags} instead of --dit")
        if missing:
            raise ValueError(f"{family.label} is made of {len(family.experts)} experts: give {flags} "
                             f"(missing: {', '.join(missing)})")
        return paths
    if not files.get("dit"):
        raise ValueError("give the diffusion model with --dit (or --model for a family of experts)")
    return [files["dit"]]


def check(family: str | None, files: dict[str, str | None], settings: Settings) -> api.CheckedModel:
    """Everything that can be refused before a group starts: the DiT files (their family found here, once),
    the video size, the text encoder files. Prints the model's warnings."""
    named = models.get(family) if family is not None else None
    checked = api.check_model(dit_paths(named, files), family)
    check_video_size(settings.width, settings.height, settings.frames, checked.family.pixel_multiple)
    for warning in checked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    parts = checked.family.text_parts
    missing = [_flag(part.input) for part in parts if not files.get(part.input)]
    if missing:
        what = "; ".join(f"{_flag(p.input)}: {p.help}" for p in parts)
        plural = "s" if len(parts) > 1 else ""
        raise ValueError(f"{Path(checked.paths[0]).name} is a {checked.family.label} model: give its text "
                         f"encoder{plural} with {', '.join(missing)} ({what})")
    return checked


def generate(group: GroupConfig | UspGroup, ranks: int, model: api.CheckedModel, files: dict[str, str | None],
             prompt: str, settings: Settings) -> Path | None:
    """Load, encode, sample and write on the group (`ranks` ranks); returns the video's path, if written."""
    family = model.family
    started = time.monotonic()
    info = api.load_dit(group, model)
    print(f"model: {info['model']}, {info['layers']} layers, {info['heads']} heads; {ranks} rank(s): "
          f"ulysses={info['ulysses']} x ring={info['ring']}; weights per rank "
          f"{info['parameter_bytes'] / 2**20:.1f} MiB{' (sharded)' if info['sharded'] else ''}", flush=True)
    cfg = cfg_scales(settings.cfg, family)
    positive, negative = _conditioning(group, model, files, prompt, settings, cfg)
    pixels = family.spatial_compression
    latent = torch.zeros(1, family.latent_channels, (settings.frames - 1) // 4 + 1, settings.height // pixels,
                         settings.width // pixels)
    request = SampleRequest(experts=model.paths, boundaries=_boundaries(model, settings), family=family.name,
                            positive=positive, negative=negative, latent=latent, seed=settings.seed,
                            steps=family.defaults.steps if settings.steps is None else settings.steps, cfg=cfg,
                            shift=family.defaults.shift if settings.shift is None else settings.shift,
                            sampler=settings.sampler or family.defaults.sampler, options=settings.options,
                            cache=cache_settings(settings.cache))
    samples, reply = api.sample(group, request, text_dim=info["text_dim"], on_progress=_show_step, family=family)
    if "cache" in reply:
        print(f"step cache ({reply['cache']['method']}) skipped steps {reply['cache']['skipped_steps']}")
    out = _write(group, files.get("vae"), samples, family, settings)
    print(f"done in {time.monotonic() - started:.1f} s")
    return out


def _conditioning(group, model: api.CheckedModel, files: dict, prompt: str, settings: Settings,
                  cfg: float | list[float]) -> tuple[dict, dict | None]:
    """The prompt's and (where a cfg scale is not 1) the negative prompt's conditioning, with the start image's."""
    family = model.family
    text = {part.input: files.get(part.input) for part in family.text_parts}
    positive = api.encode(group, family.name, text, prompt)
    uses_negative = any(scale != 1.0 for scale in (cfg if isinstance(cfg, list) else [cfg]))
    negative_prompt = settings.negative if settings.negative is not None else family.defaults.negative_prompt
    negative = api.encode(group, family.name, text, negative_prompt) if uses_negative else None
    if settings.conditioning:
        positive = {**positive, **settings.conditioning}
        negative = None if negative is None else {**negative, **settings.conditioning}
    if settings.image:
        start = start_conditioning(group, model, files.get("vae"), settings)
        positive = {**positive, **start}
        negative = None if negative is None else {**negative, **start}
    return positive, negative


def _boundaries(model: api.CheckedModel, settings: Settings) -> list[float]:
    if settings.boundary is None:
        return list(model.family.defaults.boundaries)
    if len(model.paths) != 2:
        raise ValueError(f"--boundary is where two experts switch; {model.family.label} has {len(model.paths)} DiT")
    return [settings.boundary]


def _show_step(event: dict) -> None:
    per_step = event["elapsed"] / event["step"]
    skipped = f"  ({event['skipped']} skipped by the step cache)" if "skipped" in event else ""
    print(f"step {event['step']}/{event['total']}  {per_step:.2f} s/step  "
          f"ETA {per_step * (event['total'] - event['step']):.0f} s{skipped}", flush=True)


def _write(group, vae: str | None, samples: torch.Tensor, family: models.ModelFamily,
           settings: Settings) -> Path | None:
    if settings.save_latent:
        save_latent(samples, Path(settings.save_latent))
        print(f"latent: {settings.save_latent}")
    if not settings.out:
        return None
    out = write_video(api.decode(group, vae, samples, family=family.name), Path(settings.out), settings.fps)
    print(f"video: {out.resolve()}")
    return out


def start_conditioning(group, model: api.CheckedModel, vae: str | None, settings: Settings) -> dict:
    """--image: the start image as the family's image-to-video conditioning (for Wan, as WanImageToVideo makes
    it), encoded by the group's split VAE encode. For image-to-video models that need no CLIP vision features
    (Wan 2.2 I2V A14B): the command line does not compute them."""
    import numpy as np
    from PIL import Image

    try:
        model.family.check_start_image_model(model.configs[0], Path(model.paths[0]).name)
    except ValueError as exc:
        raise ValueError(f"--image: {exc}") from None
    if not vae:
        raise ValueError("--image needs the VAE (--vae) to encode the start image")
    try:
        with Image.open(settings.image) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image: cannot read {settings.image} as an image ({exc})") from None
    return api.encode_start_image(group, vae, pixels, settings.width, settings.height, settings.frames,
                                  family=model.family.name)


def cache_settings(text: str | None) -> dict:
    """--cache METHOD:THRESHOLD (teacache:0.2, fbcache:0.1, magcache:0.12) -> the request's cache setting."""
    from .sampling.step_cache import CacheSettings

    if not text:
        return {}
    method, _, threshold = text.partition(":")
    try:
        settings = {"method": method, "threshold": float(threshold or 0.1)}
    except ValueError:
        raise ValueError(f"--cache must be METHOD:THRESHOLD like fbcache:0.1, got {text!r}") from None
    CacheSettings.from_dict(settings)
    return settings


def cfg_scales(text: str | None, family: models.ModelFamily) -> float | list[float]:
    """--cfg: one scale, or one per expert ("4.0,3.0"); default: the family's."""
    if text is None:
        scales = family.defaults.cfg_list()
    else:
        try:
            scales = [float(part) for part in str(text).split(",")]
        except ValueError:
            raise ValueError(f"--cfg {text!r}: give a number, or one per expert separated by commas") from None
    experts = max(len(family.experts), 1)
    if len(scales) not in (1, experts):
        raise ValueError(f"--cfg lists {len(scales)} scales; {family.label} takes one, or one per expert ({experts})")
    return scales[0] if len(scales) == 1 else scales

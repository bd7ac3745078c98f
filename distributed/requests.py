"""The requests the group serves, defined once: the api builds them, the protocol carries them, the
worker rebuilds them (`from_frame`) and the engine runs them.

On the wire a request is a JSON header (its "type" and its plain fields) plus named tensors
(protocol.py), both generated from the dataclass fields (request_fields.py: a field is a header
field, a tensor or a conditioning by its declaration). A conditioning is a dict of tensors: "tokens"
[B, L, D] and whatever else its model family uses (HunyuanVideo: "pooled_output" [B, 768]); it travels as
"positive.tokens", "positive.pooled_output", ...
Family-defined sampler inputs travel in "options" and are checked by the family.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .request_fields import Cond, WireRequest, cond, header, tensor


def _check_paths(paths: list) -> None:
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError("request field 'paths' must list at least one DiT file")


def _check_files(files: dict) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError("request field 'files' must map text-encoder inputs to file paths")


def _lora_paths(loras: list) -> list:
    """The LoRA chains with their files as plain strings (a chain may name a Path)."""
    return [[[os.fspath(p), s] for p, s in chain] for chain in loras]


@dataclass(kw_only=True)
class LoadRequest(WireRequest):
    """Load DiTs on every rank and keep them for the next requests (the experts of one model: all
    resident, so a switch between them costs no reload); DiTs not named are freed. The reply
    describes the first."""

    type: str = field(default="load_dit", init=False)
    paths: list[str] = header(check=_check_paths)
    family: str | None = None  # the family to load them as (files that look alike: see models.detect_dit)
    keep: list[str] = field(default_factory=list)  # other DiTs to leave loaded if they are (not freed, not loaded)


@dataclass(kw_only=True)
class EncodeRequest(WireRequest):
    """Encode a prompt with a family's text encoder, made of the files in `files` ({text input: path})."""

    type: str = field(default="encode", init=False)
    family: str
    files: dict[str, str] = header(check=_check_files)
    prompt: str


@dataclass(kw_only=True)
class SampleRequest(WireRequest):
    """One sampler call.

    experts: the DiT files; with more than one, expert i runs the steps whose sigma is >= boundaries[i]
    and below boundaries[i-1] (one boundary between two experts). cfg: one scale, or one per expert.
    positive/negative: conditionings (see module docstring), batch 1 or the latent's; latent: raw VAE
    space [B, C, T, H, W]; options: the family's own sampler inputs (HunyuanVideo: guidance).
    family: the family to run the experts as (None: detected from the files); keep: other DiTs of the
    same model to keep loaded (the other expert of a two-sampler layout), loaded if missing.

    start_step, end_step, add_noise, leftover_noise: ComfyUI KSamplerAdvanced's start_at_step,
    end_at_step, add_noise and return_with_leftover_noise, with its meaning: of the `steps`-step
    schedule only steps start_step..end_step run; without add_noise the latent is taken as already
    noised to the first sigma; with leftover_noise the result keeps the noise of its last sigma (in
    ComfyUI's LATENT convention, so a native sampler can go on from it).
    cache: a step cache for this run (sampling/step_cache.py CacheSettings), {} for none.
    loras: per expert (in the order of `experts`), its LoRAs as [[LoRA file, strength], ...], applied on every
    rank (formats/lora.py); [] for none.
    max_step_s: refuse (ValueError, before the first step) a step that the pre-flight estimates to take longer
    (preflight.Preflight.check_step_time); 0 for no limit.
    noise_mask: a LATENT's noise_mask (1 where the sampler samples, 0 where the latent stays: a start image), as
    ComfyUI's KSampler applies it (KSamplerX0Inpaint), for families that take one (ModelFamily.takes_noise_mask)."""

    type: str = field(default="sample", init=False)
    positive: Cond = cond()  # first: a frame without it is refused for that, whatever else is wrong
    experts: list[str]
    boundaries: list[float] = field(default_factory=list)
    negative: Cond | None = cond(optional=True)
    latent: torch.Tensor = tensor()
    seed: int
    steps: int
    cfg: float | list[float]
    shift: float
    sampler: str = header(default="unipc", required=True)  # a frame names its sampler
    denoise: float = 1.0
    options: dict[str, float] = field(default_factory=dict)
    preview: bool = header(default=False, encode=bool)
    family: str | None = None
    keep: list[str] = field(default_factory=list)
    start_step: int = 0
    end_step: int | None = None
    add_noise: bool = True
    leftover_noise: bool = False
    cache: dict = field(default_factory=dict)  # a step cache: {"method", "threshold", "start", "end"} (step_cache.py)
    loras: list = header(default_factory=list, encode=_lora_paths)  # per expert: [[LoRA file, strength], ...]
    # a LATENT's noise_mask [1|B, 1|C, T, H, W] (validation.check_noise_mask)
    noise_mask: torch.Tensor | None = tensor(optional=True)
    # the longest a step may take by the step-time pre-flight's estimate, in seconds (the USP Group node's
    # max_step_s); 0: no limit
    max_step_s: float = 0.0
    # test-only fault injection (honoured only by groups started to allow it)
    fault: dict | None = header(default=None, checked=False)

    def __post_init__(self):
        if isinstance(self.experts, (str, os.PathLike)):
            self.experts = [self.experts]
        if isinstance(self.experts, (list, tuple)):
            self.experts = [os.fspath(e) if isinstance(e, os.PathLike) else e for e in self.experts]
        if isinstance(self.keep, (list, tuple)):
            self.keep = [os.fspath(e) if isinstance(e, os.PathLike) else e for e in self.keep]
        if not isinstance(self.positive, dict):  # a bare tensor: the tokens alone
            self.positive = {"tokens": self.positive}
        if self.negative is not None and not isinstance(self.negative, dict):
            self.negative = {"tokens": self.negative}

    def cfg_for(self, expert: int) -> float:
        return self.cfg[expert] if isinstance(self.cfg, (list, tuple)) else self.cfg

    def expert_at(self, sigma: float) -> int:
        """The expert that runs a step at this sigma: the first one while the step's timestep (sigma x
        1000, rounded to 1/1000 so that a float32 sigma of 0.9 counts as 0.9) is >= boundary x 1000."""
        timestep = round(float(sigma) * 1000, 3)
        return sum(1 for b in self.boundaries if timestep < round(b * 1000, 3))

    def check_experts(self) -> None:
        problems = []
        if not self.experts or not all(isinstance(e, str) for e in self.experts):
            problems.append("experts must list at least one DiT file")
        if len(self.boundaries) != max(len(self.experts) - 1, 0):
            problems.append(f"{len(self.experts)} experts need {len(self.experts) - 1} boundaries, "
                            f"got {len(self.boundaries)}")
        if any(not (isinstance(b, (int, float)) and 0.0 < b < 1.0) for b in self.boundaries) or \
                list(self.boundaries) != sorted(self.boundaries, reverse=True):
            problems.append(f"boundaries must be sigmas in (0, 1), decreasing, got {self.boundaries}")
        if isinstance(self.cfg, (list, tuple)) and len(self.cfg) != len(self.experts):
            problems.append(f"cfg lists {len(self.cfg)} scales for {len(self.experts)} experts")
        if not isinstance(self.keep, list) or not all(isinstance(e, str) for e in self.keep):
            problems.append("keep must list DiT files")
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            problems.append(f"start_at_step must be an integer >= 0, got {self.start_step!r}")
        if self.end_step is not None and (not isinstance(self.end_step, int) or isinstance(self.end_step, bool)
                                          or self.end_step < 0):
            problems.append(f"end_at_step must be an integer >= 0, got {self.end_step!r}")
        if not isinstance(self.loras, list) or (self.loras and len(self.loras) != len(self.experts)) or not all(
                isinstance(chain, list) and all(isinstance(item, (list, tuple)) and len(item) == 2
                                                and isinstance(item[0], str) and isinstance(item[1], (int, float))
                                                and not isinstance(item[1], bool) and math.isfinite(item[1])
                                                for item in chain) for chain in self.loras):
            problems.append("loras must give each expert a list of [LoRA file, finite strength] pairs, got "
                            f"{str(self.loras)[:200]}")
        for name in ("add_noise", "leftover_noise"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(kw_only=True)
class DecodeRequest(WireRequest):
    """Decode a raw latent to frames with a VAE file."""

    type: str = field(default="decode", init=False)
    path: str
    latent: torch.Tensor = tensor()


@dataclass(kw_only=True)
class EncodeVideoRequest(WireRequest):
    """Encode IMAGE frames [F, H, W, 3] in 0..1 (one video) to a raw latent with a VAE file."""

    type: str = field(default="encode_video", init=False)
    path: str
    frames: torch.Tensor = tensor()


REQUESTS = {r.__dataclass_fields__["type"].default: r
            for r in (LoadRequest, EncodeRequest, SampleRequest, DecodeRequest, EncodeVideoRequest)}

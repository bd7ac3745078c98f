"""The requests the group serves, defined once: the api builds them, the protocol carries them, the
worker rebuilds them (`from_frame`) and the engine runs them.

On the wire a request is a JSON header (its "type" and its plain fields) plus named tensors
(protocol.py). A conditioning is a dict of tensors: "tokens" [B, L, D] and whatever else its model
family uses (HunyuanVideo: "pooled_output" [B, 768]); it travels as "positive.tokens", "positive.pooled_output", ...
Family-defined sampler inputs travel in "options" and are checked by the family.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

Cond = dict[str, torch.Tensor]


def _field(header: dict, name: str, kind, default=...):
    """A field of a request header, of the right type, or a ValueError naming it."""
    if name not in header and default is not ...:
        return default
    value = header.get(name)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"request field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _tensor(tensors: dict, name: str) -> torch.Tensor:
    value = tensors.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"request tensor {name!r} is missing")
    return value


def cond_tensors(prefix: str, cond: Cond | None) -> dict[str, torch.Tensor]:
    """{"tokens": t, "pooled_output": p} -> {"positive.tokens": t, "positive.pooled_output": p} (float32)."""
    return {} if cond is None else {f"{prefix}.{k}": v.float() for k, v in cond.items()}


def cond_from(prefix: str, tensors: dict) -> Cond | None:
    cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return cond or None


@dataclass(kw_only=True)
class LoadRequest:
    """Load DiTs on every rank and keep them for the next requests (the experts of one model: all
    resident, so a switch between them costs no reload); DiTs not named are freed. The reply
    describes the first."""

    paths: list[str]
    family: str | None = None  # the family to load them as (files that look alike: see models.detect_dit)
    type: str = field(default="load_dit", init=False)

    def to_frame(self) -> tuple[dict, dict]:
        return {"type": self.type, "paths": list(self.paths), "family": self.family}, {}

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "LoadRequest":
        paths = _field(header, "paths", list)
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError("request field 'paths' must list at least one DiT file")
        return cls(paths=paths, family=_field(header, "family", (str, type(None)), None))


@dataclass(kw_only=True)
class EncodeRequest:
    """Encode a prompt with a family's text encoder, made of the files in `files` ({text input: path})."""

    family: str
    files: dict[str, str]
    prompt: str
    type: str = field(default="encode", init=False)

    def to_frame(self) -> tuple[dict, dict]:
        return {"type": self.type, "family": self.family, "files": dict(self.files), "prompt": self.prompt}, {}

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "EncodeRequest":
        files = _field(header, "files", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("request field 'files' must map text-encoder inputs to file paths")
        return cls(family=_field(header, "family", str), files=files, prompt=_field(header, "prompt", str))


@dataclass(kw_only=True)
class SampleRequest:
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
    noise_mask: a LATENT's noise_mask (1 where the sampler samples, 0 where the latent stays: a start image), as
    ComfyUI's KSampler applies it (KSamplerX0Inpaint), for families that take one (ModelFamily.takes_noise_mask)."""

    experts: list[str]
    positive: Cond
    negative: Cond | None
    latent: torch.Tensor
    seed: int
    steps: int
    cfg: float | list[float]
    shift: float
    sampler: str = "unipc"
    denoise: float = 1.0
    boundaries: list[float] = field(default_factory=list)
    options: dict[str, float] = field(default_factory=dict)
    preview: bool = False
    family: str | None = None
    keep: list[str] = field(default_factory=list)
    start_step: int = 0
    end_step: int | None = None
    add_noise: bool = True
    leftover_noise: bool = False
    loras: list = field(default_factory=list)  # per expert: [[LoRA file, strength], ...]
    cache: dict = field(default_factory=dict)  # a step cache: {"method", "threshold", "start", "end"} (step_cache.py)
    noise_mask: torch.Tensor | None = None  # a LATENT's noise_mask [1|B, 1|C, T, H, W] (validation.check_noise_mask)
    fault: dict | None = None  # test-only fault injection (honoured only by groups started to allow it)
    type: str = field(default="sample", init=False)

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

    def to_frame(self) -> tuple[dict, dict]:
        header = {"type": self.type, "experts": list(self.experts), "boundaries": list(self.boundaries),
                  "seed": self.seed, "steps": self.steps, "cfg": self.cfg, "shift": self.shift,
                  "sampler": self.sampler, "denoise": self.denoise, "options": dict(self.options),
                  "preview": bool(self.preview), "family": self.family, "keep": list(self.keep),
                  "start_step": self.start_step, "end_step": self.end_step, "add_noise": self.add_noise,
                  "leftover_noise": self.leftover_noise, "cache": dict(self.cache),
                  "loras": [[[os.fspath(p), s] for p, s in chain] for chain in self.loras]}
        if self.fault is not None:
            header["fault"] = self.fault
        tensors = {"latent": self.latent.float(), **cond_tensors("positive", self.positive),
                   **cond_tensors("negative", self.negative)}
        if self.noise_mask is not None:
            tensors["noise_mask"] = self.noise_mask.float()
        return header, tensors

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "SampleRequest":
        positive = cond_from("positive", tensors)
        if positive is None:
            raise ValueError("request tensor 'positive.tokens' is missing")
        cfg = _field(header, "cfg", (int, float, list))
        return cls(experts=_field(header, "experts", list), boundaries=_field(header, "boundaries", list, []),
                   positive=positive, negative=cond_from("negative", tensors), latent=_tensor(tensors, "latent"),
                   seed=_field(header, "seed", int), steps=_field(header, "steps", int), cfg=cfg,
                   shift=_field(header, "shift", (int, float)), sampler=_field(header, "sampler", str),
                   denoise=_field(header, "denoise", (int, float), 1.0), options=_field(header, "options", dict, {}),
                   preview=_field(header, "preview", bool, False),
                   family=_field(header, "family", (str, type(None)), None), keep=_field(header, "keep", list, []),
                   start_step=_field(header, "start_step", int, 0),
                   end_step=_field(header, "end_step", (int, type(None)), None),
                   add_noise=_field(header, "add_noise", bool, True),
                   leftover_noise=_field(header, "leftover_noise", bool, False),
                   cache=_field(header, "cache", dict, {}), loras=_field(header, "loras", list, []),
                   fault=header.get("fault"), noise_mask=tensors.get("noise_mask"))


@dataclass(kw_only=True)
class DecodeRequest:
    """Decode a raw latent to frames with a VAE file."""

    path: str
    latent: torch.Tensor
    type: str = field(default="decode", init=False)

    def to_frame(self) -> tuple[dict, dict]:
        return {"type": self.type, "path": self.path}, {"latent": self.latent.float()}

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "DecodeRequest":
        return cls(path=_field(header, "path", str), latent=_tensor(tensors, "latent"))


@dataclass(kw_only=True)
class EncodeVideoRequest:
    """Encode IMAGE frames [F, H, W, 3] in 0..1 (one video) to a raw latent with a VAE file."""

    path: str
    frames: torch.Tensor
    type: str = field(default="encode_video", init=False)

    def to_frame(self) -> tuple[dict, dict]:
        return {"type": self.type, "path": self.path}, {"frames": self.frames.float()}

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "EncodeVideoRequest":
        return cls(path=_field(header, "path", str), frames=_tensor(tensors, "frames"))


REQUESTS = {r.__dataclass_fields__["type"].default: r
            for r in (LoadRequest, EncodeRequest, SampleRequest, DecodeRequest, EncodeVideoRequest)}

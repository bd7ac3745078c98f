"""What a model family is, for everything outside its package.

A family (Wan 2.1, HunyuanVideo, ...) is one package under models/ whose `FAMILY` is an instance of
a `ModelFamily` subclass. The engine, the worker, the api, the CLI, the planner, validation, the nodes'
shared code and parallel/ use only this interface and never ask which family they hold; models/__init__.py
lists the families and tells them apart by their files. Families share code through helpers (checkpoint,
fp8, parallel/), not branches. The base class holds no family's facts: what one family does (Wan's VAE
call counts, its start image, its plan variants) is in that family's package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..parallel.vae_split import VaeSplit
from ..formats.checkpoint import CheckpointError


@dataclass(frozen=True)
class TextPart:
    """One file of a family's text encoding (Wan: the UMT5 file; HunyuanVideo: Llama, CLIP-L, tokenizers).

    `input` names the file in an encode request and on the command line (--text-encoder);
    `load(path, dtype, device, shard)` reads it; `shard_units(model) -> blocks` says how FSDP shards its
    torch model (each block, then the model), where it can be. shard is None, or shard(model) when the
    engine shards the part: the loader calls it on its model, on the meta device where it streams the
    file (formats/streamed.py), so that each rank reads only its shards."""

    input: str
    help: str
    load: Callable[[str, torch.dtype, torch.device, Callable[[torch.nn.Module], object] | None], object]
    shard_units: Callable[[torch.nn.Module], Iterable[torch.nn.Module]] | None = None
    tokenizers: bool = False  # a folder of tokenizers (not weights): ComfyUI's own ones when none is given


def _unchanged(args: tuple) -> tuple:
    return args


@dataclass(frozen=True)
class SequenceHooks:
    """What a family's parallelize leaves beside the module it hooked (ModelFamily.parallelize), for the step
    caches: `state.layout`, set by each forward, says which tokens of this rank's shard are real (None before
    the first forward); `enter_blocks(args)` gives the first block's arguments with the image tokens sharded as
    the block's own hooks would shard them (a family that shards on entering the first block; a cache that may
    skip the block calls it), marked so that they are not sharded twice."""

    module: torch.nn.Module
    state: object
    enter_blocks: Callable[[tuple], tuple] = _unchanged


@dataclass(frozen=True)
class Option:
    """A family-defined sampler input (HunyuanVideo's embedded guidance): default and allowed range."""

    default: float
    low: float
    high: float
    help: str

    def check(self, name: str, value) -> float:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and self.low <= value <= self.high):
            raise ValueError(f"{name} ({self.help}) must be in {self.low:g}..{self.high:g}, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class PlanVariant:
    """One released model of a family as the degree planner (planner.py) costs it: its shape, its nominal
    parameter count, its text tokens and how its video becomes tokens."""

    label: str             # what the plan table calls it: "Wan 2.1 T2V 14B"
    heads: int
    hidden: int
    attention_layers: int
    params: float          # nominal parameters (the published size the planner's throughput is calibrated on)
    ffn: int               # the FFN's width as memory.py counts it
    patch: tuple[int, int, int]  # the DiT's patch (frames, rows, columns of latent per token)
    text_tokens: int       # the text sequence the DiT takes
    joint_text: bool = False  # do the text tokens join the video tokens in self-attention?


@dataclass(frozen=True)
class Defaults:
    """The reference pipeline's sampler settings."""

    sampler: str
    shift: float
    cfg: float | tuple[float, ...]  # one per expert for a family with several
    negative_prompt: str = ""
    steps: int = 30
    boundaries: tuple[float, ...] = ()  # where the experts switch (sigmas, decreasing)

    def cfg_list(self) -> list[float]:
        return list(self.cfg) if isinstance(self.cfg, tuple) else [self.cfg]


class ModelFamily:
    """The interface. Subclasses set the attributes and implement the methods; the defaults here are
    neutral (nothing, a refusal, or ComfyUI's BaseModel behaviour)."""

    name: str                   # "wan2.1": requests and node code name a family by it
    label: str                  # "Wan 2.1": what users read
    short_name: str             # "wan": `usp-video demo --model wan`
    dit_class: str              # the diffusers class of its DiT (diffusers folders are recognised by it)
    vae_class: str              # the diffusers class of its VAE
    latent_format: str          # ComfyUI's latent_format class (previews): "Wan21", "HunyuanVideo"
    latent_channels: int = 16
    pixel_multiple: int = 16    # width and height must be multiples of this
    spatial_compression: int = 8  # pixels per latent row / column (its VAE's); frames: 4k + 1 -> k + 1
    vae_encodes: bool = False   # does its VAE encode video (encode())?
    defaults: Defaults
    text_parts: tuple[TextPart, ...]
    cond_keys: tuple[str, ...] = ("tokens",)  # the tensors of its conditioning ("tokens" first)
    text_encoder_hint: str      # which text encoder the family uses (error messages)
    options: dict[str, Option] = {}  # sampler inputs of its own (never mutated)
    experts: tuple[str, ...] = ()   # the expert slots of a model made of several DiTs, first to last
    claims_files: bool = True       # may detection pick it from a file alone? (models.detect_dit)
    order: int = 100                # where it stands in lists and detection (lower first)
    takes_noise_mask: bool = False  # does its sampler honour a LATENT's noise_mask (checked against ComfyUI)?
    comfy_model_configs: tuple[str, ...] = ()  # ComfyUI's model config classes of its native MODELs (nodes/native_nodes.py)
    noise_mask_node: str = ""       # the ComfyUI node that makes such a masked LATENT (messages)
    start_image_node: str = ""      # the ComfyUI node that makes its image-to-video conditioning (messages)
    vae_label: str = ""             # its VAE's name when not its label ("Wan 2.2": the 5B's VAE), for messages
    # the released models the planner offers ({`usp-video plan --model` name: PlanVariant}), the published
    # seconds per video it compares with ({(plan name, "WxHxF"): {GPUs: seconds}}); a family of one variant is
    # offered under its short_name too (planner.py)
    plan_variants: dict[str, PlanVariant] = {}
    reference_times: dict[tuple[str, str], dict[int, float]] = {}

    # -- files (header only: cheap, runs in the ComfyUI process too) -------------------------------

    def is_dit(self, keys: set[str]) -> bool:
        """Do these tensor names (container prefixes removed) look like this family's DiT?"""
        raise NotImplementedError

    def is_vae(self, keys: set[str]) -> bool:
        raise NotImplementedError

    def is_vae_folder(self, config: dict) -> bool:
        """Is a diffusers VAE folder of its vae_class (config: its config.json) this family's VAE?"""
        return True

    def describe(self, shapes: dict) -> str | None:
        """A short description of a file of this family ("looks like a HunyuanVideo DiT"), or None.
        shapes: {tensor name: (shape, dtype)}; a shape may be unknown ([]) when only names are known."""
        return None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        """The DiT's config from a single file's header; CheckpointError for a file it cannot run."""
        raise NotImplementedError

    def check_dit_folder(self, path: Path) -> None:
        """CheckpointError for a diffusers DiT folder of its class that it cannot run (families that
        share a diffusers class tell their folders apart here)."""

    def check_experts(self, paths: list[str], configs: list[dict]) -> list[str]:
        """Check the DiT files of one model (in the order of `experts`; configs: their dit_config, {}
        for folders): CheckpointError when they cannot go together; returns warnings to show."""
        if len(paths) != max(len(self.experts), 1):
            raise CheckpointError(f"{self.label} takes {max(len(self.experts), 1)} DiT file(s), got {len(paths)}")
        return []

    # -- the DiT ----------------------------------------------------------------------------------

    def load_dit(self, path: str, dtype: torch.dtype, device: torch.device, shard=None) -> torch.nn.Module:
        """The DiT on device. With shard (shard(model) FSDP-shards a model over the ranks), the model comes
        back sharded: sharded on the meta device and each rank reading only its shards where the loader can
        (formats/streamed.py), else sharded once loaded."""
        raise NotImplementedError

    def dit_source_map(self, path: str) -> tuple[dict, dict[str, list[int]]]:
        """(streamed.file_source_map of a single DiT file under this family's key conversion: which rows of which
        file tensor each model tensor is made of; the file's tensor shapes), for LoRAs (formats/lora.py).
        A family without it takes no LoRA."""
        raise CheckpointError(f"LoRAs are not supported for {self.label} models yet")

    def lora_aliases(self, stem: str) -> list[str]:
        """Other names LoRAs give a layer (stem: its name in the model's file, less `.weight`), beyond
        ComfyUI's `diffusion_model.` and `lora_unet_` forms (formats/lora.py)."""
        return []

    def dit_load_bytes(self, path: str, dtype: torch.dtype, shares: int) -> int:
        """What loading this DiT file adds to one rank's memory at its peak, its weights split into
        `shares` (1: a whole copy), predicted from the header (the memory pre-flight). This default is
        for a loader that builds the whole model before sharding it: the whole model, whatever `shares`,
        at the compute dtype (fp8 weights at one byte: they may stay fp8)."""
        from ..formats.checkpoint import read_header

        p = Path(path)
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for f in (sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]):
            shapes, _ = read_header(f)
            total += sum(math.prod(shape) * (1 if kind.startswith("F8") else size) for shape, kind in shapes.values())
        return total

    def parallelize(self, model: torch.nn.Module, sp, backend: str) -> SequenceHooks:
        """Apply sequence parallelism (parallel.mesh.SequenceParallel) from outside the model, in place; the
        hooks' shared state comes back beside the module (nothing is stamped on it)."""
        raise NotImplementedError

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The repeated blocks, the units of weight sharding."""
        raise NotImplementedError

    def describe_dit(self, model: torch.nn.Module) -> dict:
        """heads, layers, hidden, text_dim: what the planner, the checks and the loader info need."""
        raise NotImplementedError

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the space the DiT works in (ComfyUI's latent_format.process_in)."""
        raise NotImplementedError

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 options: dict[str, float]) -> torch.Tensor:
        """The DiT's flow velocity for x at timestep t (sigma * 1000), with one side's conditioning
        (cond["tokens"] [B, L, D] and the family's other tensors) and its sampler options."""
        raise NotImplementedError

    # A LATENT's noise_mask, as ComfyUI's KSamplerX0Inpaint applies it (the engine does the blend; these two
    # are ComfyUI's model_base hooks, here with its BaseModel's defaults; only takes_noise_mask families get one).

    def masked_timestep(self, model: torch.nn.Module, t: torch.Tensor, denoise_mask: torch.Tensor) -> torch.Tensor:
        """The timestep velocity() gets under a denoise mask [B, C, T, H, W] (1: sample, 0: keep the latent);
        t is [B]. ComfyUI's process_timestep: BaseModel ignores the mask."""
        return t

    def inpaint_latent(self, latent: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the kept part of the model's input is at sigma (ComfyUI's scale_latent_inpaint: BaseModel's
        is the latent noised to sigma, as a flow model's noise scaling)."""
        return sigma * noise + (1.0 - sigma) * latent

    def step_cache_spec(self, model: torch.nn.Module, latent_shape: tuple[int, ...]):
        """Where the step caches (sampling/step_cache.py) find this DiT's blocks, what TeaCache measures
        and MagCache's ratios for a run on a latent of this shape: a StepCacheSpec. Families without one
        refuse the caches."""
        raise ValueError(f"step caches are not available for {self.label} models")

    def step_sequence(self, model: torch.nn.Module, latent_shape: tuple[int, ...], text_tokens: int) -> dict:
        """What the activations pre-flight (memory.py) needs of a step on a latent of this shape:
        {"tokens": the sequence its blocks run on, "hidden": its width, "ffn": its FFN's width}."""
        raise NotImplementedError

    # -- text -------------------------------------------------------------------------------------

    def takes_text_files(self, headers: list[dict]) -> bool:
        """Are these text encoder files this family's? headers: each file's {tensor name: (shape, dtype)}, in the
        order of its text parts that are not tokenizers (the count already matches). Families whose text encoders
        come in the same number of files (HunyuanVideo's Llama + CLIP-L, HunyuanVideo 1.5's Qwen + ByT5) tell them
        apart here; this default takes any."""
        return True

    def make_text_encoder(self, parts: dict[str, object]):
        """The encoder made of the loaded text parts ({input: loaded}); its encode(prompt) returns the
        conditioning tensors: {"tokens": [1, L, D], ...the family's others}."""
        raise NotImplementedError

    def check_conditioning(self, cond: dict[str, torch.Tensor], name: str) -> None:
        """Family checks of a conditioning beyond the generic ones (validation.check_conditioning)."""

    def model_conditioning(self, model: torch.nn.Module, cond: dict[str, torch.Tensor], latent_shape: tuple[int, ...],
                           name: str) -> dict[str, torch.Tensor]:
        """One side's conditioning as the loaded DiT takes it, once per sampler call (on the CPU): the family
        turns what the request carries (a start video, say) into the tensors its velocity() uses, and refuses
        what this DiT cannot use (a start image for a text-to-video model). This default passes it on."""
        return cond

    # -- the VAE ----------------------------------------------------------------------------------

    def load_vae(self, path: str, dtype: torch.dtype, device: torch.device):
        raise NotImplementedError

    def decode(self, vae, latent: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
        """Raw latent [B, C, T, H, W] -> IMAGE frames [F, H', W', 3] in 0..1 on the CPU: on every rank
        when split is None; with a split, every rank of it calls this and rank 0 gets the frames."""
        raise NotImplementedError

    def encode(self, vae, frames: torch.Tensor, split: VaeSplit | None) -> torch.Tensor | None:
        """IMAGE frames [F, H, W, 3] in 0..1, one video (validation.check_frames passed) -> its raw latent
        [1, C, (F - 1) / 4 + 1, H / s, W / s] on the CPU, the mean of the VAE's latent distribution (what
        ComfyUI's VAEEncode gives): on every rank when split is None; with a split, every rank of it calls
        this and rank 0 gets the latent. Families whose VAE does not encode leave vae_encodes False and
        this refusal, which names the VAEs that do encode (those of the families defined)."""
        encoders = sorted((cls for cls in _family_classes() if cls.vae_encodes), key=lambda cls: cls.order)
        names = list(dict.fromkeys(cls.vae_label or cls.label for cls in encoders))
        raise ValueError(f"the {self.label} VAE does not encode video here yet (USP VAE Encode takes the "
                         f"{' and '.join(names)} VAEs); use ComfyUI's own VAE Encode")

    def encoder_calls(self, vae, frames: torch.Tensor) -> int:
        """How many times an encode of `frames` ([F, H, W, 3]) calls vae.encoder (its progress is counted in
        them); only asked of families whose VAE encodes."""
        raise NotImplementedError

    def decoder_calls(self, vae, latent: torch.Tensor) -> int:
        """How many times a decode of `latent` calls vae.decoder (the decode's progress is counted in them)."""
        raise NotImplementedError

    # -- image to video -----------------------------------------------------------------------------

    def check_start_image_model(self, config: dict, name: str) -> None:
        """Can this DiT (config: its dit_config) be given a start image alone, without CLIP vision features
        (what the command line gives)? ValueError says why not; this default: a text-to-video family."""
        raise ValueError(f"{name} is a text-to-video model; give an image-to-video (I2V) model")

    def start_image_conditioning(self, encode_video: Callable[[torch.Tensor], tuple[torch.Tensor, "ModelFamily"]],
                                 image: torch.Tensor, width: int, height: int, length: int) -> dict[str, torch.Tensor]:
        """A start image (IMAGE [n, H, W, 3]) as the family's image-to-video conditioning for a video of this
        size; encode_video(frames) -> (raw latent, the VAE's family) encodes frames on the group. Families
        without image-to-video refuse."""
        raise ValueError(f"{self.label} models take no start image")

    def demo_conditioning(self, config: dict, width: int, height: int, frames: int) -> dict[str, torch.Tensor]:
        """What `usp-video demo` adds to the prompt's conditioning for a video of this size, for a DiT of this
        config (dit_config's): synthetic inputs made in code, for a family whose model needs more than text
        (Wan 2.2 Animate's reference, pose and face videos); nothing here."""
        return {}

    # -- the tiny set -----------------------------------------------------------------------------

    def make_tiny(self, root: str | Path) -> dict[str, Path]:
        """Write a tiny random model set under root in ComfyUI's layout: {"dit", "vae", text inputs}."""
        raise NotImplementedError

    # -- checks -----------------------------------------------------------------------------------

    def check_options(self, options: dict) -> dict[str, float]:
        """The family's sampler options with their defaults filled in; ValueError names a bad one."""
        if not isinstance(options, dict):
            raise ValueError(f"sampler options must be a mapping, got {type(options).__name__}")
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"{self.label} takes no sampler option {', '.join(sorted(unknown))} (its options: {known})")
        return {name: option.check(name, options.get(name, option.default)) for name, option in self.options.items()}

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def _family_classes() -> list[type[ModelFamily]]:
    """Every ModelFamily subclass defined (their class attributes are the families' facts)."""
    found, todo = [], list(ModelFamily.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found

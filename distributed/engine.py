"""The engine: loaded models and the requests they serve, in one process or on one rank.

Every rank of the group holds an Engine. `sample` runs on all ranks (the DiT is sequence
parallel); `encode` runs on rank 0, or on every rank when its weights are sharded; `decode` on
rank 0, or on every rank with vae_split. With world size 1 and no process group the same code
serves the CLI and the tests. The engine knows model families only through models/family.py.

This module is a facade over its collaborators, each handed what it needs:
  residency.py         the models held (typed slots, LoadedDiT records), placement, expert switching;
  preflight.py         the memory pre-flights and the shard decisions, with a free-memory probe;
  parallelize.py       a DiT's load as a list of apply steps (shard, mesh, USP, fp8, compile);
  loras.py             the LoRA chains of a sampler call;
  sampling/denoiser.py the per-step model call (CFG, expert switch, noise mask, step cache).
A sample is check -> experts -> pre-flight -> denoise, and returns a SampleResult.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from . import models
from .codecs import TextEncoders, Vae
from .config import GroupConfig
from .loras import apply_chains
from .formats import fp8, gguf as gguf_weights
from .parallel import fsdp
from .parallel.compile import check_compile
from .parallel.mesh import SequenceParallel
from .parallel.usp_attention import resolve_backend
from .parallelize import DitLoading, load_dit
from .preflight import FreeMemoryProbe, Preflight, free_memory
from .requests import Cond, EncodeRequest, SampleRequest
from .residency import LoadedDiT, Placement, Residency
from .sampling.denoiser import Denoiser, Inpaint, SamplingInterrupted, StepCallback, batchable, make_noise, to_device
from .sampling.samplers import get_sampler
from .sampling.schedules import sampling_sigmas, step_range
from .sampling.step_cache import CacheSettings, StepCache, make_step_cache
from .validation import check_conditioning, check_sample_inputs

__all__ = ["Engine", "SampleResult", "SamplingInterrupted"]


@dataclass
class SampleResult:
    """A sample's raw-space latent (float32, CPU) and report: the SP groups it ran on (degrees), its step cache
    (skipped steps; None when off), partly matching LoRAs' warnings, file reads so far ("dit", "lora", ...)."""

    latent: torch.Tensor
    sp: SequenceParallel
    step_cache: StepCache | None
    lora_warnings: list[str]
    load_counts: dict[str, int]


class Engine:
    """The models of one rank (or of one process) and the requests they serve.

    config: the group's GroupConfig (its ranks are the world size); rank, local_rank: this rank's
    (local_rank picks the GPU on CUDA); free_memory(device) -> bytes: the pre-flights' probe. With more
    than one rank the default process group must exist."""

    def __init__(self, config: GroupConfig | None = None, *, rank: int = 0, local_rank: int = 0,
                 free_memory: FreeMemoryProbe = free_memory):
        config = config or GroupConfig()
        self.config = config
        self.world_size, self.rank = config.ranks, rank
        self.cfg_degree = config.cfg_parallel
        self.dit_offload = config.dit_offload
        if self.dit_offload and self.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("dit_offload shards the DiT with FSDP, which needs a process group even for one rank: "
                             "a group the pack launches (the USP Group node, the command line) has one; this "
                             "in-process engine has none, so turn dit_offload off here")
        self.vae_split = config.vae_split and self.world_size > 1
        self.device = torch.device(f"cuda:{local_rank}" if config.device == "cuda" else "cpu")
        self.dtype = config.torch_dtype
        # checked before anything loads; the backend is resolved again for each DiT, once its ring degree is known
        resolve_backend(config.attention, self.device, self.dtype, config.ring if isinstance(config.ring, int) else 1)
        check_compile(config.compile, self.device)
        if config.fp8_compute and (reason := fp8.fp8_compute_unavailable(self.device)):
            raise ValueError(f"{reason}: use fp8_compute 'off'")
        self.placement = Placement(config.placement, self.device)
        self.residency = Residency(self.placement)
        self.preflight = Preflight(self.world_size, self.device, self.dtype, dit_offload=self.dit_offload,
                                   shard_weights=config.shard_weights if self.world_size > 1 else "off",
                                   probe=free_memory)
        self.text = TextEncoders(self.residency, self.preflight, self.device, self.dtype)
        self.vae_coder = Vae(self.residency, self.device, self.dtype, rank, self.world_size, self.vae_split)
        self._load = partial(load_dit, DitLoading(config, self.world_size, self.device, self.dtype, self.preflight))

    @property
    def load_counts(self) -> Counter[str]:
        """How often each kind of file was read: "dit", "vae", "lora", a text input."""
        return self.residency.load_counts

    @property
    def sharded(self) -> dict[str, bool]:
        """role ("dit", a text input) -> were its weights sharded."""
        return self.preflight.sharded

    # -- the DiT ----------------------------------------------------------------------------------

    def load_dit(self, path: str, family: str | None = None) -> LoadedDiT:
        """The DiT in path, loaded once as `family` (None: detected from the file), on the device."""
        return self.residency.dit(path, models.detect_dit(path, family), self._load)

    def dit(self, path: str, family: str | None = None) -> torch.nn.Module:
        """The module of load_dit's DiT."""
        return self.load_dit(path, family).module

    def dit_info(self, paths: list[str], family: str | None = None, keep: list[str] = ()) -> dict:
        """Load these DiTs (freeing any other but those in keep, left as they are) and describe the first.
        Collective (every rank's free memory is gathered at the end, also when this rank failed, so that no
        rank waits for it)."""
        try:
            info = self._dit_info(paths, family, list(keep))
        except BaseException:
            self.preflight.free_memory_per_rank(failed=True)
            raise
        return {**info, **self.preflight.free_memory_per_rank()}

    def _dit_info(self, paths: list[str], family: str | None, keep: list[str]) -> dict:
        families = [models.detect_dit(path, family) for path in paths]
        kept = [(path, models.detect_dit(path, family)) for path in keep if path not in paths]
        self.residency.forget_other_dits(list(zip(paths, families)) + kept)
        dits = self.residency.experts(paths, families, 0, self._load)
        if any(d.family is not dits[0].family for d in dits):
            raise ValueError("the DiTs of one model must be of one family, got "
                             + ", ".join(d.family.label for d in dits))
        dit = dits[0]
        model, found, sp = dit.module, dit.family, dit.sp
        return {"family": found.name, "model": found.label, **found.describe_dit(model),
                "latent_format": found.latent_format, "ulysses": sp.ulysses_degree,
                "ring": sp.ring_degree, "cfg_parallel": self.cfg_degree,
                "parameters": sum(p.numel() for p in model.parameters()),
                "sharded": self.sharded.get("dit", False), "parameter_bytes": fsdp.parameter_bytes(model),
                "fp8_layers": fp8.count_fp8_layers(model), "quantized_layers": gguf_weights.quantized_layers(model),
                "placement": self.placement.mode,
                "attention": dit.backend, "compiled_blocks": dit.compiled_blocks,
                "compile": self.config.compile, "fp8_compute": self.config.fp8_compute,
                "fp8_compute_layers": dit.fp8_compute_layers,
                "dit_offload": self.dit_offload}

    # -- text and the VAE: codecs.py's ---------------------------------------------------------

    def encode_on_all_ranks(self, request: EncodeRequest) -> bool:
        return self.text.encode_on_all_ranks(request)

    def encode(self, request: EncodeRequest) -> Cond:
        return self.text.encode(request)

    def vae(self, path: str) -> torch.nn.Module:
        return self.vae_coder.loaded_vae(path).module

    def decode(self, path: str, latent: torch.Tensor,
               on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        return self.vae_coder.decode(path, latent, on_progress)

    def encode_video(self, path: str, frames: torch.Tensor,
                     on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        return self.vae_coder.encode_video(path, frames, on_progress)

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, req: SampleRequest, on_step: Callable[[int, int, torch.Tensor, int | None], bool] | None = None,
               on_start: Callable[[], None] | None = None,
               on_block: Callable[[], bool] | None = None) -> SampleResult:
        """Run the sampler; returns the raw-space latent (float32, CPU) with the run's report.

        With several experts, each step runs on the expert its sigma belongs to (req.boundaries); all
        stay loaded, so a switch costs nothing. on_step(i, total, denoised, skipped) runs after each step
        on every rank, with the current x0 estimate in the model's (normalised) latent space and the steps
        the step cache skipped so far (None without one), and returns True to stop; it must return the
        same value on every rank (the worker makes it collective). on_start() runs once the models are
        loaded and the inputs checked, just before the first step (step times are counted from there).
        on_block() runs before every DiT block on every rank and returns True to stop inside the step
        (SamplingInterrupted with mid_step set); like on_step it must return the same value on every rank, and
        every rank runs the same blocks in the same order, so that all of them stop before the same block and
        no collective is left half-entered. Before the first step, the step-time pre-flight
        (Preflight.check_step_time) refuses a step estimated to take longer than req.max_step_s.
        """
        req.check_experts()
        # each file's family read once; the inputs that the header tells checked before a model is freed or loaded
        families = {req.experts[0]: models.detect_dit(req.experts[0], req.family)}
        options = check_sample_inputs(req, families[req.experts[0]])  # the experts were checked above
        for path in req.experts + req.keep:
            families.setdefault(path, models.detect_dit(path, req.family))
        self.residency.forget_other_dits([(path, families[path]) for path in req.experts + req.keep])
        sigmas = step_range(sampling_sigmas(req.steps, req.shift, req.denoise), req.start_step, req.end_step,
                            req.leftover_noise)
        # the other experts of the model (keep) stay loaded for the next sampler, idle; of this call's
        # experts, the one of the first step is on the device
        first = req.expert_at(float(sigmas[0])) if sigmas is not None else 0
        paths = req.keep + req.experts
        experts = self.residency.experts(paths, [families[p] for p in paths], len(req.keep) + first,
                                         self._load)[len(req.keep):]
        family = experts[0].family
        if any(d.family is not family for d in experts):
            raise ValueError("the experts of one sampler call must be of one model family, got "
                             + ", ".join(d.family.label for d in experts))
        warnings = apply_chains(experts, req.experts, req.loras, self.dtype, self.load_counts)
        text_dim = family.describe_dit(experts[0].module)["text_dim"]  # the loaded model's, checked now
        for name, cond in (("positive", req.positive), ("negative", req.negative)):
            if cond is not None:
                check_conditioning(cond, name, family, text_dim)
        if sigmas is None:  # start_at_step is past the last step: nothing to do (as in ComfyUI)
            return SampleResult(req.latent.float().clone(), experts[0].sp, None, warnings, dict(self.load_counts))
        denoiser, x = self._denoiser(req, experts, sigmas, first, options)
        estimate = self.preflight.check_step_time(experts, tuple(req.latent.shape), self._text_tokens(req, experts),
                                               self._passes(req, experts), req.max_step_s)
        if on_start is not None:
            on_start()
        started = time.monotonic()
        # the per-block agreement needs every rank to run the same blocks: a step cache under cfg-parallel decides per
        # half which blocks to skip, so there a Cancel is seen after the step (or ends in the client's grace time)
        if denoiser.cache is not None and self.cfg_degree == 2:
            on_block = None
        with _stop_between_blocks(experts, on_block, lambda: denoiser.step):
            x = get_sampler(req.sampler)(denoiser, x, sigmas, StepCallback(denoiser, len(sigmas) - 1, on_step))
        self.preflight.observe_step(estimate, (time.monotonic() - started) / (len(sigmas) - 1))
        # ComfyUI's LATENT holds a partly denoised x as x / (1 - sigma): the next sampler's noise
        # scaling, (1 - sigma) * latent, gives x back (a no-op when the run ends at sigma 0).
        x = x / (1.0 - sigmas[-1])
        return SampleResult(family.process_out(x), experts[0].sp, denoiser.cache, warnings, dict(self.load_counts))

    @staticmethod
    def _two_passes(req: SampleRequest, experts: list[LoadedDiT]) -> bool:
        """Does a step run the model twice (a negative, and cfg != 1 for some expert)?"""
        return req.negative is not None and any(req.cfg_for(i) != 1.0 for i in range(len(experts)))

    def _text_tokens(self, req: SampleRequest, experts: list[LoadedDiT]) -> int:
        both = [req.positive, req.negative] if self._two_passes(req, experts) else [req.positive]
        return max(c["tokens"].shape[1] for c in both)

    def _passes(self, req: SampleRequest, experts: list[LoadedDiT]) -> int:
        """The model passes a rank runs per step: 2 with CFG, unless the cfg-parallel halves take one each."""
        return 2 if self._two_passes(req, experts) and self.cfg_degree == 1 else 1

    def _denoiser(self, req: SampleRequest, experts: list[LoadedDiT], sigmas: torch.Tensor, first: int,
                  options: dict) -> tuple[Denoiser, torch.Tensor]:
        """The denoiser of this call (its step cache and activations pre-flight checked) and the start x."""
        family, shape = experts[0].family, tuple(req.latent.shape)
        # the whole schedule this run is part of (denoise < 1 keeps its tail; start_step skips its head)
        schedule = req.steps if req.denoise > 0.9999 else int(req.steps / req.denoise)
        cache = make_step_cache(CacheSettings.from_dict(req.cache), family, experts, schedule, shape,
                                offset=schedule - req.steps + req.start_step)
        # the activations of a step as the denoiser runs it: both passes in one batch when their
        # conditionings have the same shapes (and no cfg-parallel), else one pass at a time
        two_passes = self._two_passes(req, experts)
        batched = two_passes and self.cfg_degree == 1 and batchable(req.positive, req.negative)
        self.preflight.check_activations(experts, shape, self._text_tokens(req, experts), passes=2 if batched else 1)
        noise = make_noise(shape, req.seed) if req.add_noise else torch.zeros(req.latent.shape)
        # ComfyUI leaves an all-zero (empty) latent as it is rather than normalising it
        latent = req.latent.float()
        latent_in = family.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
        x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent_in
        # ComfyUI's denoise mask (prepare_mask): the LATENT's noise_mask at the latent's shape, 1 where it samples
        mask = None if req.noise_mask is None else torch.broadcast_to(req.noise_mask.float(), x.shape).contiguous()
        inpaint = None if mask is None else Inpaint(mask, latent_in, noise, mask.to(self.device))
        model, batch = experts[0].module, x.shape[0]
        positive = to_device(family.model_conditioning(model, req.positive, shape, "positive"), batch, self.device,
                             self.dtype)
        negative = to_device(family.model_conditioning(model, req.negative, shape, "negative"), batch, self.device,
                             self.dtype) if two_passes else None
        return Denoiser(experts, req.expert_at, [req.cfg_for(i) for i in range(len(experts))], positive, negative,
                        options=options, device=self.device, dtype=self.dtype, batch=batch, running=experts[first],
                        switch=self.residency.run_expert, cache=cache, inpaint=inpaint), x


@contextmanager
def _stop_between_blocks(experts: list[LoadedDiT], on_block: Callable[[], bool] | None, step: Callable[[], int]):
    """While the sampler runs: on_block() before every block of every expert (a forward pre-hook, put in front of
    FSDP's own, so that a stopped block has gathered no weights); True raises SamplingInterrupted(step() - 1,
    mid_step=True): the steps done so far are step(). The hooks are removed on the way out."""
    if on_block is None:
        yield
        return

    def check(module, args):
        if on_block():
            raise SamplingInterrupted(step() - 1, mid_step=True)

    handles = [block.register_forward_pre_hook(check, prepend=True)
               for dit in experts for block in dit.family.blocks(dit.module)]
    try:
        yield
    except SamplingInterrupted as stop:
        if stop.mid_step:  # a forward left in the middle: FSDP's root may hold gathered weights
            for dit in experts:
                fsdp.reshard_after_interrupt(dit.module)
        raise
    finally:
        for handle in handles:
            handle.remove()

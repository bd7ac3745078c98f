"""The per-step model call as a k-diffusion style denoiser: `denoiser(x, sigma) -> x0`.

The samplers (samplers.py) see only this callable. Everything a step does besides the solver lives
here: which expert runs at this sigma (Wan 2.2 A14B's switch, which the residency performs), the
classifier-free guidance passes (single, batched, one after the other, or split over the CFG-parallel
pair of rank groups), the noise-mask blend of ComfyUI's KSamplerX0Inpaint, and the step cache's
context around each forward. It holds no process group of its own: cfg-parallel's exchange uses the
one its expert's SequenceParallel carries, so with a fake model it runs in one process (tests do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .schedules import timestep

Cond = dict[str, torch.Tensor]


class SamplingInterrupted(Exception):
    """A Cancel agreed by every rank: after step `step` (0-based), or, mid_step, before a block of the step after it."""

    def __init__(self, step: int, mid_step: bool = False):
        super().__init__(f"interrupted {'during the step after' if mid_step else 'at'} step {step}")
        self.step, self.mid_step = step, mid_step


def make_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise exactly as ComfyUI's comfy.sample.prepare_noise makes it: one CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def batchable(positive: Cond, negative: Cond) -> bool:
    """Can the two CFG passes run as one batch? When the conditionings hold the same tensors of the same
    shapes (past the batch dimension, which both take from the latent)."""
    return set(positive) == set(negative) and all(positive[n].shape[1:] == negative[n].shape[1:] for n in positive)


def exchange(mine: torch.Tensor, group, device: torch.device) -> list[torch.Tensor]:
    """All-gather one tensor across the CFG pair: [conditional half's, unconditional half's]
    (on the compute device, which NCCL needs; returned on the CPU)."""
    mine = mine.to(device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine, group=group)
    return [p.cpu() for p in parts]


def to_device(cond: Cond | None, batch: int, device: torch.device, dtype: torch.dtype) -> Cond | None:
    """A conditioning on the compute device and dtype, a batch-1 tensor expanded to the latent's batch."""
    if cond is None:
        return None
    out = {}
    for name, t in cond.items():
        t = t.to(device, dtype)
        out[name] = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
    return out


def _both(a: Cond, b: Cond) -> Cond:
    return {name: torch.cat([a[name], b[name]]) for name in a if name in b}


@dataclass
class Inpaint:
    """ComfyUI's denoise mask (prepare_mask): 1 where the sampler samples, at the latent's shape; the clean
    latent (the family's process_in space) and the run's noise, from which the kept part is made."""

    mask: torch.Tensor
    latent: torch.Tensor
    noise: torch.Tensor
    mask_on_device: torch.Tensor  # the timesteps' copy, made once

    def __post_init__(self):
        self.kept = 1.0 - self.mask  # where the latent is kept, made once for the whole run


class Denoiser:
    """`denoiser(x, sigma) -> x0` for one sampler call.

    experts: the LoadedDiT records of the call (residency.py; anything with module, family and sp);
    expert_at(sigma) -> the index of the expert of that sigma; cfgs: each expert's guidance scale;
    positive / negative: conditionings already on the device (negative None: one pass); options: the
    family's sampling options; running: the expert on the device; switch(expert): brings another there;
    cache: the step cache or None; inpaint: the noise mask blend or None. `step` is the step the next
    call belongs to: the sampler's callback moves it on (StepCallback)."""

    def __init__(self, experts: list, expert_at: Callable[[float], int], cfgs: list[float], positive: Cond,
                 negative: Cond | None, *, options: dict, device: torch.device, dtype: torch.dtype, batch: int,
                 running: Any, switch: Callable[[Any], None], cache: Any = None, inpaint: Inpaint | None = None):
        self.experts, self.expert_at, self.cfgs = experts, expert_at, cfgs
        self.positive, self.negative, self.options = positive, negative, options
        self.device, self.dtype, self.batch = device, dtype, batch
        self.running, self.switch, self.cache, self.inpaint = running, switch, cache, inpaint
        self.step = 0
        # both passes in one batched forward when their conditionings have the same shapes (and the CFG-parallel
        # halves do not split them): the batch's conditioning, joined once for the whole run
        split = experts[0].sp.cfg_degree == 2
        self.both = _both(positive, negative) if negative is not None and not split and batchable(positive, negative) \
            else None

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.inpaint is None:
            return self.guided(x_t, sigma)
        # ComfyUI's KSamplerX0Inpaint: where the mask is 0 the model sees the family's inpaint latent and
        # the estimate is the latent itself
        mask, latent, kept = self.inpaint.mask, self.inpaint.latent, self.inpaint.kept
        family = self.experts[0].family
        x_t = x_t * mask + family.inpaint_latent(latent, self.inpaint.noise, sigma) * kept
        return self.guided(x_t, sigma) * mask + latent * kept

    def guided(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 from the expert of this sigma, with classifier-free guidance when it has two passes."""
        expert = self.expert_at(float(sigma))
        dit, cfg = self.experts[expert], self.cfgs[expert]
        if dit is not self.running:  # the switch: the expert that ran waits in host memory (placement)
            self.switch(dit)
            self.running = dit
        sp = dit.sp
        if self.cache is not None:
            self.cache.start_expert(expert)
        positive, negative = self.positive, self.negative
        x_in = x_t.to(self.device, self.dtype)  # the model's input, copied to the device once a step
        if negative is None or cfg == 1.0:  # with CFG-parallel both halves run this one pass
            v = self.velocity(dit, x_in, sigma, positive, "positive")
        elif sp.cfg_degree == 2:  # each half runs one pass; the pair swaps results (on the device)
            side = "positive" if sp.cfg_rank == 0 else "negative"
            mine = self.velocity(dit, x_in, sigma, positive if sp.cfg_rank == 0 else negative, side, on_host=False)
            v_pos, v_neg = exchange(mine, sp.cfg_group, self.device)
            v = v_neg + cfg * (v_pos - v_neg)
        elif self.both is not None:
            v_pos, v_neg = self.velocity(dit, torch.cat([x_in, x_in]), sigma, self.both, "both").chunk(2)
            v = v_neg + cfg * (v_pos - v_neg)  # one batched forward for both passes
        else:
            v_pos = self.velocity(dit, x_in, sigma, positive, "positive")
            v_neg = self.velocity(dit, x_in, sigma, negative, "negative")
            v = v_neg + cfg * (v_pos - v_neg)
        return x_t - sigma * v

    def velocity(self, dit, x_in: torch.Tensor, sigma: torch.Tensor, cond: Cond, side: str,
                 on_host: bool = True) -> torch.Tensor:
        """One forward of the expert: the flow velocity at x_in (on the device, in the compute dtype), float32, on
        the CPU (on_host) or left on the device. side: which pass of the step ("positive", "negative" or "both";
        each keeps its own step cache)."""
        family, model = dit.family, dit.module
        t = torch.full((x_in.shape[0],), float(timestep(sigma)), device=self.device)
        if self.inpaint is not None:  # a family may time the kept tokens apart (ComfyUI's process_timestep)
            t = family.masked_timestep(model, t, self.inpaint.mask_on_device.repeat(x_in.shape[0] // self.batch,
                                                                                    1, 1, 1, 1))
        if self.cache is None:
            out = family.velocity(model, x_in, t, cond, self.options)
        else:
            with self.cache.forward(dit.hooks, side, self.step, dit.sp):
                out = family.velocity(model, x_in, t, cond, self.options)
        return out.float().cpu() if on_host else out.float()


@dataclass
class StepCallback:
    """The sampler's callback: moves the denoiser's step on, and runs on_step(i, total, denoised, skipped)
    (skipped: how many steps the step cache skipped so far, None without one), which returns True to stop
    (SamplingInterrupted)."""

    denoiser: Denoiser
    total: int
    on_step: Callable[[int, int, torch.Tensor, int | None], bool] | None = None

    def __call__(self, i: int, x_t: torch.Tensor, denoised: torch.Tensor) -> None:
        self.denoiser.step = i + 1
        cache = self.denoiser.cache
        skipped = None if cache is None else len(cache.skipped_steps)
        if self.on_step is not None and self.on_step(i, self.total, denoised, skipped):
            raise SamplingInterrupted(i)

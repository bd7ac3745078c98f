"""Samplers in k-diffusion's shape: `sampler(model, x, sigmas, callback)` where
`model(x, sigma) -> denoised x0` and `callback(i, x, denoised)` runs after step i.

euler: ComfyUI's "euler" (k-diffusion sample_euler without churn).
unipc: UniPC multistep (diffusers' UniPCMultistepScheduler, flow prediction, order 2, bh2 as
       in Wan's reference code), walked on the same sigmas; a schedule may end above 0 (its
       history starts afresh in a second sampler, so a split run differs from an unsplit one). (diffusers' bh1 variant divides by
       an infinite log-SNR step at sigma 0 and returns NaN there, so it is not offered.)
"""

from __future__ import annotations

from typing import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_unipc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                        solver_order=2, solver_type="bh2", lower_order_final=True,
                                        final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=sigmas[:-1].double().numpy())
    # A schedule that stops short of 0 (a sampler that leaves noise for the next one): the last
    # step goes to that sigma instead of the scheduler's final 0.
    scheduler.sigmas[-1] = sigmas[-1].to(scheduler.sigmas.dtype)
    # Walk the steps by index: the integer timesteps the scheduler would look itself up by
    # repeat when sigmas are close (many steps, large shift), which would shift every step by one.
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        denoised = model(x, sigma)
        velocity = (x - denoised) / sigma
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, x, denoised)
    return x


SAMPLERS = {"unipc": sample_unipc, "euler": sample_euler}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}") from None

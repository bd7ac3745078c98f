"""Flow-matching sigma schedules, computed as ComfyUI computes them, so that steps, shift and
denoise mean the same thing here as in a native KSampler (ModelSamplingDiscreteFlow/SD3 +
the "simple" scheduler)."""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000
MULTIPLIER = 1000.0


def shifted(shift: float, t: torch.Tensor) -> torch.Tensor:
    """time_snr_shift: sigma(t) = shift * t / (1 + (shift - 1) * t)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sigma_table(shift: float) -> torch.Tensor:
    """The model's 1000 discrete sigmas, ascending (ComfyUI ModelSamplingDiscreteFlow.sigmas)."""
    t = (torch.arange(1, NUM_TIMESTEPS + 1, 1) / NUM_TIMESTEPS) * MULTIPLIER
    return shifted(shift, t / MULTIPLIER)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's "simple" scheduler: steps evenly spaced entries of the table, then 0."""
    table = sigma_table(shift)
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def sampling_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas a KSampler with this steps/shift/denoise walks (length steps + 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise > 0.9999:
        return simple_sigmas(steps, shift)
    return simple_sigmas(int(steps / denoise), shift)[-(steps + 1):]


def timestep(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """The timestep the DiT is conditioned on for a sigma."""
    return sigma * MULTIPLIER


def step_range(sigmas: torch.Tensor, start_step: int = 0, end_step: int | None = None,
               leftover_noise: bool = False) -> torch.Tensor | None:
    """The part of a schedule that KSamplerAdvanced walks (ComfyUI's KSampler.sample): steps
    start_step..end_step; the last sigma is set to 0 unless the result keeps its leftover noise.
    None when no step is left to run (ComfyUI then returns the input latent unchanged)."""
    sigmas = sigmas.clone()
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[:end_step + 1]
        if not leftover_noise:
            sigmas[-1] = 0.0
    if start_step >= len(sigmas) - 1:
        return None
    return sigmas[start_step:]

"""What the sections of the GPU check share: the run's context (settings, deadline, the report and its saving),
the attention backends that import here, a Wan DiT's config and inputs, forward timing, and the error measure.

Each section module (kernels, step, fp8, fit, memory, kernel_timing, comfyui) imports from here and from nothing
else in the package, so the sections stay independent of one another and of __main__.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

KERNEL_LAYERS = 2  # blocks per timed DiT in sections 6 and 7 (the step estimate scales per block to the model's layers)


@dataclass
class Context:
    """One run of the check: what every section's run(ctx) is given. The report is written to `out` as it grows."""

    device: torch.device
    small: bool  # tiny shapes, fp32: the CPU smoke test of the script itself
    repeats: int
    out: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)
    skips_said: set[str] = field(default_factory=set)  # backends whose "skipped" line was printed (once per run)

    @property
    def deadline(self) -> float:
        """time.monotonic() at which the whole run's budget is spent."""
        return self.started + self.budget_s

    def save(self) -> None:
        """Write the report as it stands (after every section, and after every row of section 6)."""
        self.report["wall_s"] = time.monotonic() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2))

    def live_rows(self, key: str) -> list[dict]:
        """An empty list put in the report under key now: rows appended to it are saved with the report, and
        kept if the section raises later."""
        self.report[key] = []
        return self.report[key]


def backends_available(ctx: Context) -> list[str]:
    """sdpa and math, and each third-party kernel whose package imports here (else one line says it is skipped)."""
    import importlib

    from usp_video.distributed.parallel.kernels import PACKAGES

    names = ["sdpa", "math"]
    for backend, package in PACKAGES.items():
        why = None
        if ctx.device.type != "cuda":
            why = "needs a CUDA GPU"
        else:
            try:
                importlib.import_module(backend)
                names.append(backend)
            except Exception as exc:  # not installed, or built for another torch/CUDA
                why = (f"{package} does not import ({type(exc).__name__}: {exc}); no wheel is carried, "
                       "nothing is downloaded")
        if why and backend not in ctx.skips_said:
            print(f"skipped: attention '{backend}': {why}")
            ctx.skips_said.add(backend)
    return names


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b, in fp64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def wan_setup(small: bool, device: torch.device, variant: str = "wan2.1-t2v-1.3b",
              shape: tuple[int, int, int] = (21, 60, 104)) -> tuple[dict, torch.dtype, tuple]:
    """A Wan 2.1 config (1.3B-shaped by default) and one forward's inputs (480p x 81 frames by default, bf16;
    tiny with small): (config, dtype, (latent x, timestep t, text context))."""
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    config, dtype = dict(WAN_VARIANTS[variant]), torch.bfloat16  # (21, 60, 104) -> 21 x 30 x 52 = 32,760 tokens
    if small:
        config.update(num_layers=2, attention_head_dim=16, ffn_dim=256, text_dim=64)
        shape, dtype = (3, 8, 12), torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 16, *shape, generator=g).to(device, dtype)
    ctx = torch.randn(1, 512, config["text_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    return config, dtype, (x, t, ctx)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work before a clock is read (nothing to wait for on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_forwards(models: dict, inputs: tuple, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """One warm-up forward per model (its output kept), then `repeats` interleaved timed forwards:
    (median seconds per model, output per model). A model is called as model(*inputs, return_dict=False)."""
    sync = synchronizer(device)
    times, outs = {name: [] for name in models}, {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            outs[name] = model(*inputs, return_dict=False)[0]
        for _ in range(repeats):  # interleaved
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(*inputs, return_dict=False)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def timed(model: Callable, inputs: tuple, device: torch.device, repeats: int) -> tuple[float, torch.Tensor, float]:
    """(median seconds of `repeats` forwards, the output, seconds of the first forward: warm-up / compilation)."""
    sync = synchronizer(device)
    times = []
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(*inputs, return_dict=False)[0]
        sync()
        first = time.perf_counter() - start
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(*inputs, return_dict=False)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times), out, first

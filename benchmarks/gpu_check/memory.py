"""Section 5: memory measured on this GPU, through the engine (one rank, no process group): a step's activation
peak (torch.cuda.max_memory_allocated minus what was allocated before) beside the pre-flight's prediction at
three sizes, for a Wan 1.3B-wide DiT of 4 blocks written to a temporary file; and the device memory two such
experts hold with placement keep against offload (the idle one in host memory). On the CPU the measured
numbers are 0 (nothing to measure) and the predictions still run.

Report key "memory": {"activations": rows, "experts_held_gib": {"keep": GiB, "offload": GiB}}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import Context, synchronizer, wan_setup


def run(ctx: Context) -> dict:
    """A step's measured activation peak against the prediction at three sizes, and placement keep
    against offload for two experts."""
    from activation_bench import write_model  # in benchmarks/, beside this package

    config, dtype, _ = wan_setup(ctx.small, ctx.device)
    config = dict(config, num_layers=2 if ctx.small else 4)
    group = dict(ranks=1, device=ctx.device.type, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        # two experts of the same shape (different weights)
        paths = [str(write_model(config, Path(tmp, f"expert{i}.safetensors"), seed=i)) for i in range(2)]
        rows = _activations(ctx, config, group, paths[0])
        held = _experts_held(ctx, group, paths)
    return {"activations": rows, "experts_held_gib": held}


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _activations(ctx: Context, config: dict, group: dict, path: str) -> list[dict]:
    """One sampler step (cfg 5) per latent size: the measured activation peak and the pre-flight's prediction."""
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest

    device, sync = ctx.device, synchronizer(ctx.device)
    sizes = [(3, 8, 12), (3, 16, 12), (5, 16, 16)] if ctx.small else [(11, 60, 104), (21, 60, 104), (21, 90, 160)]
    engine = Engine(GroupConfig(**group, placement="keep"))
    dit = engine.load_dit(path)
    g = torch.Generator().manual_seed(0)
    cond = {"tokens": torch.randn(1, 512, config["text_dim"], generator=g)}
    rows = []
    for shape in sizes:
        request = SampleRequest(experts=[path], positive=cond, negative=cond, latent=torch.zeros(1, 16, *shape),
                                seed=1, steps=1, cfg=5.0, shift=5.0, sampler="euler")
        predicted = engine.preflight.activation_bytes([dit], tuple(request.latent.shape), 512, passes=2)
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = _allocated(device)
        engine.sample(request)
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
        rows.append({"latent": list(shape), "tokens": shape[0] * shape[1] * shape[2] // 4,
                     "measured_gib": peak / 2**30, "predicted_gib": predicted / 2**30,
                     "ratio": predicted / peak if peak else None})
    return rows


def _experts_held(ctx: Context, group: dict, paths: list[str]) -> dict:
    """The device memory the two experts hold once loaded (the first to run on the device), per placement."""
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    held = {}
    for placement in ("keep", "offload"):
        engine = Engine(GroupConfig(**group, placement=placement))
        before = _allocated(ctx.device)
        engine.dit_info(paths)  # both experts loaded, the first to run on the device
        synchronizer(ctx.device)()
        held[placement] = (_allocated(ctx.device) - before) / 2**30
        del engine
    return held


def show(result: dict, ctx: Context) -> None:
    if "error" in result:
        print(f"memory on this device: {result['error']}")
        return
    print("a step's activations on this device (one rank, cfg 5): measured peak vs the pre-flight's prediction")
    for r in result["activations"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"  latent {'x'.join(map(str, r['latent']))} ({r['tokens']} tokens): measured "
              f"{r['measured_gib']:.2f} GiB, predicted {r['predicted_gib']:.2f} GiB, ratio {ratio}")
    held = result["experts_held_gib"]
    print(f"two experts loaded: device memory {held['keep']:.2f} GiB with placement keep, "
          f"{held['offload']:.2f} GiB with offload")

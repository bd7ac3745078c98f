"""Section 2: how fast is one Wan 2.1 1.3B-shaped DiT forward (random weights, bf16) at 480p x 81 frames
(32,760 tokens), ours at world size 1 with each attention backend against stock diffusers'
WanTransformer3DModel with the same weights? Interleaved forwards, medians; a sampler step at cfg > 1 is two.

Report key "step": one row per model with its forward time, the step estimate, and the ratio and error
against stock diffusers.
"""

from __future__ import annotations

import torch

from .common import Context, backends_available, rel, time_forwards, wan_setup


def run(ctx: Context) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(ctx.small, ctx.device)
    torch.manual_seed(0)
    stock = cast_model(WanTransformer3DModel(**config), dtype).to(ctx.device).eval()
    models = {"stock diffusers": stock}
    for backend in backends_available(ctx):
        if backend == "math" and not ctx.small:
            continue  # the fp32 reference kernel is for correctness, far too slow and large at 32k tokens
        ours = WanTransformer3DModel(**config).eval()
        ours.load_state_dict(stock.state_dict())
        models[f"ours ({backend})"] = parallelize_wan(cast_model(ours, dtype).to(ctx.device), SequenceParallel(),
                                                      backend).module
    seconds, outs = time_forwards(models, inputs, ctx.device, ctx.repeats)
    stock_s = seconds["stock diffusers"]
    return [{"model": name, "forward_s": seconds[name], "step_s_cfg": 2 * seconds[name],
             "vs_stock": seconds[name] / stock_s, "rel_err_vs_stock": rel(outs[name], outs["stock diffusers"])}
            for name in models]


def show(rows: list[dict], ctx: Context) -> None:
    print("Wan 1.3B-size forward, 480p x 81 frames (32,760 tokens), bf16" if not ctx.small else "small forward")
    print(f"{'model':<22}{'forward s':>10}{'step s (cfg)':>14}{'vs stock':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['model']:<22}{r['forward_s']:>10.3f}{r['step_s_cfg']:>14.3f}{r['vs_stock']:>10.3f}"
              f"{r['rel_err_vs_stock']:>10.1e}")

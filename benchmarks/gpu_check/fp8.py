"""Section 3: fp8 weights (formats/fp8.py). The same Wan forward with the blocks' Linear weights stored in fp8
and cast layer by layer, against those very weights dequantized to the compute dtype (the block weights are
made fp8-representable first, so the two should agree): error, time ratio and parameter-bytes ratio.

Report key "fp8": one dict, or {"error": ...} when the section raised.
"""

from __future__ import annotations

import torch

from .common import Context, rel, time_forwards, wan_setup


def run(ctx: Context) -> dict:
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats import fp8
    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.fsdp import parameter_bytes
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(ctx.small, ctx.device)
    torch.manual_seed(0)
    source = WanTransformer3DModel(**config).eval()
    markers = {}
    for name, module in source.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):  # make the weights fp8 values
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
            markers[f"{name}.weight"] = torch.ones(module.weight.shape[0])
    models = {}
    for kind in ("dequantized", "fp8"):
        model = cast_model(WanTransformer3DModel(**config).eval(), dtype)
        model.load_state_dict(source.state_dict())
        if kind == "fp8":
            fp8.keep_fp8(model, markers, ("blocks.",))
        models[kind] = parallelize_wan(model.to(ctx.device), SequenceParallel(), "sdpa").module
    seconds, outs = time_forwards(models, inputs, ctx.device, ctx.repeats)
    return {"dtype": str(dtype), "fp8_forward_s": seconds["fp8"], "dequantized_forward_s": seconds["dequantized"],
            "time_ratio": seconds["fp8"] / seconds["dequantized"],
            "bytes_ratio": parameter_bytes(models["fp8"]) / parameter_bytes(models["dequantized"]),
            "rel_err": rel(outs["fp8"], outs["dequantized"])}


def show(result: dict, ctx: Context) -> None:
    if "error" in result:
        print(f"fp8 weights: {result['error']}")
        return
    print(f"fp8 weights ({result['dtype']} compute): forward {result['fp8_forward_s']:.3f} s vs "
          f"{result['dequantized_forward_s']:.3f} s dequantized ({result['time_ratio']:.2f}x), parameter bytes "
          f"{result['bytes_ratio']:.2f}x, rel err {result['rel_err']:.1e}")

"""Section 7: our world-size-1 forward against ComfyUI's own WanModel (comfy.ldm.wan) with the same weights and
inputs on the same device, when COMFYUI_DIR names a ComfyUI checkout whose requirements import in this Python
(else a line says why it is skipped). Wan 1.3B-shaped at 480p with KERNEL_LAYERS blocks, bf16 (fp32 with
--small): time ratio and output error.

Report key "comfyui": one dict, {"skipped": reason} or {"error": ...}.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import KERNEL_LAYERS, Context, rel, time_forwards, wan_setup

TESTS = Path(__file__).resolve().parents[2] / "tests"  # the ComfyUI helpers the tests share


def run(ctx: Context) -> dict:
    """Our world-size-1 forward vs ComfyUI's WanModel (COMFYUI_DIR) on the same weights and inputs."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("skipped: ComfyUI's own Wan model: COMFYUI_DIR is not set (a ComfyUI checkout)")
        return {"skipped": "COMFYUI_DIR not set"}
    if time.monotonic() + 30 > ctx.deadline:
        print("skipped (time budget): ComfyUI's own Wan model")
        return {"skipped": "time budget"}
    sys.path.insert(0, str(TESTS))
    from comfyui_reference.common import wan_unet_config

    sys.path.insert(0, comfy_dir)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = ctx.device.type == "cpu"
        import comfy.supported_models
    except ModuleNotFoundError as exc:  # ComfyUI's own requirements (einops, ...) are not in this Python
        print(f"skipped: ComfyUI's own Wan model: its requirements are not installed in this Python ({exc}); run "
              f"this script with ComfyUI's Python, or pip install -r {comfy_dir}/requirements.txt")
        return {"skipped": f"ComfyUI's requirements missing: {exc}"}
    config, dtype, inputs = wan_setup(ctx.small, ctx.device)
    config = dict(config, num_layers=KERNEL_LAYERS)
    model_config = comfy.supported_models.WAN21_T2V(wan_unet_config(config))
    ours, theirs = _load_both(ctx, config, dtype, model_config)
    seconds, outs = time_forwards({"ours": ours, "comfyui": theirs}, inputs, ctx.device, ctx.repeats)
    ours_s, comfy_s = seconds["ours"], seconds["comfyui"]
    return {"ours_forward_s": ours_s, "comfyui_forward_s": comfy_s, "ours_vs_comfyui": ours_s / comfy_s,
            "rel_err": rel(outs["ours"], outs["comfyui"]), "layers": KERNEL_LAYERS, "dtype": str(dtype)}


def _load_both(ctx: Context, config: dict, dtype: torch.dtype, model_config) -> tuple:
    """Both models from one safetensors file of random weights: ours parallelized at world size 1 (sdpa), and
    ComfyUI's diffusion model from its model config, wrapped to be called like ours."""
    from activation_bench import write_model  # in benchmarks/, beside this package
    from safetensors.torch import load_file

    from usp_video.distributed.models.wan21.dit import load_wan_transformer, parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(config, Path(tmp, "wan.safetensors"))
        model_config.set_inference_dtype(dtype, None)
        comfy_model = model_config.get_model({}).diffusion_model
        comfy_model.load_state_dict(load_file(str(path)), strict=True)
        comfy_model = comfy_model.to(ctx.device, dtype).eval()
        ours = parallelize_wan(load_wan_transformer(path, dtype, ctx.device), SequenceParallel(), "sdpa").module.eval()

    def theirs(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, return_dict: bool = False) -> tuple:
        return (comfy_model(x, t, context),)  # ComfyUI's forward returns the tensor, ours a tuple

    return ours, theirs


def show(result: dict, ctx: Context) -> None:
    if "ours_forward_s" in result:
        print(f"ours vs ComfyUI's WanModel ({result['layers']} blocks, {result['dtype']}): "
              f"{result['ours_forward_s']:.3f} s vs {result['comfyui_forward_s']:.3f} s "
              f"({result['ours_vs_comfyui']:.3f}x), rel err {result['rel_err']:.1e}")
    else:
        print(f"ComfyUI's WanModel: {result.get('skipped', result.get('error'))}")

"""ComfyUI's own loader and fp8 layers against ours, on fp8 files of the tiny Wan DiT.

Run as `python -m comfyui_reference fp8 COMFYUI_DIR FILES_JSON` -> prints one JSON object of relative
errors. FILES_JSON: {"fp8_e4m3fn": path, "fp8_scaled": path} (tests/test_fp8.py writes them).
ComfyUI loads each file as comfy.sd.load_diffusion_model_state_dict does (its UNETLoader), but with the
tiny model's configuration given rather than detected (detection assumes 128-wide heads): a file with a
"scaled_fp8" marker gets ComfyUI's scaled-fp8 layers (model_detection.model_config_from_unet's rule: the
weight cast, times its scale_weight), and its own load_model_weights reads the tensors. Computing in float32
on the CPU, its forward must equal ours, which keeps the same fp8 weights and casts them with their
scales layer by layer (formats/fp8.py).
"""

import torch

from .common import rel, wan_unet_config


def comfy_load(path: str):
    """ComfyUI's diffusion model from an fp8 file of the tiny Wan DiT, computing in float32 on the CPU."""
    import comfy.supported_models
    import comfy.utils

    from usp_video.distributed.models.wan21.tiny import TINY_WAN_CONFIG as config

    sd = comfy.utils.load_torch_file(path)
    model_config = comfy.supported_models.WAN21_T2V(wan_unet_config(config))
    if "scaled_fp8" in sd:  # as model_detection.model_config_from_unet reads the marker
        model_config.scaled_fp8 = sd.pop("scaled_fp8").dtype
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return model.diffusion_model


def compare(files: dict) -> dict:
    from usp_video.distributed.models.wan21 import dit as wan

    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 16, 3, 4, 6, generator=g), torch.tensor([700.0]), torch.randn(1, 24, 32, generator=g)
    out = {}
    for name, path in files.items():
        theirs = comfy_load(path)
        kept = sum(1 for p in theirs.parameters() if p.dtype == torch.float8_e4m3fn)
        with torch.no_grad():
            native = theirs(x, t, ctx)
            ours = wan.load_wan_transformer(path)(x, t, ctx, return_dict=False)[0]
        out[name] = rel(ours, native)
        out[f"{name}_comfy_fp8_params"] = kept
    return out


"""Run ComfyUI's own HunyuanVideo model and KSampler on the tiny HunyuanVideo file; compare with ours.

Run as `python -m comfyui_reference hunyuan COMFYUI_DIR FILES_JSON` -> prints one JSON object of
relative errors (run as a subprocess by test_comfyui_native.py, like wan21.py).
ComfyUI infers num_heads = hidden / 128, which the tiny model does not follow, so its config is
given here from ours; the tensors are loaded from our file through ComfyUI's own key conversion.
"""

import torch

from .common import rel


def compare(paths: dict) -> dict:
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    from safetensors.torch import load_file

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.models.hunyuan_video import tiny
    from usp_video.distributed.models.hunyuan_video.dit import load_hunyuan_transformer

    cfg = tiny.TINY_HUNYUAN_CONFIG
    unet = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
            "vec_in_dim": cfg["pooled_projection_dim"], "context_in_dim": cfg["text_embed_dim"],
            "hidden_size": cfg["num_attention_heads"] * cfg["attention_head_dim"], "mlp_ratio": cfg["mlp_ratio"],
            "num_heads": cfg["num_attention_heads"], "depth": cfg["num_layers"],
            "depth_single_blocks": cfg["num_single_layers"], "axes_dim": cfg["rope_axes_dim"], "theta": 256,
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False}
    config = comfy.supported_models.HunyuanVideo(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(config.process_unet_state_dict(load_file(paths["dit"])), strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    g = torch.Generator().manual_seed(3)
    cond, pooled = torch.randn(1, 9, cfg["text_embed_dim"], generator=g), torch.randn(1, 16, generator=g)
    x, t = torch.randn(1, 16, 3, 4, 6, generator=g), torch.tensor([700.0])
    out = {}
    with torch.no_grad():
        ours = load_hunyuan_transformer(paths["dit"])(x, t, cond, torch.ones(1, 9), pooled, torch.tensor([6000.0]),
                                                      return_dict=False)[0]
        native = model.diffusion_model(x, t, cond, y=pooled, guidance=torch.tensor([6.0]))
        out["hunyuan_dit_forward"] = rel(ours, native)

    latent = torch.zeros(1, 16, 3, 4, 6)
    noise = comfy.sample.prepare_noise(latent, 77)
    positive = [[cond, {"pooled_output": pooled, "guidance": 6.0}]]
    native = comfy.sample.sample(patcher, noise, 4, 1.0, "euler", "simple", positive, [[cond, {"pooled_output": pooled}]],
                                 latent, seed=77, disable_pbar=True)
    ours = Engine().sample(SampleRequest(experts=[paths["dit"]], positive={"tokens": cond, "pooled_output": pooled},
                                         negative=None, latent=latent, seed=77, steps=4, cfg=1.0, shift=7.0,
                                         sampler="euler", options={"guidance": 6.0})).latent
    out["hunyuan_ksampler_euler"] = rel(ours, native)
    return out


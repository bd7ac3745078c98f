"""Wan 2.2 A14B against ComfyUI's own code: its Wan model (each tiny expert file loaded into ComfyUI's
WanModel, as ComfyUI loads a wan2.2_t2v_*_noise_14B file) and two KSamplerAdvanced nodes (euler, the
high-noise expert for steps 0..k with leftover noise, the low-noise expert from k), against our one-node
switch, our two USP Sampler Advanced runs, and native/USP mixed either way.

Run as `python -m comfyui_reference wan22 COMFYUI_DIR FILES_JSON` -> one JSON object of relative errors.
"""

import torch

from .common import comfy_wan_model, rel


def compare(paths: dict) -> dict:
    import nodes as comfy_nodes

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21 import tiny
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    experts = [paths["high_noise"], paths["low_noise"]]
    steps, shift, scale, boundary, seed = 6, 8.0, 3.5, 0.875, 21

    high, low = (comfy_wan_model(p, tiny.TINY_WAN_CONFIG, shift) for p in experts)
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randn(1, 24, 32, generator=g), torch.randn(1, 24, 32, generator=g)
    empty = torch.zeros(1, 16, 3, 4, 6)
    sigmas = sampling_sigmas(steps, shift)
    k = next(i for i in range(steps) if float(sigmas[i]) < boundary)  # the first step below the boundary

    def native(model, latent, add_noise, start, end, leftover):
        return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, seed, steps, scale, "euler", "simple",
                                                     [[pos, {}]], [[neg, {}]], {"samples": latent}, start, end,
                                                     leftover)[0]["samples"]

    engine = Engine()

    def ours(expert, latent, add_noise, start, end, leftover):
        return engine.sample(SampleRequest(experts=[experts[expert]], keep=[experts[1 - expert]], family="wan2.2-a14b",
                                           positive=pos, negative=neg, latent=latent, seed=seed, steps=steps,
                                           cfg=scale, shift=shift, sampler="euler", start_step=start, end_step=end,
                                           add_noise=add_noise == "enable", leftover_noise=leftover == "enable")).latent

    out = {"k": k}
    with torch.no_grad():
        native_first = native(high, empty, "enable", 0, k, "enable")
        reference = native(low, native_first, "disable", k, 10000, "disable")
        switch = engine.sample(SampleRequest(experts=experts, boundaries=[boundary], family="wan2.2-a14b",
                                             positive=pos, negative=neg, latent=empty, seed=seed, steps=steps,
                                             cfg=[scale, scale], shift=shift, sampler="euler")).latent
        ours_first = ours(0, empty, "enable", 0, k, "enable")
        out["wan22_switch_vs_two_ksampler_advanced"] = rel(switch, reference)
        out["wan22_two_usp_advanced_vs_two_ksampler_advanced"] = rel(
            ours(1, ours_first, "disable", k, 10000, "disable"), reference)
        out["wan22_native_high_usp_low"] = rel(ours(1, native_first, "disable", k, 10000, "disable"), reference)
        out["wan22_usp_high_native_low"] = rel(native(low, ours_first, "disable", k, 10000, "disable"), reference)
        out["wan22_high_leftover_latent"] = rel(ours_first, native_first)
        out["wan22_experts_differ"] = rel(native(high, empty, "enable", 0, 10000, "disable"), reference)
    return out


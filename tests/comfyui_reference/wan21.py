"""Run ComfyUI's own Wan model, VAE and KSampler on the tiny model files and compare with ours.

Run as `python -m comfyui_reference wan21 COMFYUI_DIR FILES_JSON` -> prints one JSON object of
relative errors. Run as a subprocess by test_comfyui_native.py, so that importing ComfyUI
(its top-level modules, its torch settings) does not touch the test process.
"""

import torch

from .common import comfy_wan_model, rel


def compare(paths: dict) -> dict:
    import comfy.ldm.wan.vae
    import comfy.sample
    from safetensors.torch import load_file

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.models.wan21 import dit as wan, tiny, vae as wan_vae

    vae_cfg = tiny.TINY_VAE_CONFIG
    patcher = comfy_wan_model(paths["dit"], tiny.TINY_WAN_CONFIG, 5.0)
    model = patcher.model

    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 24, 32, generator=g), torch.randn(1, 24, 32, generator=g)
    x, t = torch.randn(1, 16, 3, 4, 6, generator=g), torch.tensor([700.0])
    out = {}
    with torch.no_grad():
        out["dit_forward"] = rel(wan.load_wan_transformer(paths["dit"])(x, t, pos, return_dict=False)[0],
                                 model.diffusion_model(x, t, pos))

    def both(latent, seed, steps, cfg_scale, denoise):
        noise = comfy.sample.prepare_noise(latent, seed)
        native = comfy.sample.sample(patcher, noise, steps, cfg_scale, "euler", "simple", [[pos, {}]], [[neg, {}]],
                                     latent, denoise=denoise, seed=seed, disable_pbar=True)
        ours = Engine().sample(SampleRequest(experts=[paths["dit"]], positive=pos, negative=neg, latent=latent, seed=seed,
                                             steps=steps, cfg=cfg_scale, shift=5.0, sampler="euler", denoise=denoise)).latent
        return rel(ours, native)

    out["ksampler_euler"] = both(torch.zeros(1, 16, 3, 4, 6), 123, 4, 5.0, 1.0)

    # KSamplerAdvanced, the node itself (ComfyUI's nodes.py), against our step range
    import nodes as comfy_nodes

    engine = Engine()

    def native_adv(latent, add_noise, start, end, leftover):
        return comfy_nodes.KSamplerAdvanced().sample(patcher, add_noise, 7, 6, 4.0, "euler", "simple", [[pos, {}]],
                                                     [[neg, {}]], {"samples": latent}, start, end, leftover)[0]["samples"]

    def ours_adv(latent, add_noise, start, end, leftover):
        return engine.sample(SampleRequest(experts=[paths["dit"]], positive=pos, negative=neg, latent=latent, seed=7,
                                           steps=6, cfg=4.0, shift=5.0, sampler="euler", start_step=start,
                                           end_step=end, add_noise=add_noise == "enable",
                                           leftover_noise=leftover == "enable")).latent

    empty = torch.zeros(1, 16, 3, 4, 6)
    native_first = native_adv(empty, "enable", 0, 3, "enable")
    ours_first = ours_adv(empty, "enable", 0, 3, "enable")
    native_whole = native_adv(native_first, "disable", 3, 10000, "disable")
    out["advanced_leftover_latent"] = rel(ours_first, native_first)
    out["advanced_split_usp_usp"] = rel(ours_adv(ours_first, "disable", 3, 10000, "disable"), native_whole)
    out["advanced_split_native_usp"] = rel(ours_adv(native_first, "disable", 3, 10000, "disable"), native_whole)
    out["advanced_split_usp_native"] = rel(native_adv(ours_first, "disable", 3, 10000, "disable"), native_whole)
    out["advanced_end_without_leftover"] = rel(ours_adv(empty, "enable", 0, 4, "disable"),
                                               native_adv(empty, "enable", 0, 4, "disable"))
    out["advanced_start_on_empty"] = rel(ours_adv(empty, "enable", 2, 10000, "disable"),
                                         native_adv(empty, "enable", 2, 10000, "disable"))
    out["ksampler_euler_denoise"] = both(torch.randn(1, 16, 3, 4, 6, generator=g), 9, 4, 3.0, 0.6)

    vae = comfy.ldm.wan.vae.WanVAE(dim=vae_cfg["base_dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    vae.load_state_dict(load_file(paths["vae"]), strict=True)
    z = torch.randn(1, 16, 3, 4, 6, generator=g)
    with torch.no_grad():
        native = ((vae.decode(z).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1)
    out["vae_decode"] = rel(wan_vae.decode_video(wan_vae.load_wan_vae(paths["vae"]), z), native)
    return out


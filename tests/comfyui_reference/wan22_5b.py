"""Wan 2.2 TI2V-5B against ComfyUI's own code: its Wan 2.2 model (WAN22_T2V, the 48-channel latent
format) loading our tiny file, its KSampler (euler, simple, ModelSamplingSD3 shift 5), and its Wan 2.2
VAE (comfy.ldm.wan.vae2_2.WanVAE, built at the tiny size: ComfyUI's VAE loader fixes the width at 160).
Image to video: its Wan22ImageToVideoLatent (a start image encoded by its VAE with our tiny file) into its
KSampler (the noise_mask: KSamplerX0Inpaint, WAN22.process_timestep) against our sampler given that LATENT.

Run as `python -m comfyui_reference wan22_5b COMFYUI_DIR FILES_JSON` -> one JSON object of relative errors.
"""

import torch

from .common import comfy_wan_model, rel


def compare(paths: dict) -> dict:
    import comfy.ldm.wan.vae2_2
    import comfy.sample
    import nodes
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent
    from .vae_encode import comfy_vae as comfy_vae_of
    from safetensors.torch import load_file

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan22_5b import tiny
    from usp_video.distributed.models.wan22_5b.vae import load_wan22_vae
    from usp_video.distributed.models.video import decode_video
    from usp_video.distributed.requests import SampleRequest

    patcher = comfy_wan_model(paths["dit"], tiny.TINY_DIT_CONFIG, 5.0, "WAN22_T2V")

    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 24, 32, generator=g), torch.randn(1, 24, 32, generator=g)
    out = {}

    def both(latent, seed, steps, scale, denoise):
        noise = comfy.sample.prepare_noise(latent, seed)
        native = comfy.sample.sample(patcher, noise, steps, scale, "euler", "simple", [[pos, {}]], [[neg, {}]],
                                     latent, denoise=denoise, seed=seed, disable_pbar=True)
        ours = Engine().sample(SampleRequest(experts=[paths["dit"]], positive=pos, negative=neg, latent=latent,
                                             seed=seed, steps=steps, cfg=scale, shift=5.0, sampler="euler",
                                             denoise=denoise)).latent
        return rel(ours, native)

    out["ti2v_ksampler_euler"] = both(torch.zeros(1, 48, 3, 4, 6), 123, 4, 5.0, 1.0)
    out["ti2v_ksampler_euler_denoise"] = both(torch.randn(1, 48, 3, 4, 6, generator=g), 9, 4, 3.0, 0.6)

    # image to video: native Wan22ImageToVideoLatent with a start image encoded by ComfyUI's VAE (the tiny Wan 2.2
    # file) and native KSampler, against our engine given the same LATENT (samples and noise_mask)
    v = tiny.TINY_VAE_CONFIG
    comfy_vae = comfy_vae_of(paths["vae"], comfy.ldm.wan.vae2_2, {"dim": v["base_dim"], "dec_dim": v["decoder_base_dim"]})
    for name, (batch, seed, scale, image_size) in {"ti2v_start_image_ksampler_euler": (1, 21, 5.0, (64, 96)),
                                                   "ti2v_start_image_batch2_resized": (2, 5, 3.0, (80, 112))}.items():
        image = torch.rand(1, *image_size, 3, generator=g)
        with torch.inference_mode():  # as ComfyUI runs its nodes
            latent = Wan22ImageToVideoLatent.execute(comfy_vae, 96, 64, 9, batch, start_image=image)[0]
        latent = {k: t.clone() for k, t in latent.items()}  # out of inference mode
        native = nodes.KSampler().sample(patcher, seed, 4, scale, "euler", "simple", [[pos, {}]], [[neg, {}]],
                                         latent)[0]["samples"]
        ours = Engine().sample(SampleRequest(experts=[paths["dit"]], positive=pos, negative=neg,
                                             latent=latent["samples"], noise_mask=latent["noise_mask"], seed=seed,
                                             steps=4, cfg=scale, shift=5.0, sampler="euler")).latent
        out[name] = rel(ours, native)
        out[name + "_first_frame_kept"] = float((native[:, :, 0] - latent["samples"][:, :, 0]).abs().max())
        out[name + "_mask_zeros"] = float((latent["noise_mask"] == 0).float().mean())

    # Wan 2.2 Fun Control 5B: Wan22FunControlToVideo with ComfyUI's Wan 2.2 VAE (control video, start image and a
    # reference image: 48 + 4 + 48 channels beside the noise, the reference's tokens in front) -> KSampler, against
    # our engine given those conditioning tensors and our USP Sampler given the native conditioning
    from comfy_extras.nodes_wan import Wan22FunControlToVideo
    from .common import route_api_sample, run_node

    fun = comfy_wan_model(paths["fun_control"], tiny.TINY_FUN_CONTROL_CONFIG, 5.0, "WAN22_T2V")
    assert fun.model.diffusion_model.ref_conv is not None and fun.model.image_to_video
    engine = Engine()
    route_api_sample(engine)
    control, start, reference = (torch.rand(*size, 3, generator=g) for size in ((9, 64, 96), (1, 48, 80), (1, 70, 90)))
    with torch.inference_mode():
        fpos, fneg, flatent = Wan22FunControlToVideo.execute([[pos, {}]], [[neg, {}]], comfy_vae, 96, 64, 9, 1,
                                                             ref_image=reference, start_image=start,
                                                             control_video=control).result

    def tensors(conditioning):
        tokens, extra = conditioning[0]
        return {"tokens": tokens, "concat_latent_image": extra["concat_latent_image"], "concat_mask": extra["concat_mask"],
                "concat_mask_index": torch.tensor(extra["concat_mask_index"]),
                "reference_latent": extra["reference_latents"][-1]}

    assert fpos[0][1]["concat_mask_index"] == 48
    with torch.no_grad():
        native = nodes.KSampler().sample(fun, 17, 3, 4.0, "euler", "simple", fpos, fneg, flatent)[0]["samples"]
        out["fun_control_5b_engine"] = rel(engine.sample(SampleRequest(
            experts=[paths["fun_control"]], positive=tensors(fpos), negative=tensors(fneg), latent=flatent["samples"],
            seed=17, steps=3, cfg=4.0, shift=5.0, sampler="euler")).latent, native)
        socket = {"group": None, "path": paths["fun_control"], "experts": [paths["fun_control"]],
                  "info": {"family": "wan2.2-ti2v-5b", "latent_format": "Wan22", "model": "wan2.2-ti2v-5b"}}
        out["fun_control_5b_generic_nodes"] = rel(run_node(
            "UspSampler", model=socket, positive=fpos, negative=fneg, latent_image=flatent, seed=17, steps=3, cfg=4.0,
            shift=5.0, sampler_name="euler", denoise=1.0)[0]["samples"], native)

    v = tiny.TINY_VAE_CONFIG
    vae = comfy.ldm.wan.vae2_2.WanVAE(dim=v["base_dim"], dec_dim=v["decoder_base_dim"], z_dim=v["z_dim"],
                                      dim_mult=v["dim_mult"], num_res_blocks=v["num_res_blocks"], attn_scales=[],
                                      temperal_downsample=v["temperal_downsample"], dropout=0.0)
    vae.load_state_dict(load_file(paths["vae"]), strict=True)
    z = torch.randn(1, 48, 3, 4, 6, generator=g)
    with torch.no_grad():
        raw = vae.decode(z)
        native = ((raw.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1)  # ComfyUI's process_output
    out["ti2v_vae_decode_max_abs"] = float((decode_video(load_wan22_vae(paths["vae"]), z) - native).abs().max())
    out["ti2v_vae_clamped_fraction"] = float((raw.abs() > 1).float().mean())
    return out


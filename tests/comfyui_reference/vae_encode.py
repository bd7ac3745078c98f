"""USP VAE Encode against ComfyUI's own VAE Encode node (nodes.VAEEncode: comfy.sd.VAE's crop check, -1..1,
the video layout, its WanVAE.encode's mu) on the same IMAGE with the same tiny VAE file, for the Wan 2.1 VAE
(comfy.ldm.wan.vae) and the Wan 2.2 VAE (vae2_2). comfy.sd.VAE fixes the VAE's width (96 / 160): its WanVAE
classes are given the tiny width while the VAE loads, and the file must then load strictly.

Run as `python -m comfyui_reference vae_encode COMFYUI_DIR FILES_JSON` -> one JSON object: the max abs error
per case and the latents' magnitudes.
"""

import torch



def comfy_vae(path: str, module, widths: dict):
    """comfy.sd.VAE of a tiny Wan VAE file: module.WanVAE built at the tiny widths, the file loaded strictly."""
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(path)
    whole = module.WanVAE
    module.WanVAE = lambda **config: whole(**{**config, **widths})
    try:
        vae = comfy.sd.VAE(sd=state, dtype=torch.float32)
    finally:
        module.WanVAE = whole
    vae.first_stage_model.load_state_dict(state, strict=True)
    return vae


def compare(files: dict) -> dict:
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2
    import nodes

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG as WAN21
    from usp_video.distributed.models.wan22_5b.tiny import TINY_VAE_CONFIG as WAN22

    vaes = {"wan21": comfy_vae(files["wan21"], comfy.ldm.wan.vae, {"dim": WAN21["base_dim"]}),
            "wan22": comfy_vae(files["wan22"], comfy.ldm.wan.vae2_2,
                               {"dim": WAN22["base_dim"], "dec_dim": WAN22["decoder_base_dim"]})}
    g = torch.Generator().manual_seed(11)
    cases = {"wan21_9x40x24": ("wan21", (9, 40, 24)), "wan21_1x16x32": ("wan21", (1, 16, 32)),
             "wan22_5x48x32": ("wan22", (5, 48, 32))}
    engine, out = Engine(), {}
    for name, (vae, (frames, height, width)) in cases.items():
        pixels = torch.rand(frames, height, width, 3, generator=g)
        with torch.inference_mode():  # as ComfyUI runs its nodes
            native = nodes.VAEEncode().encode(vaes[vae], pixels)[0]["samples"]
        ours = engine.encode_video(files[vae], pixels)
        assert ours.shape == native.shape, (name, tuple(ours.shape), tuple(native.shape))
        out[name] = float((ours - native).abs().max())
        out[name + "_magnitude"] = float(native.abs().max())
    out["vae_dtype"] = str(vaes["wan21"].vae_dtype)
    return out


"""Wan 2.1 VACE against ComfyUI's own code: its UNETLoader on our tiny VACE file (its detection: WAN21_Vace,
VaceWanModel with 2 VACE blocks), WanVaceToVideo (its VAE Encode of the control video split by the mask, a
reference image of another size prepended; a second node stacked with another strength), KSampler and
TrimVideoLatent, all fp32; against our engine given the stacked tensors (the request as our samplers make it) and
against our generic sampler node given the native conditioning lists, then ComfyUI's TrimVideoLatent on our LATENT.

Run as `python -m comfyui_reference vace COMFYUI_DIR FILES_JSON` -> one JSON object of relative errors and facts.
FILES_JSON: the tiny VACE set (FAMILIES["wan2.1-vace"].make_tiny: "dit", "vae").
"""

from pathlib import Path

import torch

from .common import rel, route_api_sample, run_node


def compare(paths: dict) -> dict:
    import comfy.ldm.wan.vae
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_wan import TrimVideoLatent, WanVaceToVideo

    from .vae_encode import comfy_vae
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG
    from usp_video.distributed.requests import SampleRequest
    from usp_video.nodes.native_nodes import NATIVE_FAMILIES, _native_family

    folder_paths.add_model_folder_path("diffusion_models", str(Path(paths["dit"]).parent), is_default=True)
    vae = comfy_vae(paths["vae"], comfy.ldm.wan.vae, {"dim": TINY_VAE_CONFIG["base_dim"]})
    engine = Engine()
    route_api_sample(engine)
    out = {}

    shift = 5.0
    model = comfy_nodes.UNETLoader().load_unet(Path(paths["dit"]).name, "default")[0]
    inner = model.model.diffusion_model
    out["comfy_model_config"] = type(model.model.model_config).__name__
    out["comfy_vace_blocks"] = len(inner.vace_blocks)
    out["comfy_vace_mapping"] = sorted(inner.vace_layers_mapping)
    out["native_family"] = _native_family(model, NATIVE_FAMILIES, "model")
    model = ModelSamplingSD3().patch(model, shift)[0]
    socket = {"group": None, "path": paths["dit"], "experts": [paths["dit"]],
              "info": {"family": "wan2.1-vace", "latent_format": "Wan21", "model": "wan2.1-vace"}}

    def tensors(conditioning):  # the native lists stacked, as our request's side (not via our node code)
        tokens, extra = conditioning[0]
        cond = {"tokens": tokens}
        if "vace_frames" in extra:
            cond.update(vace_frames=torch.stack(extra["vace_frames"], 1), vace_mask=torch.stack(extra["vace_mask"], 1),
                        vace_strength=torch.tensor([extra["vace_strength"]]))
        return cond

    g = torch.Generator().manual_seed(6)
    text = [[[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 9, 4096, generator=g), {}]]]
    width, height, length = 48, 32, 9
    control = torch.rand(length - 2, 40, 56, 3, generator=g)  # shorter than the video: padded with gray
    masks = (torch.rand(length, 32, 48, generator=g) > 0.4).float()
    reference = torch.rand(1, 36, 60, 3, generator=g)
    other = torch.rand(length, 32, 48, 3, generator=g)

    def run(name, pos, neg, latent, trim, seed, steps, cfg, nodes=True):
        with torch.no_grad():
            native = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "simple", pos, neg,
                                                   latent)[0]
            ours = engine.sample(SampleRequest(experts=[paths["dit"]], positive=tensors(pos), negative=tensors(neg),
                                               latent=latent["samples"], seed=seed, steps=steps, cfg=cfg, shift=shift,
                                               sampler="euler")).latent
            out[name + "_engine"] = rel(ours, native["samples"])
            if not nodes:
                return native["samples"]
            node = run_node("UspSampler", model=socket, positive=pos, negative=neg, latent_image=latent, seed=seed,
                            steps=steps, cfg=cfg, shift=shift, sampler_name="euler", denoise=1.0)[0]
        out[name + "_generic_nodes"] = rel(node["samples"], native["samples"])
        native_trimmed = TrimVideoLatent.execute(native, trim).result[0]["samples"]
        ours_trimmed = TrimVideoLatent.execute(node, trim).result[0]["samples"]
        out[name + "_trimmed"] = rel(ours_trimmed, native_trimmed)
        out[name + "_trimmed_frames"] = [native["samples"].shape[2], ours_trimmed.shape[2]]
        return native["samples"]

    with torch.inference_mode():
        pos, neg, latent, trim = WanVaceToVideo.execute(*text, vae, width, height, length, 1, 1.0,
                                                        control_video=control, control_masks=masks,
                                                        reference_image=reference).result
    out["reference_trim"] = trim
    run("reference_control", pos, neg, latent, trim, 11, 3, 4.0)

    with torch.inference_mode():  # two WanVaceToVideo nodes stacked: strength 1 then 0.6, no reference
        pos1, neg1, latent, trim = WanVaceToVideo.execute(*text, vae, width, height, length, 1, 1.0,
                                                          control_video=control, control_masks=masks).result
        pos2, neg2, latent, trim = WanVaceToVideo.execute(pos1, neg1, vae, width, height, length, 1, 0.6,
                                                          control_video=other).result
    out["stacked_count"] = len(pos2[0][1]["vace_frames"])
    stacked = run("stacked", pos2, neg2, latent, trim, 12, 3, 1.0)
    single = run("single", pos1, neg1, latent, trim, 12, 3, 1.0, nodes=False)
    out["second_context_changes_result"] = rel(stacked, single)

    # the pack's USP Wan VACE To Video (its split VAE encode: here our engine's encode in this process) on the same
    # inputs: the conditioning native WanVaceToVideo makes with ComfyUI's own VAE, and the video sampled from it
    from usp_video.distributed import api

    api.encode_video = lambda group, vae_path, frames, on_progress=None: (engine.encode_video(vae_path, frames),
                                                                          "wan2.1")
    with torch.inference_mode():
        pos, neg, latent, trim = WanVaceToVideo.execute(*text, vae, width, height, length, 1, 0.8,
                                                        control_video=control, control_masks=masks,
                                                        reference_image=reference).result
    mine = run_node("UspWanVaceToVideo", positive=text[0], negative=text[1], vae={"group": None, "path": paths["vae"]},
                    width=width, height=height, length=length, batch_size=1, strength=0.8, control_video=control,
                    control_masks=masks, reference_image=reference)
    extra, made = mine[0][0][1], pos[0][1]
    out["node_trim"] = [mine[3], trim]
    out["node_frames"] = rel(extra["vace_frames"][0], made["vace_frames"][0])
    out["node_mask_equal"] = bool(torch.equal(extra["vace_mask"][0], made["vace_mask"][0]))
    out["node_strength"] = [extra["vace_strength"], made["vace_strength"]]
    assert mine[2]["samples"].shape == latent["samples"].shape
    with torch.no_grad():
        native = comfy_nodes.KSampler().sample(model, 13, 3, 4.0, "euler", "simple", pos, neg, latent)[0]["samples"]
        out["node_generic_nodes"] = rel(run_node(
            "UspSampler", model=socket, positive=mine[0], negative=mine[1], latent_image=mine[2], seed=13, steps=3,
            cfg=4.0, shift=shift, sampler_name="euler", denoise=1.0)[0]["samples"], native)

    # the command line's start image (WanVace.start_image_conditioning) == WanVaceToVideo given that image as the
    # control video and a mask keeping its frame
    from usp_video.distributed.models import FAMILIES

    family = FAMILIES["wan2.1-vace"]
    ours = family.start_image_conditioning(lambda frames: (engine.encode_video(paths["vae"], frames), family),
                                           reference, width, height, length)
    keep = torch.ones(length, height, width)
    keep[:1] = 0.0
    with torch.inference_mode():
        made = WanVaceToVideo.execute(*text, vae, width, height, length, 1, 1.0, control_video=reference,
                                      control_masks=keep).result[0][0][1]
    out["start_image_frames_max_abs"] = float((ours["vace_frames"][:, 0] - made["vace_frames"][0]).abs().max())
    out["start_image_frames_magnitude"] = float(made["vace_frames"][0].abs().mean())
    out["start_image_mask_equal"] = bool(torch.equal(ours["vace_mask"][:, 0], made["vace_mask"][0]))

    # the shipped VACE workflows' native nodes as ComfyUI 0.3.64 defines them: input names, output types
    import nodes as comfy_nodes_module
    from comfy_extras.nodes_video import GetVideoComponents, LoadVideo

    def schema(cls):
        inputs = cls.INPUT_TYPES()
        return {"inputs": [*inputs.get("required", {}), *inputs.get("optional", {})],
                "outputs": [str(t) for t in cls.RETURN_TYPES]}

    out["native_schemas"] = {name: schema(cls) for name, cls in (
        ("WanVaceToVideo", WanVaceToVideo), ("TrimVideoLatent", TrimVideoLatent), ("LoadVideo", LoadVideo),
        ("GetVideoComponents", GetVideoComponents), ("VAELoader", comfy_nodes_module.VAELoader),
        ("LoadImage", comfy_nodes_module.LoadImage))}

    run("text_only", text[0], text[1], {"samples": torch.zeros(1, 16, 3, 4, 6)}, 0, 13, 2, 4.0, nodes=False)
    return out

"""Wan 2.2 Animate against ComfyUI's own code: its UNETLoader detects the tiny ComfyUI-layout Animate DiT
(WAN22_Animate: AnimateWanModel with its fixed-size motion and face encoders; the file also loads strictly),
native WanAnimateToVideo (reference image, pose video and face video of other sizes than the video: its area
resizes, its VAE Encode of the reference, the pose video and the gray video; the face video at 512x512, -1 on the
negative; a synthetic clip_vision_output as in i2v.py) then KSampler (euler, one step, cfg 2: both passes), fp32; against our
engine given the tensors the node made; our generic USP Sampler given the native conditioning without its face video
(the motion encoder is slow on a CPU: two runs have it), then ComfyUI's TrimVideoLatent (trim_latent) on both
latents (the reference frame goes); our engine without pose and face video (the reference alone). The native MODEL (WAN22_Animate) maps to our family (nodes/native_nodes.py).

Run as `python -m comfyui_reference animate COMFYUI_DIR FILES_JSON` -> one JSON object.
FILES_JSON: the wan_animate family's tiny set (make_tiny: "dit_comfy", "vae").
"""

from pathlib import Path

import torch

from .common import rel, route_api_sample, run_node


def compare(paths: dict) -> dict:
    import comfy.clip_vision
    import comfy.ldm.wan.vae
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_wan import TrimVideoLatent, WanAnimateToVideo
    from safetensors.torch import load_file

    from .vae_encode import comfy_vae
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG
    from usp_video.distributed.requests import SampleRequest

    dit = paths["dit_comfy"]
    folder_paths.add_model_folder_path("diffusion_models", str(Path(dit).parent), is_default=True)
    vae = comfy_vae(paths["vae"], comfy.ldm.wan.vae, {"dim": TINY_VAE_CONFIG["base_dim"]})
    engine = Engine()
    route_api_sample(engine)
    out = {}

    seed, steps, scale, shift = 13, 1, 2.0, 5.0  # one step: one forward of both passes (the motion encoder is slow on CPU)
    model = comfy_nodes.UNETLoader().load_unet(Path(dit).name, "default")[0]
    out["comfy_model_class"] = type(model.model).__name__
    inner = model.model.diffusion_model
    out["comfy_face_adapter_blocks"] = len(inner.face_adapter.fuser_blocks)
    inner.load_state_dict(load_file(dit), strict=True)  # every tensor of the file is ComfyUI's, and all of them
    model = ModelSamplingSD3().patch(model, shift)[0]
    from usp_video.nodes.native_nodes import NATIVE_FAMILIES, _native_family

    out["native_family"] = _native_family(model, NATIVE_FAMILIES, "model")  # a native MODEL of it: our family

    g = torch.Generator().manual_seed(8)
    text = [[[torch.randn(1, 12, 4096, generator=g), {}]] for _ in range(2)]
    vision = comfy.clip_vision.Output()
    vision.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
    reference = torch.rand(1, 40, 48, 3, generator=g)
    pose = torch.rand(4, 24, 40, 3, generator=g)  # one frame short: the node repeats the last
    face = torch.rand(5, 48, 48, 3, generator=g)
    width, height, length = 32, 32, 5
    with torch.inference_mode():
        pos, neg, latent, trim_latent, trim_image, offset = WanAnimateToVideo.execute(
            *text, vae, width, height, length, 1, 5, 0, reference_image=reference, clip_vision_output=vision,
            face_video=face, pose_video=pose).result
    made = pos[0][1]
    out["latent_shape"] = list(latent["samples"].shape)
    out["pose_shape"] = list(made["pose_video_latent"].shape)
    out["face_shape"] = list(made["face_video_pixels"].shape)
    out["negative_face_is_minus_one"] = bool((neg[0][1]["face_video_pixels"] == -1).all())
    out["trim_latent"], out["trim_image"], out["offset"] = trim_latent, trim_image, offset

    def tensors_of(conditioning):  # the native conditioning's tensors as our request's side (not via our node code)
        tokens, extra = conditioning[0]
        side = {"tokens": tokens, "clip_vision": extra["clip_vision_output"].penultimate_hidden_states}
        side.update({k: extra[k] for k in ("concat_latent_image", "concat_mask", "pose_video_latent",
                                           "face_video_pixels") if k in extra})
        return side

    tensors = tensors_of

    socket = {"group": None, "path": dit, "experts": [dit],
              "info": {"family": "wan2.2-animate", "latent_format": "Wan21", "model": "wan2.2-animate"}}
    def drop(conditioning, keys):  # the same conditioning without some of WanAnimateToVideo's keys
        return [[c[0], {k: v for k, v in c[1].items() if k not in keys}] for c in conditioning]

    with torch.no_grad():  # the motion encoder at 512x512 is the slow part on a CPU: two runs with the face video
        native = comfy_nodes.KSampler().sample(model, seed, steps, scale, "euler", "simple", pos, neg,
                                               latent)[0]
        ours = engine.sample(SampleRequest(experts=[dit], positive=tensors(pos), negative=tensors(neg),
                                           latent=latent["samples"], seed=seed, steps=steps, cfg=scale, shift=shift,
                                           sampler="euler")).latent
        out["ksampler_engine"] = rel(ours, native["samples"])
        # the face video counts: ComfyUI's run with the pose video alone differs
        pose_only = [drop(c, ("face_video_pixels",)) for c in (pos, neg)]
        native_pose = comfy_nodes.KSampler().sample(model, seed, steps, scale, "euler", "simple", *pose_only,
                                                    latent)[0]
        out["face_changes_result"] = rel(native_pose["samples"], native["samples"])
        # our generic sampler node given the native conditioning (pose only), then TrimVideoLatent on both
        node = run_node("UspSampler", model=socket, positive=pose_only[0], negative=pose_only[1], latent_image=latent,
                        seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler", denoise=1.0)[0]
        out["ksampler_generic_nodes"] = rel(node["samples"], native_pose["samples"])
        trimmed_native = TrimVideoLatent.execute(native_pose, trim_latent).result[0]["samples"]
        trimmed_ours = TrimVideoLatent.execute(node, trim_latent).result[0]["samples"]
        out["trimmed_shape"] = list(trimmed_ours.shape)
        out["trimmed"] = rel(trimmed_ours, trimmed_native)
        # neither pose nor face video (ComfyUI's model runs without them): the reference image alone
        with torch.inference_mode():
            bare = WanAnimateToVideo.execute(*text, vae, width, height, length, 1, 5, 0, reference_image=reference,
                                             clip_vision_output=vision).result
        assert "pose_video_latent" not in bare[0][0][1] and "face_video_pixels" not in bare[0][0][1]
        native_bare = comfy_nodes.KSampler().sample(model, seed, steps, scale, "euler", "simple", bare[0], bare[1],
                                                    bare[2])[0]["samples"]
        out["no_pose_no_face_engine"] = rel(engine.sample(SampleRequest(
            experts=[dit], positive=tensors_of(bare[0]), negative=tensors_of(bare[1]), latent=bare[2]["samples"],
            seed=seed, steps=steps, cfg=scale, shift=shift, sampler="euler")).latent, native_bare)
    return out

"""Image to video against ComfyUI's own code: its UNETLoader (tiny detectable Wan DiTs: Wan 2.1 I2V with the CLIP
vision image embedder, two Wan 2.2 I2V A14B experts without it), VAE Encode inside native WanImageToVideo /
WanFirstLastFrameToVideo (start and end images of another size than the video: their bilinear centre-crop
resize), then KSampler (Wan 2.1, cfg 1 and cfg > 1) or two KSamplerAdvanced (Wan 2.2 A14B), all fp32; against
our engine given the conditioning tensors those nodes made (SampleRequest) and against our Wan samplers given
the native conditioning lists (nodes/conditioning.family_conditioning; api.sample's checks and wire frame).
ComfyUI's CLIP vision loader takes only full-size models: both sides get one synthetic clip_vision_output
(comfy.clip_vision.Output holding random [1, 257, 1280] penultimate hidden states).

Run as `python -m comfyui_reference i2v COMFYUI_DIR FILES_JSON` -> one JSON object of relative errors.
FILES_JSON: common.make_detectable_wan's paths of DITS (configs: dit_configs()) and "vae", the tiny
Wan 2.1 VAE.
"""

from pathlib import Path

import torch

from .common import detectable_wan_i2v_config, rel, route_api_sample, run_node

DITS = {"wan21_i2v": 51, "high_noise": 52, "low_noise": 53, "wan21_fun_control": 54, "fun_high_noise": 55,
        "fun_low_noise": 56}


def dit_configs() -> dict[str, dict]:
    # Wan 2.1 Fun Control: the I2V DiT's image embedder, 48 input channels (ComfyUI detects WAN21_FunControl2V)
    return {"wan21_i2v": detectable_wan_i2v_config(True), "high_noise": detectable_wan_i2v_config(False),
            "low_noise": detectable_wan_i2v_config(False),
            "wan21_fun_control": dict(detectable_wan_i2v_config(True), in_channels=48),
            # Wan 2.2 Fun Control A14B's experts: 52 channels and the reference-image convolution (ref_conv)
            **{name: dict(detectable_wan_i2v_config(False), in_channels=52, ref_channels=16)
               for name in ("fun_high_noise", "fun_low_noise")}}


def compare(paths: dict) -> dict:
    import comfy.clip_vision
    import comfy.ldm.wan.vae
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_wan import (Wan22FunControlToVideo, WanFirstLastFrameToVideo, WanFunControlToVideo,
                                        WanFunInpaintToVideo, WanImageToVideo)

    from .vae_encode import comfy_vae
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.sampling.schedules import sampling_sigmas
    from usp_video.nodes import model_socket

    folder_paths.add_model_folder_path("diffusion_models", str(Path(paths["wan21_i2v"]).parent), is_default=True)
    vae = comfy_vae(paths["vae"], comfy.ldm.wan.vae, {"dim": TINY_VAE_CONFIG["base_dim"]})
    engine = Engine()
    route_api_sample(engine)  # our sampler nodes' requests: api.sample's checks and wire frame, this engine

    def native_model(dit, shift):
        model = comfy_nodes.UNETLoader().load_unet(Path(paths[dit]).name, "default")[0]
        inner = model.model.diffusion_model
        channels = {"wan21_fun_control": 48, "fun_high_noise": 52, "fun_low_noise": 52}.get(dit, 36)
        assert inner.patch_embedding.weight.shape[1] == channels and inner.patch_embedding.weight.dtype == torch.float32
        # detected as Wan 2.1 I2V, Fun Control (its model_base has image_to_video off) or an A14B expert
        assert (inner.img_emb is not None) == (dit in ("wan21_i2v", "wan21_fun_control")), dit
        assert model.model.image_to_video == (dit == "wan21_i2v"), dit
        assert (inner.ref_conv is not None) == dit.startswith("fun_"), dit
        return ModelSamplingSD3().patch(model, shift)[0]

    def socket(experts, family):  # a USP loader's model socket (nodes/model_socket.py load_model)
        return {"group": None, "path": paths[experts[0]], "experts": [paths[e] for e in experts],
                "info": {"family": family, "latent_format": "Wan21", "model": family}}

    def tensors(conditioning):  # what the native conditioning carries, as our request's side (not via our node code)
        tokens, extra = conditioning[0]
        cond = {"tokens": tokens, "concat_latent_image": extra["concat_latent_image"]}
        if "concat_mask" in extra:
            cond["concat_mask"] = extra["concat_mask"]
        if "concat_mask_index" in extra:
            cond["concat_mask_index"] = torch.tensor(extra["concat_mask_index"])
        if "reference_latents" in extra:
            cond["reference_latent"] = extra["reference_latents"][-1]
        if "clip_vision_output" in extra:
            cond["clip_vision"] = extra["clip_vision_output"].penultimate_hidden_states
        return cond

    g = torch.Generator().manual_seed(6)
    text = [[[torch.randn(1, 12, 4096, generator=g), {}]] for _ in range(2)]
    vision = comfy.clip_vision.Output()
    vision.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
    start = torch.rand(1, 36, 60, 3, generator=g)  # 5:3, the video 3:2: cropped left and right, then bilinear
    end = torch.rand(1, 40, 40, 3, generator=g)
    width, height, out = 48, 32, {}

    # Wan 2.1 I2V: WanImageToVideo (CLIP vision) -> KSampler, cfg 1 (no negative pass) and cfg 4
    seed, steps, shift = 11, 3, 5.0
    wan21 = native_model("wan21_i2v", shift)
    for length, scale in ((5, 1.0), (9, 4.0)):
        case = f"wan21_i2v_len{length}_cfg{scale:g}"
        with torch.inference_mode():
            pos, neg, latent = WanImageToVideo.execute(*text, vae, width, height, length, 1, start_image=start,
                                                       clip_vision_output=vision).result
        made = pos[0][1]
        assert made["concat_latent_image"].shape == latent["samples"].shape == (1, 16, (length + 3) // 4, 4, 6)
        out[case + "_start_frames"] = int((made["concat_mask"] == 0).sum() // 24)  # latent frames held, 0 in the mask
        with torch.no_grad():
            native = comfy_nodes.KSampler().sample(wan21, seed, steps, scale, "euler", "simple", pos, neg,
                                                   latent)[0]["samples"]
            ours = engine.sample(SampleRequest(experts=[paths["wan21_i2v"]], positive=tensors(pos),
                                               negative=tensors(neg), latent=latent["samples"], seed=seed, steps=steps,
                                               cfg=scale, shift=shift, sampler="euler")).latent
            out[case + "_engine"] = rel(ours, native)
            node = run_node("UspWanSampler", model=socket(["wan21_i2v"], "wan2.1"), positive=pos, negative=neg,
                            latent_image=latent, seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler",
                            denoise=1.0)[0]["samples"]
            out[case + "_nodes"] = rel(node, native)
            node = run_node("UspSampler", model=socket(["wan21_i2v"], "wan2.1"), positive=pos, negative=neg,
                            latent_image=latent, seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler",
                            denoise=1.0)[0]["samples"]
            out[case + "_generic_nodes"] = rel(node, native)
            if length == 5:  # the image's part: the same run with another clip_vision_output
                other = comfy.clip_vision.Output()
                other.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
                changed = [[pos[0][0], dict(made, clip_vision_output=other)]]
                out["wan21_i2v_clip_vision_changes_result"] = rel(comfy_nodes.KSampler().sample(
                    wan21, seed, steps, scale, "euler", "simple", changed, neg, latent)[0]["samples"], native)
                # a latent of twice the size: the start video and mask resized to it (bilinear) on both sides
                big = {"samples": torch.zeros(1, 16, 2, 8, 12)}
                native = comfy_nodes.KSampler().sample(wan21, seed, steps, scale, "euler", "simple", pos, neg,
                                                       big)[0]["samples"]
                ours = engine.sample(SampleRequest(experts=[paths["wan21_i2v"]], positive=tensors(pos),
                                                   negative=tensors(neg), latent=big["samples"], seed=seed,
                                                   steps=steps, cfg=scale, shift=shift, sampler="euler")).latent
                out["wan21_i2v_resized_to_latent_engine"] = rel(ours, native)

    # Wan 2.2 I2V A14B: two 36-channel experts, no CLIP vision; two KSamplerAdvanced split at the boundary
    seed, steps, scale, shift, boundary = 21, 4, 3.5, 8.0, 0.9
    sigmas = sampling_sigmas(steps, shift)
    k = next(i for i in range(steps) if float(sigmas[i]) < boundary)
    out["wan22_k"] = k
    high, low = native_model("high_noise", shift), native_model("low_noise", shift)
    pair = socket(["high_noise", "low_noise"], "wan2.2-a14b")

    def two_advanced(pos, neg, latent):
        first = comfy_nodes.KSamplerAdvanced().sample(high, "enable", seed, steps, scale, "euler", "simple", pos, neg,
                                                      latent, 0, k, "enable")[0]
        return comfy_nodes.KSamplerAdvanced().sample(low, "disable", seed, steps, scale, "euler", "simple", pos, neg,
                                                     first, k, 10000, "disable")[0]["samples"]

    def switch_engine(pos, neg, latent):
        return engine.sample(SampleRequest(experts=[paths["high_noise"], paths["low_noise"]], boundaries=[boundary],
                                           family="wan2.2-a14b", positive=tensors(pos), negative=tensors(neg),
                                           latent=latent["samples"], seed=seed, steps=steps, cfg=[scale, scale],
                                           shift=shift, sampler="euler")).latent

    with torch.inference_mode():
        i2v = WanImageToVideo.execute(*text, vae, width, height, 9, 1, start_image=start).result
        flf = WanFirstLastFrameToVideo.execute(*text, vae, width, height, 9, 1, start_image=start,
                                               end_image=end).result
    out["flf_mask_shape"] = list(flf[0][0][1]["concat_mask"].shape)  # [1, 4, T, H, W]: per pixel frame
    with torch.no_grad():
        native = two_advanced(*i2v)
        out["wan22_i2v_switch_engine"] = rel(switch_engine(*i2v), native)
        out["wan22_i2v_switch_nodes"] = rel(run_node(
            "UspWan22Sampler", model=pair, positive=i2v[0], negative=i2v[1], latent_image=i2v[2], seed=seed,
            steps=steps, cfg_high_noise=scale, cfg_low_noise=scale, shift=shift, boundary=boundary,
            sampler_name="euler", denoise=1.0)[0]["samples"], native)
        out["wan22_i2v_switch_generic_nodes"] = rel(run_node(
            "UspSampler", model=pair, positive=i2v[0], negative=i2v[1], latent_image=i2v[2], seed=seed, steps=steps,
            cfg=scale, shift=shift, boundary=boundary, sampler_name="euler", denoise=1.0)[0]["samples"], native)
        common = dict(noise_seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler", positive=i2v[0],
                      negative=i2v[1])
        first = run_node("UspWanSamplerAdvanced", model=model_socket.expert_socket(pair, 0), add_noise="enable",
                         latent_image=i2v[2], start_at_step=0, end_at_step=k, return_with_leftover_noise="enable",
                         **common)[0]
        second = run_node("UspWanSamplerAdvanced", model=model_socket.expert_socket(pair, 1), add_noise="disable",
                          latent_image=first, start_at_step=k, end_at_step=10000, return_with_leftover_noise="disable",
                          **common)[0]
        out["wan22_i2v_two_advanced_nodes"] = rel(second["samples"], native)
        native_flf = two_advanced(*flf)
        out["wan22_flf_switch_engine"] = rel(switch_engine(*flf), native_flf)
        out["wan22_flf_changes_result"] = rel(native_flf, native)

    # Wan 2.1 Fun Control: WanFunControlToVideo (a control video and a start image of other sizes, VAE Encode) ->
    # KSampler; with a CLIP vision output (cfg 4) and without one (cfg 1: ComfyUI's cross-attention then takes the
    # text through the image keys too). Fun InP: WanFunInpaintToVideo (start and end images) on the I2V DiT.
    seed, steps, shift = 31, 3, 5.0
    fun = native_model("wan21_fun_control", shift)
    from usp_video.nodes import native_nodes  # the native-MODEL path takes ComfyUI's I2V and Fun Control MODELs

    out["native_families"] = [native_nodes._native_family(m, native_nodes.NATIVE_FAMILIES, "model")
                              for m in (wan21, fun)]
    control = torch.rand(9, 40, 56, 3, generator=g)
    for case, scale, vision_input in (("fun_control_clip_cfg4", 4.0, vision), ("fun_control_cfg1", 1.0, None)):
        with torch.inference_mode():
            pos, neg, latent = WanFunControlToVideo.execute(*text, vae, width, height, 9, 1, start_image=start,
                                                            clip_vision_output=vision_input,
                                                            control_video=control).result
        assert pos[0][1]["concat_latent_image"].shape[1] == 32 and "concat_mask" not in pos[0][1]
        with torch.no_grad():
            native = comfy_nodes.KSampler().sample(fun, seed, steps, scale, "euler", "simple", pos, neg,
                                                   latent)[0]["samples"]
            out[case + "_engine"] = rel(engine.sample(SampleRequest(
                experts=[paths["wan21_fun_control"]], positive=tensors(pos), negative=tensors(neg),
                latent=latent["samples"], seed=seed, steps=steps, cfg=scale, shift=shift, sampler="euler")).latent,
                native)
            out[case + "_generic_nodes"] = rel(run_node(
                "UspSampler", model=socket(["wan21_fun_control"], "wan2.1"), positive=pos, negative=neg,
                latent_image=latent, seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler",
                denoise=1.0)[0]["samples"], native)
            if case == "fun_control_cfg1":  # the control video is used
                still = [[pos[0][0], dict(pos[0][1], concat_latent_image=pos[0][1]["concat_latent_image"].flip(2))]]
                out["fun_control_changes_result"] = rel(comfy_nodes.KSampler().sample(
                    fun, seed, steps, scale, "euler", "simple", still, neg, latent)[0]["samples"], native)
    # the pack's USP Wan Fun Control To Video (its split VAE encode: here our engine's encode in this process) on
    # the same images: the conditioning native WanFunControlToVideo makes with ComfyUI's own VAE, and its video
    from usp_video.distributed import api

    api.encode_video = lambda group, vae_path, frames, on_progress=None: (engine.encode_video(vae_path, frames),
                                                                          "wan2.1")
    with torch.inference_mode():
        pos, neg, latent = WanFunControlToVideo.execute(*text, vae, width, height, 9, 1, start_image=start,
                                                        control_video=control).result
    ours = run_node("UspWanFunControlToVideo", positive=text[0], negative=text[1], vae={"group": None,
                    "path": paths["vae"]}, width=width, height=height, length=9, batch_size=1, start_image=start,
                    control_video=control)
    out["fun_control_node_concat"] = rel(ours[0][0][1]["concat_latent_image"], pos[0][1]["concat_latent_image"])
    assert ours[2]["samples"].shape == latent["samples"].shape
    with torch.no_grad():
        native = comfy_nodes.KSampler().sample(fun, seed, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
        out["fun_control_node_generic_nodes"] = rel(run_node(
            "UspSampler", model=socket(["wan21_fun_control"], "wan2.1"), positive=ours[0], negative=ours[1],
            latent_image=ours[2], seed=seed, steps=steps, cfg=1.0, shift=shift, sampler_name="euler",
            denoise=1.0)[0]["samples"], native)
    # Wan 2.2 Fun Control A14B: Wan22FunControlToVideo (control video, start image, a reference image: its tokens
    # in front of the video's) -> two KSamplerAdvanced split at the boundary, against our switch and sampler node
    steps, scale, boundary = 4, 3.5, 0.9
    sigmas = sampling_sigmas(steps, shift)
    k = next(i for i in range(steps) if float(sigmas[i]) < boundary)
    high, low = native_model("fun_high_noise", shift), native_model("fun_low_noise", shift)
    fun_pair = socket(["fun_high_noise", "fun_low_noise"], "wan2.2-a14b")
    reference = torch.rand(1, 30, 50, 3, generator=g)
    with torch.inference_mode():
        pos, neg, latent = Wan22FunControlToVideo.execute(*text, vae, width, height, 9, 1, ref_image=reference,
                                                          start_image=start, control_video=control).result
        plain = Wan22FunControlToVideo.execute(*text, vae, width, height, 9, 1, start_image=start,
                                               control_video=control).result
    assert pos[0][1]["concat_mask_index"] == 16 and len(pos[0][1]["reference_latents"]) == 1
    with torch.no_grad():
        def native_two(p, n, lat):
            first = comfy_nodes.KSamplerAdvanced().sample(high, "enable", seed, steps, scale, "euler", "simple", p, n,
                                                          lat, 0, k, "enable")[0]
            return comfy_nodes.KSamplerAdvanced().sample(low, "disable", seed, steps, scale, "euler", "simple", p, n,
                                                         first, k, 10000, "disable")[0]["samples"]

        for case, (p, n, lat) in (("fun22_reference", (pos, neg, latent)), ("fun22_no_reference", plain)):
            native = native_two(p, n, lat)
            out[case + "_engine"] = rel(engine.sample(SampleRequest(
                experts=[paths["fun_high_noise"], paths["fun_low_noise"]], boundaries=[boundary], family="wan2.2-a14b",
                positive=tensors(p), negative=tensors(n), latent=lat["samples"], seed=seed, steps=steps,
                cfg=[scale, scale], shift=shift, sampler="euler")).latent, native)
            out[case + "_generic_nodes"] = rel(run_node(
                "UspSampler", model=fun_pair, positive=p, negative=n, latent_image=lat, seed=seed, steps=steps,
                cfg=scale, cfg_low_noise=scale, shift=shift, boundary=boundary, sampler_name="euler",
                denoise=1.0)[0]["samples"], native)
            if case == "fun22_reference":
                with_reference = native
        out["fun22_reference_changes_result"] = rel(with_reference, native)

    with torch.inference_mode():
        pos, neg, latent = WanFunInpaintToVideo.execute(*text, vae, width, height, 9, 1, start_image=start,
                                                        end_image=end, clip_vision_output=vision).result
    with torch.no_grad():
        native = comfy_nodes.KSampler().sample(wan21, seed, steps, 3.0, "euler", "simple", pos, neg,
                                               latent)[0]["samples"]
        out["fun_inp_engine"] = rel(engine.sample(SampleRequest(
            experts=[paths["wan21_i2v"]], positive=tensors(pos), negative=tensors(neg), latent=latent["samples"],
            seed=seed, steps=steps, cfg=3.0, shift=shift, sampler="euler")).latent, native)
        out["fun_inp_generic_nodes"] = rel(run_node(
            "UspSampler", model=socket(["wan21_i2v"], "wan2.1"), positive=pos, negative=neg, latent_image=latent,
            seed=seed, steps=steps, cfg=3.0, shift=shift, sampler_name="euler", denoise=1.0)[0]["samples"], native)
    return out


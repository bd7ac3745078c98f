"""LoRAs against ComfyUI's own code: its UNETLoader (ComfyUI detects the tiny 128-wide-head Wan DiTs from the
files alone), two stacked LoraLoaderModelOnly (strengths 1.0 and 0.6, two key layouts), ModelSamplingSD3 and
KSampler (Wan 2.1) or two KSamplerAdvanced with a LoRA chain per expert (Wan 2.2 A14B), all fp32; against our
engine given the same chains (SampleRequest.loras), and against our LoRA nodes' sockets sampled by our sampler
nodes (the request they build, through the wire format, run by our engine).

Run as `python -m comfyui_reference lora COMFYUI_DIR FILES_JSON` -> one JSON object of relative errors.
FILES_JSON: common.make_detectable_wan's paths of DITS and LORAS.
"""

from pathlib import Path

import torch

from .common import rel, route_api_sample, run_node

# The files (common.make_detectable_wan): DiTs {name: seed}, LoRAs {name: (layout, seed)}.
DITS = {"wan21": 31, "high_noise": 32, "low_noise": 33}
LORAS = {"wan21_kohya": ("kohya", 41), "wan21_distill": ("distill", 42), "high_kohya": ("kohya", 43),
         "high_distill": ("distill", 44), "low_peft": ("peft", 45), "low_distill": ("distill", 46)}
# (LoRA name, strength) chains, as LoraLoaderModelOnly nodes stacked on each DiT: kohya's layout, or peft's under
# lora_unet_, then a distillation LoRA's (pairs with alpha and diff_b, diff on the norms and modulation tables, and
# pairs on the embeddings, head and patch embedding: common._add_beyond_block_linears).
CHAINS = {"wan21": [("wan21_kohya", 1.0), ("wan21_distill", 0.6)],
          "high_noise": [("high_kohya", 1.0), ("high_distill", 0.6)],
          "low_noise": [("low_peft", 1.0), ("low_distill", 0.6)]}


def compare(paths: dict) -> dict:
    import comfy.model_management
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from safetensors.torch import load_file

    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.sampling.schedules import sampling_sigmas
    from usp_video.nodes import model_socket

    for folder in ("diffusion_models", "loras"):  # ComfyUI's model folders: the nodes on both sides look here
        folder_paths.add_model_folder_path(folder, str(Path(paths["wan21"]).parents[1] / folder), is_default=True)
    engine = Engine()  # one for every run of ours, as a group lives across prompts: LoRA lists change on it

    route_api_sample(engine)  # sampler_run.run_sampler calls api.sample: its checks, its frame, our engine

    def native_model(dit, chain, shift):
        model = comfy_nodes.UNETLoader().load_unet(Path(paths[dit]).name, "default")[0]
        for name, strength in chain:
            model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, Path(paths[name]).name, strength)[0]
        assert model.model.diffusion_model.dim == 256 and model.model.diffusion_model.num_heads == 2
        assert model.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float32  # fp32: no rounding
        return ModelSamplingSD3().patch(model, shift)[0]

    def ours_chain(dit):
        return [[paths[name], strength] for name, strength in CHAINS[dit]]

    def socket(experts, family):  # a USP loader's model socket (nodes/model_socket.py load_model)
        return {"group": None, "path": paths[experts[0]], "experts": [paths[e] for e in experts],
                "info": {"family": family, "latent_format": "Wan21", "model": family}}

    def with_usp_loras(model, dit):  # USP LoRA nodes chained on a Wan model socket
        for name, strength in CHAINS[dit]:
            model = run_node("UspLora", model=model, lora_name=Path(paths[name]).name, strength=strength)[0]
        return model

    g = torch.Generator().manual_seed(5)
    pos, neg = [[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 12, 4096, generator=g), {}]]
    empty = torch.zeros(1, 16, 3, 4, 6)
    out = {}

    # Wan 2.1: UNETLoader -> LoraLoaderModelOnly x2 -> ModelSamplingSD3 -> KSampler
    seed, steps, scale, shift = 11, 3, 4.0, 5.0

    def ksampler(model):
        return comfy_nodes.KSampler().sample(model, seed, steps, scale, "euler", "simple", pos, neg,
                                             {"samples": empty})[0]["samples"]

    last = {}  # the last run's SampleResult

    def ours_wan21(loras):
        last["run"] = engine.sample(SampleRequest(experts=[paths["wan21"]], positive=pos[0][0], negative=neg[0][0],
                                                  latent=empty, seed=seed, steps=steps, cfg=scale, shift=shift,
                                                  sampler="euler", loras=loras))
        return last["run"].latent

    with torch.no_grad():
        base = ksampler(native_model("wan21", [], shift))
        patched = native_model("wan21", CHAINS["wan21"], shift)
        native = ksampler(patched)
        comfy.model_management.load_models_gpu([patched])  # as sampled: its weights patched
        stored, used = load_file(paths["wan21"]), patched.model.diffusion_model.state_dict()
        # what lora.py's _comfyui_never_patches assumes (the distill LoRA has diffs for all of these)
        out["comfyui_modulation_change"] = max(float((used[k] - stored[k]).abs().max()) for k in stored
                                               if k.endswith("modulation"))
        out["comfyui_norm3_change"] = float((used["blocks.0.norm3.bias"] - stored["blocks.0.norm3.bias"]).abs().max())
        out["wan21_no_lora"] = rel(ours_wan21([]), base)
        out["wan21_lora_changes_result"] = rel(native, base)
        out["wan21_engine"] = rel(ours_wan21([ours_chain("wan21")]), native)
        out["wan21_modulation_warned"] = any("modulation tables" in w for w in last["run"].lora_warnings)
        node_model = with_usp_loras(socket(["wan21"], "wan2.1"), "wan21")
        out["wan21_nodes"] = rel(run_node("UspWanSampler", model=node_model, positive=pos, negative=neg,
                                          latent_image={"samples": empty}, seed=seed, steps=steps, cfg=scale,
                                          shift=shift, sampler_name="euler", denoise=1.0)[0]["samples"], native)
        generic = socket(["wan21"], "wan2.1")  # USP LoRA (generic) x2 -> USP Sampler
        for name, strength in CHAINS["wan21"]:
            generic = run_node("UspLoraLoader", model=generic, lora_name=Path(paths[name]).name, strength=strength,
                               expert="all")[0]
        out["wan21_generic_nodes"] = rel(run_node(
            "UspSampler", model=generic, positive=pos, negative=neg, latent_image={"samples": empty}, seed=seed,
            steps=steps, cfg=scale, sampler_name="euler", denoise=1.0, shift=shift)[0]["samples"], native)
        out["wan21_engine_after_no_lora"] = rel(ours_wan21([]), base)  # the LoRAs come off again

    # Wan 2.2 A14B: a chain per expert, two KSamplerAdvanced split at the first step below the boundary
    seed, steps, scale, shift, boundary = 21, 4, 3.5, 8.0, 0.875
    sigmas = sampling_sigmas(steps, shift)
    k = next(i for i in range(steps) if float(sigmas[i]) < boundary)
    out["wan22_k"] = k

    def advanced(model, latent, add_noise, start, end, leftover):
        return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, seed, steps, scale, "euler", "simple", pos, neg,
                                                     {"samples": latent}, start, end, leftover)[0]["samples"]

    def ours_expert(i, latent, start, end):
        experts = [paths["high_noise"], paths["low_noise"]]
        return engine.sample(SampleRequest(experts=[experts[i]], keep=[experts[1 - i]], family="wan2.2-a14b",
                                           positive=pos[0][0], negative=neg[0][0], latent=latent, seed=seed,
                                           steps=steps, cfg=scale, shift=shift, sampler="euler", start_step=start,
                                           end_step=end, add_noise=i == 0, leftover_noise=i == 0,
                                           loras=[ours_chain(["high_noise", "low_noise"][i])])).latent

    with torch.no_grad():
        high, low = (native_model(e, CHAINS[e], shift) for e in ("high_noise", "low_noise"))
        native_first = advanced(high, empty, "enable", 0, k, "enable")
        reference = advanced(low, native_first, "disable", k, 10000, "disable")
        plain_high, plain_low = (native_model(e, [], shift) for e in ("high_noise", "low_noise"))
        plain_first = advanced(plain_high, empty, "enable", 0, k, "enable")
        plain = advanced(plain_low, plain_first, "disable", k, 10000, "disable")
        out["wan22_lora_changes_result"] = rel(reference, plain)
        only_high = advanced(plain_low, native_first, "disable", k, 10000, "disable")
        out["wan22_low_lora_changes_result"] = rel(reference, only_high)
        out["wan22_switch_engine"] = rel(engine.sample(SampleRequest(
            experts=[paths["high_noise"], paths["low_noise"]], boundaries=[boundary], family="wan2.2-a14b",
            positive=pos[0][0], negative=neg[0][0], latent=empty, seed=seed, steps=steps, cfg=[scale, scale],
            shift=shift, sampler="euler", loras=[ours_chain("high_noise"), ours_chain("low_noise")])).latent, reference)
        ours_first = ours_expert(0, empty, 0, k)
        out["wan22_high_leftover_latent"] = rel(ours_first, native_first)
        out["wan22_two_advanced_engine"] = rel(ours_expert(1, ours_first, k, 10000), reference)

        # our nodes: USP LoRA (Wan 2.2 A14B) per expert -> USP Sampler (Wan 2.2); and the two-sampler layout, a
        # USP LoRA chain on each expert's socket -> two USP Sampler Advanced
        model = socket(["high_noise", "low_noise"], "wan2.2-a14b")
        for expert in ("high_noise", "low_noise"):
            for lora, strength in CHAINS[expert]:
                model = run_node("UspWan22Lora", model=model, lora_name=Path(paths[lora]).name, strength=strength,
                                 expert=expert)[0]
        switched = run_node("UspWan22Sampler", model=model, positive=pos, negative=neg, latent_image={"samples": empty},
                            seed=seed, steps=steps, cfg_high_noise=scale, cfg_low_noise=scale, shift=shift,
                            boundary=boundary, sampler_name="euler", denoise=1.0)[0]
        out["wan22_switch_nodes"] = rel(switched["samples"], reference)
        generic = socket(["high_noise", "low_noise"], "wan2.2-a14b")  # USP LoRA per expert -> USP Sampler
        for expert in ("high_noise", "low_noise"):
            for lora, strength in CHAINS[expert]:
                generic = run_node("UspLoraLoader", model=generic, lora_name=Path(paths[lora]).name,
                                   strength=strength, expert=expert)[0]
        out["wan22_switch_generic_nodes"] = rel(run_node(
            "UspSampler", model=generic, positive=pos, negative=neg, latent_image={"samples": empty}, seed=seed,
            steps=steps, cfg=scale, sampler_name="euler", denoise=1.0, shift=shift, boundary=boundary)[0]["samples"],
            reference)
        loaded = socket(["high_noise", "low_noise"], "wan2.2-a14b")
        common = dict(noise_seed=seed, steps=steps, cfg=scale, shift=shift, sampler_name="euler", positive=pos,
                      negative=neg)
        first = run_node("UspWanSamplerAdvanced", model=with_usp_loras(model_socket.expert_socket(loaded, 0),
                                                                       "high_noise"),
                         add_noise="enable", latent_image={"samples": empty}, start_at_step=0, end_at_step=k,
                         return_with_leftover_noise="enable", **common)[0]
        second = run_node("UspWanSamplerAdvanced", model=with_usp_loras(model_socket.expert_socket(loaded, 1),
                                                                        "low_noise"),
                          add_noise="disable", latent_image=first, start_at_step=k, end_at_step=10000,
                          return_with_leftover_noise="disable", **common)[0]
        out["wan22_two_advanced_nodes"] = rel(second["samples"], reference)
        # the generic two-sampler layout: one two-expert model (its LoRA chains per expert), an expert per sampler
        first = run_node("UspSamplerAdvanced", model=generic, add_noise="enable", latent_image={"samples": empty},
                         start_at_step=0, end_at_step=k, return_with_leftover_noise="enable", expert="high_noise",
                         **common)[0]
        second = run_node("UspSamplerAdvanced", model=generic, add_noise="disable", latent_image=first,
                          start_at_step=k, end_at_step=10000, return_with_leftover_noise="disable", expert="low_noise",
                          **common)[0]
        out["wan22_two_advanced_generic_nodes"] = rel(second["samples"], reference)
    return out


"""What the ComfyUI reference modules (comfyui_reference/) share: starting ComfyUI's modules on the
CPU in this process, the relative error, and ComfyUI's Wan model built from our tiny config and file."""

import sys

import torch


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def start_comfy(comfy_dir: str) -> None:
    """ComfyUI's modules importable, on the CPU (before any of them is imported)."""
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def wan_unet_config(config: dict) -> dict:
    """ComfyUI's unet config of a Wan 2.1 T2V DiT of this diffusers config (what its model detection would
    find in a real file; tiny models must be given it: detection assumes 128-wide heads)."""
    return {"image_model": "wan2.1", "model_type": "t2v", "patch_size": tuple(config["patch_size"]),
            "dim": config["num_attention_heads"] * config["attention_head_dim"], "ffn_dim": config["ffn_dim"],
            "freq_dim": config["freq_dim"], "text_dim": config["text_dim"], "num_heads": config["num_attention_heads"],
            "num_layers": config["num_layers"], "in_dim": config["in_channels"], "out_dim": config["out_channels"],
            # the reference-image convolution of the Wan 2.2 Fun Control models (wan21/dit.py REFERENCE_KEY)
            **({"in_dim_ref_conv": config["ref_channels"]} if config.get("ref_channels") else {})}


def comfy_wan_model(path: str, config: dict, shift: float, model_class: str = "WAN21_T2V"):
    """ComfyUI's Wan model (supported_models.<model_class>, fp32, CPU) holding our tiny file's tensors
    under its own names (strict), behind ModelSamplingSD3(shift): what a UNETLoader + ModelSamplingSD3
    pair gives a native sampler."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from safetensors.torch import load_file

    model_config = getattr(comfy.supported_models, model_class)(wan_unet_config(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(load_file(path), strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return ModelSamplingSD3().patch(patcher, shift)[0]


def detectable_wan_config() -> dict:
    """A tiny Wan 2.1 DiT config that ComfyUI's model detection reads right from the file alone
    (comfy/model_detection.py: heads = dim // 128, freq_dim 256, text_dim 4096, patch (1, 2, 2)): for checks
    that load through ComfyUI's own UNETLoader rather than being given the config. 2 heads of 128."""
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    return dict(WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=2, ffn_dim=256, num_layers=2)


def detectable_wan_i2v_config(clip_vision: bool) -> dict:
    """detectable_wan_config as an image-to-video DiT (36 input channels): Wan 2.1 I2V's with the CLIP vision image
    embedder (img_emb.*: ComfyUI detects model_type "i2v"), or a Wan 2.2 I2V A14B expert's without it ("t2v" with
    in_dim 36)."""
    config = dict(detectable_wan_config(), in_channels=36)
    if clip_vision:
        config.update(image_dim=1280, added_kv_proj_dim=config["num_attention_heads"] * config["attention_head_dim"])
    return config


def make_detectable_wan(root, names_seeds: dict[str, int],
                        lora_layouts: dict[str, tuple[str, int]], configs: dict[str, dict] | None = None) -> dict[str, str]:
    """Tiny detectable Wan DiTs (original key names, our config in the metadata) under root/diffusion_models,
    {name: seed}, and random LoRAs for their shape under root/loras, {name: (layout, seed)}
    (models/tiny.py save_tiny_lora). configs: {name: config} for DiTs other than detectable_wan_config's.
    Returns {name: path} of both."""
    import json
    from pathlib import Path

    from usp_video.distributed.formats.checkpoint import save_safetensors
    from usp_video.distributed.models.tiny import save_tiny_lora
    from usp_video.distributed.models.wan21 import dit as wan
    from usp_video.distributed.models.wan21.tiny import wan_to_original_keys

    root, config, paths, shapes = Path(root), detectable_wan_config(), {}, None
    (root / "diffusion_models").mkdir(parents=True, exist_ok=True)
    for name, seed in names_seeds.items():
        torch.manual_seed(seed)
        dit_config = (configs or {}).get(name, config)
        state = wan_to_original_keys(wan.build_wan(dit_config).state_dict())
        paths[name] = root / "diffusion_models" / f"{name}.safetensors"
        save_safetensors(state, paths[name], {wan.CONFIG_METADATA_KEY: json.dumps(dit_config)})
        shapes = {k: list(v.shape) for k, v in state.items()}
    for name, (layout, seed) in lora_layouts.items():
        paths[name] = save_tiny_lora(shapes, root / "loras" / f"{name}.safetensors", layout, ("blocks.",), seed=seed)
        if layout == "distill":
            _add_beyond_block_linears(paths[name], shapes, seed)
    return {k: str(v) for k, v in paths.items()}


def _add_beyond_block_linears(path, shapes: dict[str, list[int]], seed: int) -> None:
    """Add to a distillation LoRA what changes tensors outside the blocks' Linear layers: pairs (alpha, diff_b)
    on the embeddings, the time projection, the head and the 5-D patch embedding (ComfyUI reshapes up @ down to
    the conv's shape), and full differences of the cross-attention norm (weight and bias: merged on our side)
    and of the modulation tables (ComfyUI 0.3.64 reads but never applies those: lora.py). Their scale keeps
    each layer's change moderate (down ~ 1 / sqrt(fan-in)), as a trained LoRA's is."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed + 1000)
    state = load_file(str(path))
    for key, shape in sorted(shapes.items()):
        stem, _, kind = key.rpartition(".")
        if kind == "weight" and not key.startswith("blocks.") and len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[f"diffusion_model.{stem}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) / fan_in ** 0.5
            state[f"diffusion_model.{stem}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
            state[f"diffusion_model.{stem}.alpha"] = torch.tensor(2.0)
            state[f"diffusion_model.{stem}.diff_b"] = torch.randn(shape[0], generator=g) * 0.02
        elif ".norm3." in key:
            suffix = "diff" if kind == "weight" else "diff_b"
            state[f"diffusion_model.{stem}.{suffix}"] = torch.randn(shape, generator=g) * 0.05
        elif key.endswith("modulation"):
            state[f"diffusion_model.{key}.diff"] = torch.randn(shape, generator=g) * 0.05
    save_file(state, str(path))


def route_api_sample(engine) -> None:
    """Our sampler nodes' api.sample (sampler_run.run_sampler calls it) as a group would run it, in this process: its
    checks, the request through the wire frame, our engine."""
    from usp_video.distributed import api, protocol
    from usp_video.distributed.requests import SampleRequest
    from usp_video.distributed.validation import check_sample_request

    def via_wire(group, request, text_dim=None, **_):
        check_sample_request(request, api.check_dit_file(request.experts[0], request.family)[0], text_dim)
        request = SampleRequest.from_frame(*protocol.decode_frame(protocol.encode_frame(*request.to_frame())))
        return engine.sample(request).latent, {"ulysses": 1, "ring": 1}

    api.sample = via_wire


def run_node(class_type: str, **inputs) -> tuple:
    """Run one of the pack's nodes (V3) as ComfyUI's execution does: a class clone with the hidden inputs set, then
    its execute; returns its outputs."""
    from usp_video.nodes import NODE_CLASSES

    node = NODE_CLASSES[class_type].PREPARE_CLASS_CLONE({"UNIQUE_ID": "1"})
    return tuple(node.EXECUTE_NORMALIZED(**inputs).args)

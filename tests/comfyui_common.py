"""What the ComfyUI reference scripts (comfyui_reference*.py) share: starting ComfyUI's modules on the
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
            "num_layers": config["num_layers"], "in_dim": config["in_channels"], "out_dim": config["out_channels"]}


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

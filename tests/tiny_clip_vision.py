"""A tiny CLIP vision file in the layout of clip_vision_h.safetensors (transformers' CLIPVisionModelWithProjection
keys), 1280 wide as ViT-H (what the Wan DiTs' image embedding takes) but two layers of 20 heads and a small MLP.
ComfyUI's CLIPVisionLoader would build it at ViT-H's full size; the tests' ComfyUI loads it with
comfyui_test_nodes' TinyCLIPVisionLoader, which builds ComfyUI's own model at the file's size."""

from pathlib import Path

TINY_CLIP_VISION = "clip_vision/tiny_clip_vision_h.safetensors"  # under a models root, in ComfyUI's layout

TINY_CLIP_VISION_CONFIG = dict(hidden_size=1280, intermediate_size=256, num_hidden_layers=2, num_attention_heads=20,
                        image_size=224, patch_size=14, projection_dim=64)


def make_tiny_clip_vision(path: Path, seed: int = 40) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG, hidden_act="gelu"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"num_attention_heads": str(TINY_CLIP_VISION_CONFIG["num_attention_heads"]),
                                          "model_type": "clip_vision_model", "hidden_act": "gelu"})
    return path


TINY_SIGLIP = "clip_vision/tiny_sigclip_vision_patch14_384.safetensors"
TINY_SIGLIP_CONFIG = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=384,
                          patch_size=14)


def make_tiny_siglip(path: Path, hidden_size: int, seed: int = 41) -> Path:
    """A tiny SigLIP vision file in the layout of Comfy-Org's sigclip_vision_patch14_384 (transformers'
    SiglipVisionModel keys, the attention-pooling head left out as ComfyUI's model has none): 384 px in 14 px
    patches (729 tokens), hidden_size wide (what the DiT's image embedding takes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden_size, hidden_act="gelu_pytorch_tanh",
                                                 **TINY_SIGLIP_CONFIG))
    state = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in model.state_dict().items()
             if "position_ids" not in k and not k.removeprefix("vision_model.").startswith("head.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"num_attention_heads": str(TINY_SIGLIP_CONFIG["num_attention_heads"]),
                                          "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
                                          "image_size": str(TINY_SIGLIP_CONFIG["image_size"])})
    return path

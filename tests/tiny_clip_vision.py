"""Tiny CLIP vision files in the layouts ComfyUI's CLIP Vision loader reads, built with transformers' classes:

- clip_vision_h.safetensors' (CLIPVisionModelWithProjection keys): 1280 wide as ViT-H (what the Wan DiTs' image
  embedding takes) but two layers of 20 heads and a small MLP;
- Comfy-Org's sigclip_vision_patch14_384 (SiglipVisionModel keys, the attention-pooling head left out as
  ComfyUI's model has none): 384 px in 14 px patches (729 tokens), as wide as the DiT's image embedding takes.

ComfyUI's CLIPVisionLoader would build them at full size; the tests' ComfyUI loads them with comfyui_test_nodes'
TinyCLIPVisionLoader, which builds ComfyUI's own model at the file's size from its shapes and metadata."""

from pathlib import Path

TINY_CLIP_VISION = "clip_vision/tiny_clip_vision_h.safetensors"  # under a models root, in ComfyUI's layout
TINY_CLIP_VISION_CONFIG = dict(hidden_size=1280, intermediate_size=256, num_hidden_layers=2, num_attention_heads=20,
                               image_size=224, patch_size=14, projection_dim=64, hidden_act="gelu")
TINY_SIGLIP = "clip_vision/tiny_sigclip_vision_patch14_384.safetensors"
TINY_SIGLIP_CONFIG = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=384,
                          patch_size=14, hidden_act="gelu_pytorch_tanh")


def _save(model, config: dict, model_type: str, path: Path) -> Path:
    """The model's weights under vision_model.* (and visual_projection.*), without position ids or a pooling head,
    with what the test loader cannot read from the shapes in the metadata."""
    from safetensors.torch import save_file

    state = {}
    for key, value in model.state_dict().items():
        key = key if key.startswith("visual_projection.") else "vision_model." + key.removeprefix("vision_model.")
        if "position_ids" not in key and not key.startswith("vision_model.head."):
            state[key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"model_type": model_type, **{k: str(config[k]) for k in (
        "num_attention_heads", "hidden_act", "image_size")}})
    return path


def make_tiny_clip_vision(path: Path, seed: int = 40) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG))
    return _save(model, TINY_CLIP_VISION_CONFIG, "clip_vision_model", path)


def make_tiny_siglip(path: Path, hidden_size: int, seed: int = 41) -> Path:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden_size, **TINY_SIGLIP_CONFIG))
    return _save(model, TINY_SIGLIP_CONFIG, "siglip_vision_model", path)

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

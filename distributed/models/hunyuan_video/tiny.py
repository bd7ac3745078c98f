"""The tiny HunyuanVideo set, in the real on-disk formats (for the demo and the tests).

`make_tiny_hunyuan_models(root)` writes, in ComfyUI's models/ layout, the DiT (original key names),
the Llama and CLIP-L text encoders (ComfyUI's names), tokenizers in the real file formats, and the VAE; beside
them a DiT that ComfyUI's own UNETLoader loads (tiny_native_hunyuan_video) with the CLIP-L it needs.
Each file carries its config in the safetensors metadata because tiny shapes match no released variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors as _save
from ..tiny import CORPUS as _CORPUS, save_tiny_lora
from .lora_names import lora_aliases
from . import dit as hunyuan, text as hunyuan_text, vae as hunyuan_vae

# HunyuanVideo, shrunk: 12 heads (so every ulysses degree 1-4 divides them), both block types.
TINY_HUNYUAN_CONFIG = dict(hunyuan.HUNYUAN_VARIANTS["hunyuan-video-t2v-720p"], num_attention_heads=12,
                           attention_head_dim=8, num_layers=2, num_single_layers=2, num_refiner_layers=2,
                           mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=[2, 2, 4])
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1024)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16)
# A HunyuanVideo DiT that ComfyUI's own UNETLoader detects: its detection takes 128-wide heads, a 768-wide pooled
# CLIP vector and RoPE axes 16/56/56 (comfy/model_detection.py), with a CLIP-L 768 wide to condition it.
TINY_NATIVE_CONFIG = dict(TINY_HUNYUAN_CONFIG, num_attention_heads=2, attention_head_dim=128, num_layers=1,
                          num_single_layers=1, mlp_ratio=4.0, pooled_projection_dim=768, rope_axes_dim=[16, 56, 56])
TINY_NATIVE_CLIP = dict(TINY_CLIP, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, projection_dim=768)
HUNYUAN_FILES = {
    "dit": "diffusion_models/tiny_hunyuan_video_t2v.safetensors",
    "dit_native": "diffusion_models/tiny_native_hunyuan_video.safetensors",
    "clip_native": "text_encoders/tiny_native_clip_l_768.safetensors",
    "llama": "text_encoders/tiny_llava_llama3.safetensors",
    "clip": "text_encoders/tiny_clip_l.safetensors",
    "tokenizers": "text_encoders/tiny_hunyuan_tokenizers",
    "vae": "vae/tiny_hunyuan_video_vae.safetensors",
    "lora": "loras/tiny_hunyuan_lora_diffusion_pipe.safetensors",
}
TINY_HUNYUAN_VAE = dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1)
# Tiles of 32x32 pixels and 8 frames, overlapping by 8 pixels and 4 frames, for AutoencoderKLHunyuanVideo
# .enable_tiling: a tiny latent (3x9x8) then makes 27 tiles (diffusers' defaults, 256 px and 16 frames, one)
TINY_HUNYUAN_VAE_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
                              tile_sample_stride_height=24, tile_sample_stride_width=24,
                              tile_sample_stride_num_frames=4)
_HUNYUAN_VERSION = "4"


def make_tiny_hunyuan_models(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the tiny HunyuanVideo set under root (skipped where already written); returns the paths."""
    from diffusers import HunyuanVideoTransformer3DModel

    root = Path(root)
    paths = {name: root / rel for name, rel in HUNYUAN_FILES.items()}
    stamp = root / ".usp-video-tiny-hunyuan"
    if stamp.is_file() and stamp.read_text() == _HUNYUAN_VERSION and all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    dit = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_CONFIG)
    _save({k: v.to(dtype) for k, v in hunyuan.hunyuan_to_original_keys(dit.state_dict()).items()}, paths["dit"],
          {hunyuan.CONFIG_METADATA_KEY: json.dumps(TINY_HUNYUAN_CONFIG)})
    shapes = {k: list(v.shape) for k, v in hunyuan.hunyuan_to_original_keys(dit.state_dict()).items()}
    save_tiny_lora(shapes, paths["lora"], "diffusion_pipe", ("double_blocks.", "single_blocks."), seed=200,
                   aliases=lora_aliases)

    from transformers import LlamaConfig, LlamaModel

    hunyuan_text.write_tiny_tokenizers(paths["tokenizers"], _CORPUS)
    llama_tok, clip_tok = hunyuan_text.load_tokenizers(paths["tokenizers"])
    llama_config = dict(TINY_LLAMA, vocab_size=len(llama_tok))
    llama = LlamaModel(LlamaConfig(**llama_config))
    _save({f"model.{k}": v.to(dtype) for k, v in llama.state_dict().items()}, paths["llama"],
          {hunyuan_text.LLAMA_CONFIG_KEY: json.dumps(llama_config)})
    clip_config = dict(TINY_CLIP, vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                       eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    _save_clip(clip_config, paths["clip"], dtype)
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE)
    _save({k: v.to(dtype) for k, v in vae.state_dict().items()}, paths["vae"],
          {hunyuan_vae.CONFIG_METADATA_KEY: json.dumps(TINY_HUNYUAN_VAE)})
    torch.manual_seed(seed + 71)  # after the others: their weights stay what they were
    native = HunyuanVideoTransformer3DModel(**TINY_NATIVE_CONFIG)
    _save({k: v.to(dtype) for k, v in hunyuan.hunyuan_to_original_keys(native.state_dict()).items()},
          paths["dit_native"], {hunyuan.CONFIG_METADATA_KEY: json.dumps(TINY_NATIVE_CONFIG)})
    _save_clip(dict(clip_config, **TINY_NATIVE_CLIP), paths["clip_native"], dtype)
    assert TINY_LLAMA["hidden_size"] == TINY_HUNYUAN_CONFIG["text_embed_dim"]
    assert TINY_CLIP["hidden_size"] == TINY_HUNYUAN_CONFIG["pooled_projection_dim"]
    stamp.write_text(_HUNYUAN_VERSION)
    return paths



def _save_clip(config: dict, path: Path, dtype: torch.dtype) -> None:
    """A random CLIP text model of config in ComfyUI's clip_l layout (text_model.*), its config in the metadata."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(**config))
    _save({"text_model." + k.removeprefix("text_model."): v.to(dtype) for k, v in clip.state_dict().items()
           if not k.endswith("position_ids")}, path, {hunyuan_text.CLIP_CONFIG_KEY: json.dumps(config)})


# -- the tiny debug config (tests/parity_targets.py) ------------------------------------------------------
TEXT_DIM, POOLED_DIM = TINY_HUNYUAN_CONFIG["text_embed_dim"], TINY_HUNYUAN_CONFIG["pooled_projection_dim"]
CHANNELS = TINY_HUNYUAN_CONFIG["in_channels"]


def tiny_inputs(shape: tuple[int, int, int], text_len: int = 7, pad: int = 5, seed: int = 2) -> tuple[torch.Tensor, ...]:
    """One forward's positional inputs, a batch of two: video latent, timesteps, text padded by `pad` masked
    tokens (as the reference pipeline pads to 256), its mask, the pooled CLIP vector and embedded guidance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, *shape, generator=g)
    context = torch.randn(2, text_len + pad, TEXT_DIM, generator=g)
    mask = torch.zeros(2, text_len + pad, dtype=torch.long)
    mask[:, :text_len] = 1
    pooled = torch.randn(2, POOLED_DIM, generator=g)
    return x, torch.tensor([900.0, 250.0]), context, mask, pooled, torch.tensor([6000.0, 6000.0])


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], cfg: float = 1.0, text_lens=(12, 7),
                 steps: int = 4) -> dict:
    """The fields of a SampleRequest for the tiny DiT of family (a ModelFamily): texts of text_lens tokens with their pooled vectors (no
    negative at cfg 1, HunyuanVideo's default), euler, embedded guidance 6."""
    g = torch.Generator().manual_seed(4)

    def side(length: int) -> dict:
        return {"tokens": torch.randn(1, length, TEXT_DIM, generator=g), "pooled_output": torch.randn(1, POOLED_DIM, generator=g)}

    positive = side(text_lens[0])
    negative = side(text_lens[1]) if cfg != 1.0 else None
    return dict(experts=list(experts), positive=positive, negative=negative, latent=torch.zeros(1, family.latent_channels, *shape),
                seed=11, steps=steps, cfg=cfg, shift=7.0, sampler="euler", options={"guidance": 6.0})

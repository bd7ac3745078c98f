"""Tiny random models in the real on-disk formats, for the demo and the tests (nothing is downloaded).

`make_tiny_models(root)` writes, in ComfyUI's models/ layout:
    diffusion_models/tiny_wan2.1_t2v.safetensors   Wan 2.1 DiT, original/ComfyUI key names
    text_encoders/tiny_umt5.safetensors            UMT5 encoder + "spiece_model" tokenizer bytes
    vae/tiny_wan_2.1_vae.safetensors               Wan-VAE, original key names
They load through exactly the code that loads the real checkpoints. The architectures are the
real ones, shrunk; each file carries its config in the safetensors metadata because tiny shapes
match no released variant.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from . import hunyuan, hunyuan_text, hunyuan_vae, umt5, wan, wan_vae

TINY_WAN_CONFIG = dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=12, attention_head_dim=8,
                       ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_VAE_CONFIG = dict(base_dim=8, z_dim=16)
FILES = {
    "dit": "diffusion_models/tiny_wan2.1_t2v.safetensors",
    "text_encoder": "text_encoders/tiny_umt5.safetensors",
    "vae": "vae/tiny_wan_2.1_vae.safetensors",
}
_VERSION = "1"

# HunyuanVideo, shrunk: 12 heads (so every ulysses degree 1-4 divides them), both block types.
TINY_HUNYUAN_CONFIG = dict(hunyuan.HUNYUAN_VARIANTS["hunyuan-video-t2v-720p"], num_attention_heads=12,
                           attention_head_dim=8, num_layers=2, num_single_layers=2, num_refiner_layers=2,
                           mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=[2, 2, 4])
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1024)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16)
HUNYUAN_FILES = {
    "dit": "diffusion_models/tiny_hunyuan_video_t2v.safetensors",
    "llama": "text_encoders/tiny_llava_llama3.safetensors",
    "clip": "text_encoders/tiny_clip_l.safetensors",
    "tokenizers": "text_encoders/tiny_hunyuan_tokenizers",
    "vae": "vae/tiny_hunyuan_video_vae.safetensors",
}
TINY_HUNYUAN_VAE = dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, layers_per_block=1)
# Tiles of 32x32 pixels and 8 frames, overlapping by 8 pixels and 4 frames, for AutoencoderKLHunyuanVideo
# .enable_tiling: a tiny latent (3x9x8) then makes 27 tiles (diffusers' defaults, 256 px and 16 frames, one)
TINY_HUNYUAN_VAE_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
                              tile_sample_stride_height=24, tile_sample_stride_width=24,
                              tile_sample_stride_num_frames=4)
_HUNYUAN_VERSION = "2"

_CORPUS = """a cat walks on the beach at sunset, waves roll in slowly
a red car drives through a city street at night with neon lights
a dog runs across a green field, camera follows, cinematic lighting
slow motion shot of a hummingbird drinking from a flower
an astronaut rides a horse on the moon, earth in the background
timelapse of clouds over snowy mountains, high quality, detailed
bright colors, overexposed, static, blurred details, subtitles, worst quality, low quality
a bowl of fruit on a wooden table, soft light from a window
""".splitlines()


def wan_to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel names -> the original Wan / ComfyUI names."""
    renames = [
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
        (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
        ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
        (".norm2.", ".norm3."),  # the affine cross-attention norm is norm3 in the original
        ("proj_out", "head.head"),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for old, repl in renames:
            new = new.replace(old, repl)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", new)
        out[new] = value
    return out


_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _resnet_param(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def wan_vae_to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan names -> the original Wan-VAE / ComfyUI names."""
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_param(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.+)", key):
            new = f"{m[1]}.head.0.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.+)", key):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_in\.(.+)", key):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(post_)?quant_conv\.(.+)", key):
            new = f"conv{2 if m[1] else 1}.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
            new = f"encoder.downsamples.{m[1]}.{_resnet_param(m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet_param(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        out[new] = value
    return out


def train_tiny_spiece() -> bytes:
    """A small sentencepiece model with UMT5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return model.getvalue()


def _save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def make_tiny_models(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the tiny model set under root (skipped where already written); returns the paths."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny"
    if stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    dit = WanTransformer3DModel(**TINY_WAN_CONFIG)
    _save({k: v.to(dtype) for k, v in wan_to_original_keys(dit.state_dict()).items()}, paths["dit"],
          {wan.CONFIG_METADATA_KEY: json.dumps(TINY_WAN_CONFIG)})

    spiece = train_tiny_spiece()
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    config = UMT5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", **TINY_UMT5)
    encoder = UMT5EncoderModel(config)
    state = {k: v.to(dtype) for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    _save(state, paths["text_encoder"], {})

    vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    _save({k: v.to(dtype) for k, v in wan_vae_to_original_keys(vae.state_dict()).items()}, paths["vae"],
          {wan_vae.CONFIG_METADATA_KEY: json.dumps(TINY_VAE_CONFIG)})
    stamp.write_text(_VERSION)
    assert TINY_UMT5["d_model"] == TINY_WAN_CONFIG["text_dim"]
    return paths


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

    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    hunyuan_text.write_tiny_tokenizers(paths["tokenizers"], _CORPUS)
    llama_tok, clip_tok = hunyuan_text.load_tokenizers(paths["tokenizers"])
    llama_config = dict(TINY_LLAMA, vocab_size=len(llama_tok))
    llama = LlamaModel(LlamaConfig(**llama_config))
    _save({f"model.{k}": v.to(dtype) for k, v in llama.state_dict().items()}, paths["llama"],
          {hunyuan_text.LLAMA_CONFIG_KEY: json.dumps(llama_config)})
    clip_config = dict(TINY_CLIP, vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                       eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    clip = CLIPTextModel(CLIPTextConfig(**clip_config))
    _save({"text_model." + k.removeprefix("text_model."): v.to(dtype) for k, v in clip.state_dict().items()
           if not k.endswith("position_ids")}, paths["clip"],
          {hunyuan_text.CLIP_CONFIG_KEY: json.dumps(clip_config)})
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE)
    _save({k: v.to(dtype) for k, v in vae.state_dict().items()}, paths["vae"],
          {hunyuan_vae.CONFIG_METADATA_KEY: json.dumps(TINY_HUNYUAN_VAE)})
    assert TINY_LLAMA["hidden_size"] == TINY_HUNYUAN_CONFIG["text_embed_dim"]
    assert TINY_CLIP["hidden_size"] == TINY_HUNYUAN_CONFIG["pooled_projection_dim"]
    stamp.write_text(_HUNYUAN_VERSION)
    return paths


__all__ = ["make_tiny_models", "make_tiny_hunyuan_models", "FILES", "HUNYUAN_FILES", "TINY_WAN_CONFIG",
           "TINY_HUNYUAN_CONFIG", "umt5"]

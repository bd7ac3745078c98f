"""The tiny HunyuanVideo 1.5 set, in Comfy-Org's on-disk layout (original key names, q/k/v fused):

    vae/tiny_hunyuanvideo15_vae.safetensors             the VAE (tencent's names, as Comfy-Org's file), 8..64 wide
    diffusion_models/tiny_hunyuanvideo1.5.safetensors   the DiT: 12 heads x 8 (so every Ulysses degree 1-4
                                                         divides them, as the other tiny DiTs), 2 blocks, 65 / 32
                                                         channels, Qwen 32 wide, ByT5 24 wide, SigLIP 16 wide;
                                                         its config in the file's metadata (tiny shapes match no
                                                         released model)

Also the tiny debug config for the tests (tests/parity_targets.py): tiny_inputs (one forward's inputs, T2V or I2V)
and tiny_request.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from . import dit, keys, text, vae

TINY_CONFIG = dict(dit.HV15_CONFIG, num_attention_heads=12, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
                   mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(2, 2, 4))
FILES = {"dit": "diffusion_models/tiny_hunyuanvideo1.5.safetensors", "vae": "vae/tiny_hunyuanvideo15_vae.safetensors",
         "qwen": "text_encoders/tiny_qwen_2.5_vl.safetensors", "byt5": "text_encoders/tiny_byt5_small_glyphxl.safetensors",
         "qwen_tokenizer": "text_encoders/tiny_hunyuanvideo15_tokenizer"}
TINY_QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=2048,
                 rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
TINY_BYT5 = dict(text.BYT5_SMALL, d_model=24, d_ff=48, d_kv=8, num_heads=3, num_layers=2, vocab_size=384)
# the VAE's channels shrunk (its encoder's last stage must hold 2 x 32 latent channels), one block per stage
TINY_VAE = dict(block_out_channels=(8, 16, 32, 64, 64), layers_per_block=1)
_VERSION = "3"
TEXT_DIM, BYT5_DIM, IMAGE_DIM = TINY_CONFIG["text_embed_dim"], TINY_CONFIG["text_embed_2_dim"], TINY_CONFIG["image_embed_dim"]
LATENT_CHANNELS = TINY_CONFIG["out_channels"]


def make_tiny_models(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the set under root (skipped where already written): {"dit"}."""
    from diffusers import HunyuanVideo15Transformer3DModel

    root = Path(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-hunyuanvideo1.5"
    if stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(**TINY_CONFIG)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but give the tables some spread
        model.cond_type_embed.weight.normal_(0, 0.5)
    state = {k: v.to(dtype) for k, v in keys.to_original(model.state_dict()).items()}
    save_safetensors(state, paths["dit"], {dit.CONFIG_METADATA_KEY: json.dumps(TINY_CONFIG)})
    from diffusers import AutoencoderKLHunyuanVideo15

    model = AutoencoderKLHunyuanVideo15(**TINY_VAE)
    save_safetensors({k: v.to(dtype) for k, v in vae.to_original(model.state_dict()).items()}, paths["vae"],
                     {vae.CONFIG_METADATA_KEY: json.dumps(TINY_VAE)})
    _write_text_encoders(paths, dtype)
    stamp.write_text(_VERSION)
    return paths


def _write_text_encoders(paths: dict[str, Path], dtype: torch.dtype) -> None:
    """The tiny Qwen2.5-VL text model (ComfyUI's names: the language model under model.), ByT5 (T5 names) and the
    Qwen tokenizer (tiny BPE with Qwen's special tokens)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    from ..tiny import CORPUS

    text.write_tiny_tokenizer(paths["qwen_tokenizer"], CORPUS)
    qwen_config = dict(TINY_QWEN, vocab_size=len(text.load_tokenizer(paths["qwen_tokenizer"])))
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**qwen_config))
    save_safetensors({f"model.{k}": v.to(dtype) for k, v in qwen.state_dict().items()}, paths["qwen"],
                     {text.QWEN_CONFIG_KEY: json.dumps(qwen_config)})
    byt5 = T5EncoderModel(T5Config(**TINY_BYT5))
    save_safetensors({k: v.to(dtype) for k, v in byt5.state_dict().items() if k != "encoder.embed_tokens.weight"},
                     paths["byt5"], {text.BYT5_CONFIG_KEY: json.dumps(TINY_BYT5)})
    assert qwen_config["hidden_size"] == TEXT_DIM and TINY_BYT5["d_model"] == BYT5_DIM


def tiny_inputs(shape: tuple[int, int, int], text_len: int = 7, pad: int = 5, glyph_len: int = 3,
                image: bool = False, seed: int = 2) -> tuple[torch.Tensor, ...]:
    """One forward's positional inputs (HunyuanVideo15Transformer3DModel.forward's order), a batch of two: the
    65-channel input (latent 32 | start latent 32 | mask 1), timesteps, Qwen tokens padded by `pad` masked ones
    (as the pipeline pads), their mask, no mean-flow timestep, ByT5 tokens (glyph_len real ones, the rest
    padding), their mask, and the SigLIP tokens: zeros for text to video (the model masks them out), random
    for image to video."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TINY_CONFIG["in_channels"], *shape, generator=g)
    if not image:
        x[:, LATENT_CHANNELS:] = 0.0  # text to video: no start latent, mask 0
    context = torch.randn(2, text_len + pad, TEXT_DIM, generator=g)
    mask = torch.zeros(2, text_len + pad, dtype=torch.long)
    mask[:, :text_len] = 1
    glyph = torch.randn(2, glyph_len + 2, BYT5_DIM, generator=g)
    glyph_mask = torch.zeros(2, glyph_len + 2, dtype=torch.long)
    glyph_mask[:, :glyph_len] = 1
    vision = torch.randn(2, 9, IMAGE_DIM, generator=g) if image else torch.zeros(2, 9, IMAGE_DIM)
    return x, torch.tensor([900.0, 250.0]), context, mask, None, glyph, glyph_mask, vision


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], cfg: float = 6.0, text_lens=(12, 7),
                 steps: int = 4, image: bool = False, glyph: bool = True) -> dict:
    """The fields of a SampleRequest for the tiny DiT: Qwen tokens (and ByT5 tokens) per side, euler; with image,
    the I2V conditioning as ComfyUI's HunyuanVideo15ImageToVideo puts it on both sides (a start latent on the
    first frame, its mask, the SigLIP tokens)."""
    g = torch.Generator().manual_seed(4)

    def side(length: int) -> dict:
        cond = {"tokens": torch.randn(1, length, TEXT_DIM, generator=g)}
        if glyph:
            cond["conditioning_byt5small"] = torch.randn(1, 3, BYT5_DIM, generator=g)
        if image:
            start = torch.zeros(1, LATENT_CHANNELS, *shape)
            start[:, :, :1] = torch.randn(1, LATENT_CHANNELS, 1, *shape[1:], generator=g)
            concat_mask = torch.ones(1, 1, *shape)  # ComfyUI's: 0 on the start frame
            concat_mask[:, :, :1] = 0.0
            cond.update(concat_latent_image=start, concat_mask=concat_mask,
                        siglip=torch.randn(1, 9, IMAGE_DIM, generator=g))
        return cond

    positive = side(text_lens[0])
    negative = side(text_lens[1]) if cfg != 1.0 else None
    return dict(experts=list(experts), positive=positive, negative=negative,
                latent=torch.zeros(1, family.latent_channels, *shape), seed=11, steps=steps, cfg=cfg, shift=5.0,
                sampler="euler")

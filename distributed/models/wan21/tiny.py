"""The tiny Wan 2.1 set, in the real on-disk formats (for the demo and the tests).

`make_tiny_models(root)` writes, in ComfyUI's models/ layout:
    diffusion_models/tiny_wan2.1_t2v.safetensors   Wan 2.1 DiT, original/ComfyUI key names
    text_encoders/tiny_umt5.safetensors            UMT5 encoder + "spiece_model" tokenizer bytes
    vae/tiny_wan_2.1_vae.safetensors               Wan-VAE, original key names
    diffusion_models/tiny_wan2.1_t2v_Q8_0.gguf     the same DiT as city96's GGUF files are (Q8_0)
    diffusion_models/tiny_wan2.1_i2v.safetensors   Wan 2.1 I2V (36 input channels, CLIP vision image embedder)
    diffusion_models/tiny_wan2.1_fun_control.safetensors   Wan 2.1 Fun Control (48: control and start videos)
    diffusion_models/tiny_native_wan21.safetensors  a Wan 2.1 DiT that ComfyUI's own UNETLoader detects (its Wan
        detection fixes 128-wide heads, freq_dim 256 and text_dim 4096), with text_encoders/tiny_native_umt5_4096
        (a UMT5 of width 4096 to condition it) and loras/tiny_native_lora_a (kohya names): the native MODEL chain
        UNETLoader -> LoraLoaderModelOnly -> ModelSamplingSD3 -> USP Sampler, without real weights
    diffusion_models/tiny_native_wan21_i2v.safetensors  the same for Wan 2.1 I2V (WAN21_I2V: 36 channels, the image
        embedder of CLIP ViT-H's 1280-wide features)
    loras/tiny_wan_lora_{kohya,peft,distill}.safetensors   LoRAs for it in three layouts (models/tiny.py)
Each file carries its config in the safetensors metadata because tiny shapes match no released variant.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors as _save
from ..tiny import CORPUS as _CORPUS, save_gguf, save_tiny_lora
from . import dit as wan, vae as wan_vae

TINY_WAN_CONFIG = dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=12, attention_head_dim=8,
                       ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32)
# Wan 2.1 I2V, shrunk: the start video's 20 channels beside the noise, CLIP ViT-H features (1280 wide) through
# the image embedder and the image keys of cross-attention.
TINY_WAN_I2V_CONFIG = dict(TINY_WAN_CONFIG, in_channels=36, image_dim=1280,
                           added_kv_proj_dim=TINY_WAN_CONFIG["num_attention_heads"] * TINY_WAN_CONFIG["attention_head_dim"])
# Wan 2.1 Fun Control, shrunk: the control video's and the start video's latents (32 channels) beside the noise,
# and the I2V model's CLIP vision image embedder.
TINY_WAN_FUN_CONTROL_CONFIG = dict(TINY_WAN_I2V_CONFIG, in_channels=48)
TINY_UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_VAE_CONFIG = dict(base_dim=8, z_dim=16)
FILES = {
    "dit": "diffusion_models/tiny_wan2.1_t2v.safetensors",
    "text_encoder": "text_encoders/tiny_umt5.safetensors",
    "vae": "vae/tiny_wan_2.1_vae.safetensors",
    "dit_gguf": "diffusion_models/tiny_wan2.1_t2v_Q8_0.gguf",
    "dit_i2v": "diffusion_models/tiny_wan2.1_i2v.safetensors",
    "dit_fun_control": "diffusion_models/tiny_wan2.1_fun_control.safetensors",
    "dit_native": "diffusion_models/tiny_native_wan21.safetensors",
    "dit_native_i2v": "diffusion_models/tiny_native_wan21_i2v.safetensors",
    "text_encoder_native": "text_encoders/tiny_native_umt5_4096.safetensors",
    "lora_native": "loras/tiny_native_lora_a.safetensors",
    **{f"lora_{layout}": f"loras/tiny_wan_lora_{layout}.safetensors" for layout in ("kohya", "peft", "distill")},
}
_VERSION = "7"
# The ComfyUI-detectable tiny DiT and its UMT5 (see the module docstring)
TINY_NATIVE_CONFIG = dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=2, attention_head_dim=128, ffn_dim=64,
                          num_layers=2, text_dim=4096, freq_dim=256)
TINY_NATIVE_I2V_CONFIG = dict(TINY_NATIVE_CONFIG, in_channels=36, image_dim=1280, added_kv_proj_dim=256)
TINY_NATIVE_UMT5 = dict(d_model=4096, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def wan_to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel names -> the original Wan / ComfyUI names."""
    renames = [
        # the I2V image embedder and image keys first (its norm2 is not a block's norm2)
        ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
        (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
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
    save_gguf(wan_to_original_keys(dit.state_dict()), paths["dit_gguf"], "wan", "Q8_0",
              metadata={wan.CONFIG_METADATA_KEY: json.dumps(TINY_WAN_CONFIG)})
    i2v = WanTransformer3DModel(**TINY_WAN_I2V_CONFIG)
    _save({k: v.to(dtype) for k, v in wan_to_original_keys(i2v.state_dict()).items()}, paths["dit_i2v"],
          {wan.CONFIG_METADATA_KEY: json.dumps(TINY_WAN_I2V_CONFIG)})
    shapes = {k: list(v.shape) for k, v in wan_to_original_keys(dit.state_dict()).items()}
    for i, layout in enumerate(("kohya", "peft", "distill")):
        save_tiny_lora(shapes, paths[f"lora_{layout}"], layout, ("blocks.",), seed=100 + i)

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
    torch.manual_seed(seed + 7)  # after the others: their weights stay what they were
    fun = WanTransformer3DModel(**TINY_WAN_FUN_CONTROL_CONFIG)
    _save({k: v.to(dtype) for k, v in wan_to_original_keys(fun.state_dict()).items()}, paths["dit_fun_control"],
          {wan.CONFIG_METADATA_KEY: json.dumps(TINY_WAN_FUN_CONTROL_CONFIG)})
    torch.manual_seed(seed + 31)
    native = wan_to_original_keys(WanTransformer3DModel(**TINY_NATIVE_CONFIG).state_dict())
    _save({k: v.to(dtype) for k, v in native.items()}, paths["dit_native"],
          {wan.CONFIG_METADATA_KEY: json.dumps(TINY_NATIVE_CONFIG)})
    save_tiny_lora({k: list(v.shape) for k, v in native.items()}, paths["lora_native"], "kohya", ("blocks.",),
                   seed=41)
    torch.manual_seed(seed + 43)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", **TINY_NATIVE_UMT5))
    state = {k: v.to(dtype) for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    _save(state, paths["text_encoder_native"], {})
    torch.manual_seed(seed + 47)
    native_i2v = WanTransformer3DModel(**TINY_NATIVE_I2V_CONFIG)
    _save({k: v.to(dtype) for k, v in wan_to_original_keys(native_i2v.state_dict()).items()}, paths["dit_native_i2v"],
          {wan.CONFIG_METADATA_KEY: json.dumps(TINY_NATIVE_I2V_CONFIG)})
    stamp.write_text(_VERSION)
    assert TINY_UMT5["d_model"] == TINY_WAN_CONFIG["text_dim"]
    return paths



# -- the tiny debug config: inputs and requests for the tiny DiTs (the parity tests, tests/parity_targets.py) --
# Every rank builds the same tensors from the same seeds, so N ranks and one process see equal inputs.

def tiny_inputs(shape: tuple[int, int, int], seed: int = 1, text_len: int = 20,
                channels: int = TINY_WAN_CONFIG["in_channels"]) -> tuple[torch.Tensor, ...]:
    """The positional inputs of one forward of a tiny Wan DiT, a batch of two: (latent [2, C, T, H, W],
    timesteps [900, 250], text [2, text_len, text_dim])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, *shape, generator=g)
    context = torch.randn(2, text_len, TINY_WAN_CONFIG["text_dim"], generator=g)
    return x, torch.tensor([900.0, 250.0]), context


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], steps: int = 4, sampler: str = "unipc",
                 seed: int = 7, cfg: float = 5.0) -> dict:
    """The fields of a SampleRequest for a tiny DiT of family (a ModelFamily: its latent channels) that takes
    Wan 2.1's text: 24-token texts on both sides, an empty latent."""
    g = torch.Generator().manual_seed(3)
    text = TINY_WAN_CONFIG["text_dim"]
    return dict(experts=list(experts), positive=torch.randn(1, 24, text, generator=g),
                negative=torch.randn(1, 24, text, generator=g), latent=torch.zeros(1, family.latent_channels, *shape),
                seed=seed, steps=steps, cfg=cfg, shift=5.0, sampler=sampler)


def tiny_image_conditioning(shape: tuple[int, int, int], clip_vision: bool = True, start_frames: int = 1,
                            seed: int = 4, fun_control: bool = False, end_frames: int = 0,
                            fun_control_a14b: bool = False, channels: int = 16) -> dict[str, torch.Tensor]:
    """A side of Wan image-to-video conditioning as native WanImageToVideo (+ CLIPVisionEncode) make it: the
    start video's raw latent, its mask (0 on the start image's latent frames) and CLIP vision features; with
    fun_control, as WanFunControlToVideo makes it: the control video's and the start video's raw latents (32
    channels), no mask; end_frames: latent frames held at the end too (WanFunInpaintToVideo's end image);
    fun_control_a14b: as Wan22FunControlToVideo makes it for the A14B: control and start latents, the mask after the
    control video's 16 channels (concat_mask_index) and a reference image's latent. channels: the latent's (48:
    Wan 2.2 TI2V-5B's)."""
    g = torch.Generator().manual_seed(seed)
    cond = {"tokens": torch.randn(1, 24, TINY_WAN_CONFIG["text_dim"], generator=g),
            "concat_latent_image": torch.randn(1, channels * (2 if fun_control or fun_control_a14b else 1), *shape,
                                               generator=g),
            "concat_mask": torch.ones(1, 1, *shape)}
    cond["concat_mask"][:, :, :start_frames] = 0.0
    if end_frames:
        cond["concat_mask"][:, :, -end_frames:] = 0.0
    if fun_control:
        del cond["concat_mask"]
    if fun_control_a14b:
        cond["concat_mask_index"] = torch.tensor(channels)
        cond["reference_latent"] = torch.randn(1, channels, 1, *shape[1:], generator=g)
    if clip_vision:
        cond["clip_vision"] = torch.randn(1, 257, TINY_WAN_I2V_CONFIG["image_dim"], generator=g)
    return cond


def tiny_image_request(experts: list[str], shape: tuple[int, int, int], clip_vision: bool = True,
                       cfg: float = 5.0, steps: int = 3, fun_control: bool = False, end_frames: int = 0,
                       fun_control_a14b: bool = False, channels: int = 16) -> dict:
    """The fields of an image-to-video SampleRequest (one start video on both sides; two experts: Wan 2.2 I2V
    A14B, switching at 0.9; fun_control: a Fun Control conditioning, tiny_image_conditioning's)."""
    kinds = dict(fun_control=fun_control, end_frames=end_frames, fun_control_a14b=fun_control_a14b, channels=channels)
    negative = tiny_image_conditioning(shape, clip_vision, seed=5, **kinds)
    negative["concat_latent_image"] = tiny_image_conditioning(shape, clip_vision, **kinds)["concat_latent_image"]
    return dict(experts=list(experts), boundaries=[0.9] if len(experts) == 2 else [],
                positive=tiny_image_conditioning(shape, clip_vision, **kinds), negative=negative,
                latent=torch.zeros(1, channels, *shape), seed=3, steps=steps, cfg=cfg,
                shift=5.0, sampler="euler")

"""HunyuanVideo 1.5 (8.3B; 480p / 720p, text to video and image to video, cfg- and step-distilled): diffusers'
HunyuanVideo15Transformer3DModel with USP for its joint attention (dit.py), loaded from Comfy-Org's repackaged
single files (keys.py) or diffusers folders; the tiny set (tiny.py). FAMILY is what the rest of the pack sees.

Its conditioning, one side's, in ComfyUI's names (what its nodes put on CONDITIONING):
    tokens                  [B, L, 3584]  Qwen2.5-VL's hidden states (the prompt's tokens, template cropped)
    conditioning_byt5small  [B, G, 1472]  ByT5 glyph tokens (quoted text in the prompt), optional
    siglip                  [B, 729, 1152] SigLIP's last hidden state (image to video; ComfyUI's clip_vision_output,
                                           read by nodes/conditioning.py), optional
    concat_latent_image     [B, 32, T, H, W] the start image's raw latent on its frames, zeros after (optional)
    concat_mask             [B, 1, T, H, W]  0 on the frames the start latent holds, 1 after (optional; as
                                           HunyuanVideo15ImageToVideo makes it: the model takes 1 - mask, as
                                           ComfyUI's model_base.HunyuanVideo15.concat_cond does)
Without the last three the model runs as text to video (zeros in the 33 extra channels, SigLIP tokens masked
out, as the reference pipeline runs it). Not covered: the mean-flow 1080p super-resolution stage (refused with a
message) and the 720p *_distilled_sparse checkpoints (SSTA sparse attention: no diffusers reference).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...formats import streamed
from ...parallel.vae_split import VaeSplit
from ..family import Defaults, ModelFamily, PlanVariant, TextPart
from . import dit, text, vae

# ComfyUI's latent_formats.HunyuanVideo15 (the VAE's scaling_factor): the DiT works on latent * 1.03682
LATENT_SCALE = 1.03682
CONDITIONING = ("tokens", "conditioning_byt5small", "siglip", "concat_latent_image", "concat_mask")


def _plan_variant(label: str) -> PlanVariant:
    config = dit.HV15_CONFIG
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return PlanVariant(label, heads=config["num_attention_heads"], hidden=hidden, attention_layers=config["num_layers"],
                       params=8.3e9, ffn=int(config["mlp_ratio"] * hidden),
                       patch=(config["patch_size_t"], config["patch_size"], config["patch_size"]),
                       text_tokens=256, joint_text=True)


class HunyuanVideo15(ModelFamily):
    name, label, short_name = "hunyuan-video-1.5", "HunyuanVideo 1.5", "hunyuan1.5"
    order = 19  # before HunyuanVideo: that family's key test also matches 1.5 files, whose check then refuses them
    dit_class, vae_class = "HunyuanVideo15Transformer3DModel", "AutoencoderKLHunyuanVideo15"
    latent_format = "HunyuanVideo15"
    latent_channels = 32
    spatial_compression = 16
    vae_encodes = True
    comfy_model_configs = ("HunyuanVideo15",)
    # the 480p models' published settings (tencent/HunyuanVideo-1.5: flow shift 5, cfg 6, 50 steps; 720p: shift 9
    # for T2V, 7 for I2V; the cfg-distilled ones cfg 1; the step-distilled I2V 8-12 steps at cfg 1)
    defaults = Defaults(sampler="euler", shift=5.0, cfg=6.0, steps=50)
    text_parts = (
        TextPart("qwen", "qwen_2.5_vl_7b(_fp8_scaled) .safetensors file or Qwen2.5-VL text model folder",
                 load=lambda path, dtype, device, shard: text.load_qwen(path, dtype, device, shard=shard),
                 shard_units=lambda qwen: qwen.layers),
        TextPart("byt5", "byt5_small_glyphxl_fp16 .safetensors file or ByT5 (T5EncoderModel) folder",
                 load=lambda path, dtype, device, shard: text.load_byt5(path, dtype, device)),
        TextPart("qwen_tokenizer", "folder with the Qwen2.5 tokenizer (qwen/, a diffusers HunyuanVideo 1.5 folder, or "
                 "a ComfyUI checkout)", load=lambda path, dtype, device, shard: text.load_tokenizer(path),
                 tokenizers=True),
    )
    cond_keys = CONDITIONING
    text_encoder_hint = "HunyuanVideo 1.5 uses the Qwen2.5-VL 7B text encoder with ByT5 (glyphs)"
    start_image_node = "HunyuanVideo15ImageToVideo"
    plan_variants = {"hunyuan1.5": _plan_variant("HunyuanVideo 1.5 (480p/720p)")}

    def is_dit(self, keys: set[str]) -> bool:
        return dit.is_hv15_keys(keys)

    def is_vae(self, keys: set[str]) -> bool:
        return vae.is_vae_keys({k.removeprefix("vae.") for k in keys})

    def describe(self, shapes: dict) -> str | None:
        return "looks like a HunyuanVideo 1.5 DiT" if dit.is_hv15_keys(set(shapes)) else None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        return dit.infer_config(path, shapes, metadata)

    def check_dit_folder(self, path: Path) -> None:
        import json

        dit.check_folder_config(path, json.loads((path / "config.json").read_text()))

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load(path, dtype, device, shard=shard)

    def dit_load_bytes(self, path, dtype, shares):
        if Path(path).is_dir():
            return super().dit_load_bytes(path, dtype, shares)
        return streamed.load_peak_bytes(path, dtype, shares, keep_within=dit.FP8_WITHIN_FILE)

    def parallelize(self, model, sp, backend):
        return dit.parallelize(model, sp, backend)

    def blocks(self, model):
        return [*model.context_embedder.token_refiner.refiner_blocks, *model.transformer_blocks]

    def describe_dit(self, model) -> dict:
        config = model.config
        return {"heads": config.num_attention_heads, "layers": config.num_layers,
                "hidden": config.num_attention_heads * config.attention_head_dim, "text_dim": config.text_embed_dim}

    def step_sequence(self, model, latent_shape, text_tokens):
        config = model.config
        t, h, w = latent_shape[-3:]
        video = -(-t // config.patch_size_t) * -(-h // config.patch_size) * -(-w // config.patch_size)
        hidden = config.num_attention_heads * config.attention_head_dim
        # the text joins the video in every block: Qwen's tokens, ByT5's (up to 256) and SigLIP's 729
        return {"tokens": video + text_tokens + 256 + 729, "hidden": hidden, "ffn": int(config.mlp_ratio * hidden)}

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * LATENT_SCALE

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / LATENT_SCALE

    def velocity(self, model, x, t, cond, options):
        config, batch, frames = model.config, x.shape[0], x.shape[2:]
        extra = config.in_channels - x.shape[1] - 1  # the start latent's channels, then one mask channel
        start = cond.get("concat_latent_image")
        start = x.new_zeros(batch, extra, *frames) if start is None else self.process_in(start.to(x.dtype))
        mask = cond.get("concat_mask")
        mask = x.new_zeros(batch, 1, *frames) if mask is None else 1.0 - mask.to(x.dtype)  # ComfyUI's concat_cond
        tokens = cond["tokens"]
        glyph = cond.get("conditioning_byt5small")
        glyph_mask = x.new_ones(batch, 0 if glyph is None else glyph.shape[1])
        if glyph is None:  # no quoted text: one masked zero token, as the reference pipeline's empty glyph input
            glyph, glyph_mask = x.new_zeros(batch, 1, config.text_embed_2_dim), x.new_zeros(batch, 1)
        vision = cond.get("siglip")
        if vision is None:  # text to video: all-zero SigLIP tokens, which the model masks out
            vision = x.new_zeros(batch, 1, config.image_embed_dim)
        return model(torch.cat([x, start, mask], dim=1), t, tokens, x.new_ones(batch, tokens.shape[1]), None,
                     glyph, glyph_mask, vision, return_dict=False)[0]

    def check_conditioning(self, cond: dict, name: str) -> None:
        tokens = cond["tokens"]
        for key, rank in (("conditioning_byt5small", 3), ("siglip", 3), ("concat_latent_image", 5),
                          ("concat_mask", 5)):
            value = cond.get(key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != rank or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}_{key} must be a float tensor of {rank} dimensions, got {shape}")
            if value.shape[0] not in (1, tokens.shape[0]):
                raise ValueError(f"{name}_{key} has batch {value.shape[0]} for conditioning of batch {tokens.shape[0]}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}_{key} contains NaN or infinite values")

    def takes_text_files(self, headers: list[dict]) -> bool:
        return text.is_qwen_keys(set(headers[0])) and text.is_byt5_keys(set(headers[1]))

    def make_text_encoder(self, parts: dict):
        return text.HunyuanVideo15TextEncoder(parts["qwen"], parts["byt5"], parts["qwen_tokenizer"])

    def load_vae(self, path, dtype, device):
        return vae.load(path, dtype, device)

    def decode(self, loaded_vae, latent: torch.Tensor, split: VaeSplit | None):
        return vae.decode(loaded_vae, latent, split)

    def encode(self, loaded_vae, frames: torch.Tensor, split: VaeSplit | None):
        return vae.encode(loaded_vae, frames, split)

    def decoder_calls(self, loaded_vae, latent: torch.Tensor) -> int:
        return vae.tile_count(loaded_vae, tuple(latent.shape), sample=False)

    def encoder_calls(self, loaded_vae, frames: torch.Tensor) -> int:
        return vae.tile_count(loaded_vae, tuple(frames.shape[:-1]), sample=True)

    def start_image_conditioning(self, encode_video, image, width, height, length):
        """HunyuanVideo15ImageToVideo's (as the reference pipeline's prepare_cond_latents_and_mask): the start
        image resized to the video (centred crop) and encoded by this family's VAE, on the first latent frame(s)
        of a zero latent, and ComfyUI's mask of 0 there, 1 after ({"concat_latent_image", "concat_mask"})."""
        from ..video import resized_frames

        frames = resized_frames(image, width, height, length)
        latent, vae_family = encode_video(frames[:1 + (frames.shape[0] - 1) // 4 * 4, ..., :3])
        if latent.shape[1] != self.latent_channels:
            raise ValueError(f"vae: {vae_family.label} latents have {latent.shape[1]} channels; HunyuanVideo 1.5 image "
                             "to video uses its own VAE (32 channels): load hunyuanvideo15_vae_fp16.safetensors")
        concat = latent.new_zeros(1, self.latent_channels, (length - 1) // 4 + 1, *latent.shape[-2:])
        concat[:, :, :latent.shape[2]] = latent
        mask = latent.new_ones(1, 1, *concat.shape[2:])
        mask[:, :, :latent.shape[2]] = 0.0
        return {"concat_latent_image": concat, "concat_mask": mask}

    def check_start_image_model(self, config: dict, name: str) -> None:
        raise ValueError(f"{name}: HunyuanVideo 1.5 image to video also needs the start image's SigLIP features, which "
                         "the command line does not make yet: run it in ComfyUI (CLIPVisionEncode with "
                         "sigclip_vision_patch14_384, then USP HunyuanVideo 1.5 Image To Video)")

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


FAMILY = HunyuanVideo15()

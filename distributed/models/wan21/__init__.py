"""Wan 2.1 text-to-video (1.3B, 14B): diffusers' WanTransformer3DModel with USP applied from outside
(dit.py), the UMT5 text encoder (umt5.py), the Wan-VAE and its row-split decode (vae.py), and the tiny
set (tiny.py). FAMILY is what the rest of the pack sees (models/family.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import CheckpointError
from ..family import Defaults, ModelFamily, PlanVariant, TextPart
from ...parallel.vae_split import VaeSplit
from ...formats import streamed
from . import concat, dit, umt5, vae


def plan_variant(label: str, variant: str, params: float) -> PlanVariant:
    """A released Wan DiT (dit.WAN_VARIANTS) as the planner costs it; params: its published size."""
    config = dit.WAN_VARIANTS[variant]
    heads = config["num_attention_heads"]
    return PlanVariant(label, heads=heads, hidden=heads * config["attention_head_dim"],
                       attention_layers=config["num_layers"], params=params, ffn=config["ffn_dim"],
                       patch=tuple(config["patch_size"]), text_tokens=umt5.MIN_LENGTH)


# The negative prompt of Wan's reference pipeline (used when cfg != 1 and none is given).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的")


class Wan21(ModelFamily):
    name, label, short_name = "wan2.1", "Wan 2.1", "wan"
    order = 10
    dit_class, vae_class = "WanTransformer3DModel", "AutoencoderKLWan"
    latent_format = "Wan21"
    # ComfyUI's model configs of its files: text to video, image to video (Fun InP too), Fun Control
    comfy_model_configs = ("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V")
    cond_keys = ("tokens", "concat_latent_image", "concat_mask", "clip_vision", "concat_mask_index", "reference_latent")
    defaults = Defaults(sampler="unipc", shift=5.0, cfg=5.0, negative_prompt=NEGATIVE_PROMPT)
    text_parts = (TextPart("text_encoder", "umt5_xxl .safetensors file or diffusers folder",
                           load=lambda path, dtype, device, shard: umt5.load_umt5(path, dtype, device, shard=shard),
                           shard_units=lambda model: model.encoder.block),)
    text_encoder_hint = "Wan 2.1 uses the umt5-xxl text encoder"
    start_image_node = "WanImageToVideo"
    plan_variants = {"wan-1.3b": plan_variant("Wan 2.1 T2V 1.3B", "wan2.1-t2v-1.3b", 1.42e9),
                     "wan-14b": plan_variant("Wan 2.1 T2V 14B", "wan2.1-t2v-14b", 14.0e9)}
    # Wan 2.1 T2V-14B, 1280x720, 81 frames, on H800/H100 with USP + FSDP (the Wan 2.1 repository's
    # computational-efficiency table)
    reference_times = {("wan-14b", "1280x720x81"): {1: 1838, 2: 945, 4: 497, 8: 288}}

    def is_dit(self, keys: set[str]) -> bool:
        return "patch_embedding.weight" in keys and "vace_patch_embedding.weight" not in keys  # VACE: wan_vace

    def is_vae(self, keys: set[str]) -> bool:
        # the Wan 2.2 VAE shares these names; its decoder's up blocks are residual ("upsamples.0.upsamples")
        return "decoder.middle.0.residual.0.gamma" in keys and not any(".upsamples.0.upsamples." in k for k in keys)

    def is_vae_folder(self, config: dict) -> bool:
        return not config.get("is_residual", False)

    def describe(self, shapes: dict) -> str | None:
        shape = (shapes.get("decoder.conv1.weight") or [[]])[0]
        if len(shape) > 1 and shape[1] == 48:
            return "looks like the Wan 2.2 VAE (48 channels)"
        return None

    # Its image-to-video DiT (36 input channels) attends to CLIP vision features; Wan 2.2 A14B's does not.
    i2v_clip_vision = True

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        config = dit.infer_wan_config(path, shapes, metadata)
        self._check_channels(path.name, config)
        return config

    def check_dit_folder(self, path: Path) -> None:
        self._check_channels(path.name, json.loads((path / "config.json").read_text()))

    # the input channels this family's DiTs may have: text to video, image to video / Fun InP, Fun Control
    dit_input_channels = (16, dit.I2V_CHANNELS, dit.FUN_CONTROL_CHANNELS)

    def _check_channels(self, name: str, config: dict) -> None:
        if config.get("out_channels", 16) != self.latent_channels:
            raise CheckpointError(f"{name} predicts {config.get('out_channels')} latent channels; a {self.label} DiT "
                                  f"predicts {self.latent_channels} (Wan 2.2 TI2V-5B's 48: load it as Wan 2.2 TI2V-5B)")
        dit.check_input_channels(name, config, self.dit_input_channels,
                                 f"a {self.label} text-to-video, image-to-video or Fun model")
        if config.get("in_channels", 16) == dit.I2V_CHANNELS and bool(config.get("image_dim")) != self.i2v_clip_vision:
            raise CheckpointError(
                f"{name} is {'Wan 2.1 I2V (it has a CLIP vision image embedder)' if config.get('image_dim') else 'Wan 2.2 I2V A14B (an image-to-video expert without CLIP vision)'}, "
                f"not a {self.label} model: load it with the {'Wan 2.1' if config.get('image_dim') else 'Wan 2.2 A14B'} loader")

    def concat_channels(self, model) -> int:
        """The channels this loaded DiT takes beside the noise (ComfyUI's WAN21.concat_cond reads them off the patch
        embedding): 0 text to video; 20 image to video and Fun InP (a mask on 4 channels, the start video's 16);
        32 Fun Control (the control video's 16 and the start video's 16)."""
        return model.config.in_channels - self.latent_channels

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load_wan_transformer(path, dtype, device, shard=shard)

    def dit_load_bytes(self, path, dtype, shares):
        if Path(path).is_dir():
            return super().dit_load_bytes(path, dtype, shares)
        return streamed.load_peak_bytes(path, dtype, shares, keep_within=("blocks.",))

    def dit_source_map(self, path):
        if Path(path).is_dir():
            return super().dit_source_map(path)
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        return streamed.file_source_map(path, convert_wan_transformer_to_diffusers)

    def parallelize(self, model, sp, backend):
        return dit.parallelize_wan(model, sp, backend)

    def blocks(self, model):
        return list(model.blocks)

    def describe_dit(self, model) -> dict:
        config = model.config
        return {"heads": config.num_attention_heads, "layers": config.num_layers,
                "hidden": config.num_attention_heads * config.attention_head_dim, "text_dim": config.text_dim}

    def step_sequence(self, model, latent_shape, text_tokens):
        # the text does not join the self-attention (cross-attention): the blocks run on the video's patches
        config = model.config
        pt, ph, pw = config.patch_size
        t, h, w = latent_shape[-3:]
        return {"tokens": -(-t // pt) * -(-h // ph) * -(-w // pw), "hidden": self.describe_dit(model)["hidden"],
                "ffn": config.ffn_dim}

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._normalisation()
        return (latent - mean) / std

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._normalisation()
        return latent * std + mean

    latents_mean, latents_std = dit.LATENTS_MEAN, dit.LATENTS_STD  # ComfyUI's latent_format (Wan21)

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent format's per-channel mean and std, shaped [1, C, 1, 1, 1]."""
        return (torch.tensor(self.latents_mean).view(1, -1, 1, 1, 1),
                torch.tensor(self.latents_std).view(1, -1, 1, 1, 1))

    def velocity(self, model, x, t, cond, options):
        if "concat" in cond:  # image to video: the start video (mask, latent) beside the noise, as ComfyUI does
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        if "reference" in cond:  # Wan 2.2 Fun Control's reference image (dit.build_wan: its tokens go in front)
            model.reference_input = cond["reference"].to(x.dtype)
        try:
            return model(x, t, cond["tokens"], encoder_hidden_states_image=cond.get("clip_vision"),
                         return_dict=False)[0]
        finally:
            if "reference" in cond:
                model.reference_input = None

    # Image to video, in ComfyUI's terms (nodes_wan.WanImageToVideo; model_base.WAN21.concat_cond / extra_conds):
    # concat_latent_image: the start video's raw latent (start frames, then gray), [B, 16, T, H, W];
    # concat_mask: [1, 1, T, H, W], 0 where the start video holds (ComfyUI inverts it); clip_vision: CLIP vision's
    # penultimate hidden states [B, 257, 1280] (clip_vision_output.penultimate_hidden_states), Wan 2.1 I2V only.
    # Wan22FunControlToVideo adds concat_mask_index (where the mask goes in the concat: after the control video)
    # and reference_latent (its reference image's raw latent, [B, 16, 1, H, W]: ComfyUI's reference_latents[-1]).
    IMAGE_KEYS = ("concat_latent_image", "concat_mask", "clip_vision", "concat_mask_index", "reference_latent")

    def check_conditioning(self, cond, name):
        for key, dims in (("concat_latent_image", 5), ("concat_mask", 5), ("clip_vision", 3), ("reference_latent", 5)):
            value = cond.get(key)
            if value is None:
                continue
            if value.dim() != dims or not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{name}.{key} must be a finite {dims}-D float tensor, got {tuple(value.shape)} "
                                 f"{value.dtype}")
        index = cond.get("concat_mask_index")
        # (the request carries it as a float tensor, as every conditioning tensor)
        if index is not None and (index.dim() != 0 or float(index) != int(index) or int(index) < 0):
            raise ValueError(f"{name}.concat_mask_index must be a non-negative integer, got {index!r}")
        if "concat_mask" in cond and "concat_latent_image" not in cond:
            raise ValueError(f"{name}.concat_mask comes without its concat_latent_image")
        image = cond.get("clip_vision")
        if image is not None and image.shape[-1] != dit.CLIP_VISION_DIM:
            raise ValueError(f"{name}.clip_vision has width {image.shape[-1]}; Wan's image embedder takes CLIP ViT-H's "
                             f"penultimate hidden states, {dit.CLIP_VISION_DIM} wide (clip_vision_h.safetensors)")

    # The ComfyUI node that makes a DiT's concat conditioning, by concat_channels (for messages).
    CONCAT_NODES = {20: "WanImageToVideo (or WanFirstLastFrameToVideo, WanFunInpaintToVideo)",
                    32: "WanFunControlToVideo", 36: "Wan22FunControlToVideo"}

    def model_conditioning(self, model, cond, latent_shape, name):
        given = [key for key in self.IMAGE_KEYS if key in cond]
        extra = self.concat_channels(model)
        if not extra:
            if given:
                raise ValueError(f"{name} carries a start image ({', '.join(given)}), and this is a text-to-video "
                                 "model: load an image-to-video (I2V) model, or remove the image-to-video node")
            return cond
        node = self.CONCAT_NODES.get(extra, "WanImageToVideo")
        if "concat_latent_image" not in cond:
            kind = "a Fun Control model" if extra == 32 else "an image-to-video model"
            raise ValueError(f"{name}: this is {kind} and has no start image: connect {node} between the text encode "
                             "and the sampler")
        embedder = bool(model.config.image_dim)  # Wan 2.1 I2V and the Fun models' CLIP vision image embedder
        if embedder and extra == 20 and "clip_vision" not in cond:
            raise ValueError(f"{name}: Wan 2.1 I2V needs the start image's CLIP vision features: CLIPVisionEncode "
                             f"(clip_vision_h.safetensors, crop none) into {node.split(' ')[0]}'s clip_vision_output")
        if not embedder and "clip_vision" in cond:
            raise ValueError(f"{name}: this {self.label} model takes no CLIP vision features: disconnect "
                             "clip_vision_output (it would not be used)")
        out = {key: value for key, value in cond.items() if key not in self.IMAGE_KEYS or key == "clip_vision"}
        index = cond.get("concat_mask_index")
        out["concat"] = concat.concat_cond(self, model, cond["concat_latent_image"], cond.get("concat_mask"),
                                           latent_shape, name, 0 if index is None else int(index))
        reference = concat.reference(self, model, cond.get("reference_latent"), latent_shape, name)
        if reference is not None:
            out["reference"] = reference
        return out

    def comfy_image_to_video(self, model) -> bool:
        """ComfyUI's image_to_video flag of this DiT's model_base (it decides, in concat_cond, whether an image of
        other channels than the DiT's gets a mask): only WAN21_I2V (36 channels with the image embedder) sets it."""
        return self.concat_channels(model) == 20 and bool(model.config.image_dim)

    def teacache_coefficients(self, model) -> tuple[list[float] | None, str]:
        """TeaCache's published polynomial for this model (TeaCache4Wan2.1, the e0 / "ret_steps" variant,
        which measures the timestep projection the blocks take) and a note on where it comes from."""
        width = model.config.num_attention_heads * model.config.attention_head_dim
        if width >= 5120:
            return dit.TEACACHE_WAN21_14B, "TeaCache's Wan 2.1 T2V 14B coefficients"
        note = "TeaCache's Wan 2.1 T2V 1.3B coefficients"
        return dit.TEACACHE_WAN21_1_3B, note if width == 1536 else note + f" (this model is {width} wide: uncalibrated)"

    def magcache_curve(self, model) -> tuple[list[float] | None, str]:
        """MagCache's published ratios for this model (50 steps, both passes interleaved) and a note."""
        width = model.config.num_attention_heads * model.config.attention_head_dim
        if width >= 5120:
            return dit.MAGCACHE_WAN21_14B, "MagCache's Wan 2.1 T2V 14B ratios"
        note = "MagCache's Wan 2.1 T2V 1.3B ratios"
        return dit.MAGCACHE_WAN21_1_3B, note if width == 1536 else note + f" (this model is {width} wide: uncalibrated)"

    def step_cache_spec(self, model, latent_shape):
        from ...sampling.step_cache import StepCacheSpec, nearest_interp

        if getattr(model, "ref_conv", None) is not None:
            raise ValueError("step caches are not available for Wan 2.2 Fun Control (its reference-image tokens are "
                             "not handled by the caches yet)")

        coefficients, note = self.teacache_coefficients(model)
        curve, magcache_note = self.magcache_curve(model)

        def magcache_ratios(side: str, steps: int):
            # the conditional pass's ratios at even places, the unconditional one's at odd ones; a batched
            # pass of both takes the conditional one's
            return None if curve is None else nearest_interp(curve[1::2] if side == "negative" else curve[0::2], steps)

        # TeaCache4Wan2.1 (ret_steps): the first 5 steps are always computed, the last one may be skipped;
        # it measures e0, the timestep projection every block takes (args[2], [B, 6, dim]: not per token).
        return StepCacheSpec(block_lists=[model.blocks], block_output=lambda args, hidden: hidden,
                             teacache_input=lambda args: (args[2], None), teacache_coefficients=coefficients,
                             teacache_warmup=5, teacache_last=False, teacache_note=note,
                             magcache_ratios=magcache_ratios, magcache_k=2, magcache_note=magcache_note)

    def make_text_encoder(self, parts: dict):
        return _Encoder(parts["text_encoder"])

    def load_vae(self, path, dtype, device):
        return vae.load_wan_vae(path, dtype, device)

    def decode(self, loaded_vae, latent: torch.Tensor, split: VaeSplit | None):
        return vae.decode(loaded_vae, latent, split)

    vae_encodes = True

    def encode(self, loaded_vae, frames: torch.Tensor, split: VaeSplit | None):
        return vae.encode(loaded_vae, frames, split)

    def encoder_calls(self, loaded_vae, frames: torch.Tensor) -> int:
        # the Wan VAEs call the encoder for the first frame, then for every 4 frames: once per latent frame
        return (frames.shape[0] - 1) // 4 + 1

    def decoder_calls(self, loaded_vae, latent: torch.Tensor) -> int:
        return latent.shape[2]  # diffusers' AutoencoderKLWan calls it once per latent frame

    def check_start_image_model(self, config, name):
        if config.get("in_channels") != dit.I2V_CHANNELS:
            super().check_start_image_model(config, name)
        if config.get("image_dim"):
            raise ValueError("Wan 2.1 I2V needs the start image's CLIP ViT-H features, which the command line does "
                             "not compute; use ComfyUI (CLIP Vision Encode into WanImageToVideo), or Wan 2.2 I2V A14B")

    def start_image_conditioning(self, encode_video, image, width, height, length):
        """WanImageToVideo's: the start video (models/video.start_video: the image resized with a centred crop,
        gray frames after it) encoded by the Wan 2.1 VAE, and its mask ({"concat_latent_image", "concat_mask"})."""
        from ..video import start_mask, start_video

        concat, vae_family = encode_video(start_video(image, width, height, length))
        if concat.shape[1] != self.latent_channels:
            raise ValueError(f"vae: {vae_family.label} latents have {concat.shape[1]} channels; Wan image to video "
                             "uses the Wan 2.1 VAE (16 channels): load wan_2.1_vae.safetensors")
        mask = start_mask(min(image.shape[0], length), concat.shape[2], *concat.shape[-2:])
        return {"concat_latent_image": concat, "concat_mask": mask}

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


class _Encoder:
    """UMT5 as a family text encoder: prompt -> {"tokens": [1, max(512, n), 4096]}."""

    def __init__(self, encoder: umt5.Umt5TextEncoder):
        self.encoder = encoder

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return {"tokens": self.encoder.encode(prompt)}


FAMILY = Wan21()

"""Wan 2.2 Animate (Comfy-Org's wan2.2_animate_14B_bf16, with clip_vision_h, umt5 and wan_2.1_vae): a character
image driven by a pose video and a face video (or a person in a video replaced), as ComfyUI 0.3.64's
WanAnimateToVideo conditions it and its WAN22_Animate model runs it.

The DiT is Wan 2.1 I2V 14B's (36 input channels: noise | mask | reference and video latents; CLIP vision
cross-attention) plus a pose patch embedding, a motion encoder and face encoder (face video -> 5 tokens per latent
frame) and a face adapter after every 5th block (dit.py: diffusers' WanAnimateTransformer3DModel's modules,
ComfyUI's forward). Everything else (text, VAE, latent format, the image part of the conditioning) is Wan 2.1's.

Its conditioning, ComfyUI's names end to end (WanAnimateToVideo): concat_latent_image (the reference image's
latent, then the background / continued video's), concat_mask ([1, 4, T, H, W]), clip_vision (the reference
image's CLIP vision features), pose_video_latent (raw VAE latent of the pose video, one frame less than the
latent: the reference frame has none) and face_video_pixels ([1, 3, F, 512, 512] in -1..1; -1 on the negative).
The LATENT holds the reference frame first: TrimVideoLatent(trim_latent) removes it after sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats import streamed
from ..family import Defaults, ModelFamily
from ..wan21 import NEGATIVE_PROMPT, Wan21, plan_variant
from ..wan21 import dit as wan
from ..wan21 import concat
from . import dit


class WanAnimate(Wan21):
    name, label, short_name = "wan2.2-animate", "Wan 2.2 Animate", "wan2.2-animate"
    order = 12  # its files have Wan 2.1's names too; Wan 2.1 refuses them (wan21/dit.infer_wan_config)
    dit_class = "WanAnimateTransformer3DModel"
    comfy_model_configs = ("WAN22_Animate",)
    cond_keys = ("tokens", "concat_latent_image", "concat_mask", "clip_vision", "pose_video_latent",
                 "face_video_pixels")
    # Wan 2.2's Animate config (wan/configs/wan_animate_14B.py): shift 5, guidance 1 (no negative pass), 20 steps
    defaults = Defaults(sampler="unipc", shift=5.0, cfg=1.0, negative_prompt=NEGATIVE_PROMPT, steps=20)
    text_encoder_hint = "Wan 2.2 Animate uses the umt5-xxl text encoder"
    start_image_node = "WanAnimateToVideo"
    plan_variants = {"wan2.2-animate": plan_variant("Wan 2.2 Animate 14B", "wan2.1-t2v-14b", 14.0e9)}
    reference_times = {}

    def is_dit(self, keys: set[str]) -> bool:
        return "patch_embedding.weight" in keys and dit.is_animate(keys)

    def describe(self, shapes: dict) -> str | None:
        return "looks like a Wan 2.2 Animate DiT" if dit.is_animate(set(shapes)) else None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        config = dit.infer_animate_config(path, shapes, metadata)
        wan.check_input_channels(path.name, config, wan.I2V_CHANNELS, self.label)
        return config

    def check_dit_folder(self, path: Path) -> None:
        wan.check_input_channels(path.name, json.loads((path / "config.json").read_text()), wan.I2V_CHANNELS,
                                 self.label)

    def is_image_to_video(self, model) -> bool:
        return True

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load_animate_transformer(path, dtype, device, shard=shard)

    def dit_source_map(self, path):
        if Path(path).is_dir():
            return ModelFamily.dit_source_map(self, path)
        return streamed.file_source_map(path, dit.convert)

    def parallelize(self, model, sp, backend):
        return dit.parallelize_animate(model, sp, backend)

    def step_cache_spec(self, model, latent_shape):
        # the face adapter runs between blocks: a cache that skips blocks would skip it too (not measured here)
        raise ValueError("step caches (TeaCache, MagCache, first-block cache) are not available for Wan 2.2 Animate "
                         "models: its face adapter runs between the blocks they skip; set the step cache to off")

    def velocity(self, model, x, t, cond, options):
        if "concat" in cond:  # the reference, mask and video latents beside the noise (ComfyUI's concat_cond)
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        return model(x, t, cond["tokens"], encoder_hidden_states_image=cond.get("clip_vision"),
                     pose_latents=cond.get("pose"), face_pixel_values=cond.get("face_video_pixels"),
                     return_dict=False)[0]

    def check_conditioning(self, cond, name):
        super().check_conditioning(cond, name)
        for key, channels in (("pose_video_latent", self.latent_channels), ("face_video_pixels", 3)):
            value = cond.get(key)
            if value is None:
                continue
            if value.dim() != 5 or value.shape[1] != channels or not value.is_floating_point() \
                    or not torch.isfinite(value).all():
                raise ValueError(f"{name}.{key} must be a finite float tensor [batch, {channels}, frames, height, "
                                 f"width] (as WanAnimateToVideo makes it), got {tuple(value.shape)} {value.dtype}")

    def comfy_image_to_video(self, model) -> bool:
        return False  # ComfyUI's WAN22_Animate model_base leaves image_to_video off

    def model_conditioning(self, model, cond, latent_shape, name):
        """ComfyUI's WAN22_Animate.extra_conds and concat_cond: the reference/video latents and mask beside the
        noise (zeros without them, as ComfyUI), the pose latent in the model's space, the face pixels as they are."""
        from ..video import resize_to_batch

        batch, channels, frames, height, width = latent_shape
        out = {key: value for key, value in cond.items()
               if key not in ("concat_latent_image", "concat_mask", "pose_video_latent")}
        if "clip_vision" not in cond:
            raise ValueError(f"{name}: Wan 2.2 Animate needs the reference image's CLIP vision features: "
                             "CLIPVisionEncode (clip_vision_h.safetensors) into WanAnimateToVideo's clip_vision_output")
        if "concat_latent_image" in cond:
            out["concat"] = concat.concat_cond(self, model, cond["concat_latent_image"], cond.get("concat_mask"),
                                               latent_shape, name)
        else:
            if "concat_mask" in cond:
                raise ValueError(f"{name}.concat_mask comes without its concat_latent_image")
            out["concat"] = torch.zeros(batch, wan.I2V_CHANNELS - channels, frames, height, width)
        pose = cond.get("pose_video_latent")
        if pose is not None:
            if pose.shape[-2:] != (height, width):
                raise ValueError(f"{name}.pose_video_latent is {tuple(pose.shape)}; the latent is {tuple(latent_shape)}: "
                                 "make both with WanAnimateToVideo's width and height")
            out["pose"] = resize_to_batch(self.process_in(pose.float()), batch)
        face = cond.get("face_video_pixels")
        if face is not None:
            size = model.config.motion_encoder_size
            if face.shape[-2:] != (size, size):
                raise ValueError(f"{name}.face_video_pixels is {tuple(face.shape)}: this model's motion encoder takes "
                                 f"{size}x{size} face frames (WanAnimateToVideo's face_video makes them)")
            out["face_video_pixels"] = resize_to_batch(face.float(), batch)
        return out

    def check_start_image_model(self, config, name):
        raise ValueError(f"{name} is Wan 2.2 Animate: it takes a reference image, a pose video and a face video "
                         "(ComfyUI's WanAnimateToVideo), not a start image alone")

    def demo_conditioning(self, config, width, height, frames):
        """Synthetic WanAnimateToVideo-shaped inputs (random, made here: no reference image, pose or face video is
        read): the latent's first frame stands for the reference image (its mask 0), a pose latent for the frames
        after it, a face video of 4 (T - 1) - 3 frames at the model's face size, CLIP vision features."""
        g = torch.Generator().manual_seed(0)
        latent = ((frames - 1) // 4 + 1, height // self.spatial_compression, width // self.spatial_compression)
        mask = torch.ones(1, 4, *latent)
        mask[:, :, 0] = 0.0
        size = config.get("motion_encoder_size", 512)
        return {"concat_latent_image": torch.randn(1, self.latent_channels, *latent, generator=g), "concat_mask": mask,
                "clip_vision": torch.randn(1, 257, config.get("image_dim") or wan.CLIP_VISION_DIM, generator=g),
                "pose_video_latent": torch.randn(1, self.latent_channels, latent[0] - 1, *latent[1:], generator=g),
                "face_video_pixels": torch.rand(1, 3, max(4 * (latent[0] - 1) - 3, 1), size, size, generator=g) * 2 - 1}

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


FAMILY = WanAnimate()

"""The Wan 2.1 nodes (and the VAE nodes both models use): thin adapters between ComfyUI types
and distributed.api."""

from __future__ import annotations


from ..distributed import api
from ..distributed.sampling.samplers import SAMPLERS
from . import services
from .common import (LATENT_TAG, TIP_DENOISE, TIP_GROUP, TIP_NEGATIVE, TIP_POSITIVE, TIP_STEPS, TIP_TEXT,
                     wan_conditioning, load_model, run_sampler, show_group)
from .cache_node import TIP_STEP_CACHE
from .group_node import CATEGORY


class UspWanModelLoader:
    DESCRIPTION = "Loads a Wan 2.1 text-to-video diffusion model on every rank of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": "From the USP Group node."}),
            "model_name": (services.list_models("diffusion_models"),
                           {"tooltip": "A Wan 2.1 T2V file from models/diffusion_models "
                                       "(fp16, bf16 or fp8_e4m3fn)."}),
        }}

    RETURN_TYPES = ("USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, model_name):
        return load_model(group, model_name, "wan2.1")


class UspTextEncoderLoader:
    DESCRIPTION = "Loads the UMT5 text encoder for Wan 2.1 on rank 0 of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
            "text_encoder_name": (services.list_models("text_encoders"),
                                  {"tooltip": "umt5_xxl_fp16.safetensors (or fp8) from models/text_encoders."}),
        }}

    RETURN_TYPES = ("USP_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, text_encoder_name):
        return ({"group": group, "path": services.model_path("text_encoders", text_encoder_name)},)


class UspTextEncode:
    DESCRIPTION = "Encodes a prompt with UMT5; the CONDITIONING equals native CLIPTextEncode's for Wan."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("USP_TEXT_ENCODER", {"tooltip": "From USP Load Text Encoder (UMT5)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": TIP_TEXT}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text):
        cond = api.encode(text_encoder["group"], "wan2.1", {"text_encoder": text_encoder["path"]}, text)
        return ([[cond["tokens"], {}]],)


class UspWanSampler:
    DESCRIPTION = ("Denoises a video latent with the Wan 2.1 model on all ranks of the USP group "
                   "(sequence parallel). The same seed gives the same video on 1 or N GPUs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("USP_WAN_MODEL", {"tooltip": "From USP Load Wan 2.1 Model."}),
            "positive": ("CONDITIONING", {"tooltip": TIP_POSITIVE}),
            "negative": ("CONDITIONING", {"tooltip": TIP_NEGATIVE}),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent (e.g. EmptyHunyuanLatentVideo) "
                                                   "or a latent to re-noise with denoise < 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": api.MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed; means the same as in a native KSampler."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": TIP_STEPS}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance; 1.0 skips the negative pass."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift (ModelSamplingSD3). Wan 2.1: 5 for 720p; 8-12 "
                                           "often better for the 1.3B model at 480p."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "unipc: Wan's reference solver (bh2); "
                                                         "euler: same as ComfyUI's euler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": TIP_DENOISE}),
        }, "optional": {"step_cache": ("USP_STEP_CACHE", {"tooltip": TIP_STEP_CACHE})},
            "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, shift, sampler_name, denoise,
               node_id=None, step_cache=None):
        return run_sampler(model, latent_image, node_id, cache=step_cache or {},
                           seed=seed, steps=steps, cfg=cfg, shift=shift,
                           sampler=sampler_name, denoise=denoise,
                           positive=wan_conditioning(positive, "positive"),
                           negative=wan_conditioning(negative, "negative"))


class UspWanSamplerAdvanced:
    DESCRIPTION = ("KSamplerAdvanced on the USP group: runs steps start_at_step..end_at_step of the schedule and "
                   "can return the latent with its leftover noise, in ComfyUI's convention, so that it mixes with "
                   "native KSamplerAdvanced nodes either way (e.g. Wan 2.2's high-noise / low-noise two-sampler "
                   "layout); with euler the handoff is exact (ComfyUI's uni_pc walks other sigmas than our unipc).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("USP_WAN_MODEL", {"tooltip": "A Wan model: a Wan 2.1 loader's, or one expert of the Wan 2.2 "
                                                   "loader (high_noise for the first steps, low_noise after)."}),
            "add_noise": (["enable", "disable"], {"tooltip": "disable when the latent comes with leftover noise "
                                                             "from the sampler before this one."}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": api.MAX_SEED, "control_after_generate": True,
                                    "tooltip": "Noise seed (used when add_noise is enable); as in KSamplerAdvanced."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "Steps of the whole schedule (all samplers of the layout)."}),
            "cfg": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance; 1.0 skips the negative pass."}),
            "shift": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift (ModelSamplingSD3); the same on every sampler of the layout."}),
            "sampler_name": (list(SAMPLERS), {"default": "euler",
                                              "tooltip": "euler: split runs equal one run. unipc: its history "
                                                         "restarts at a split, so they differ."}),
            "positive": ("CONDITIONING", {"tooltip": TIP_POSITIVE}),
            "negative": ("CONDITIONING", {"tooltip": TIP_NEGATIVE}),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent, or the latent (with leftover noise) "
                                                   "of the sampler before this one."}),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                      "tooltip": "The first step of the schedule this sampler runs."}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000,
                                    "tooltip": "The step it stops before (10000: to the end)."}),
            "return_with_leftover_noise": (["disable", "enable"], {"tooltip": "enable to hand the latent to "
                                                                              "another sampler mid-schedule."}),
        }, "optional": {"step_cache": ("USP_STEP_CACHE", {"tooltip": TIP_STEP_CACHE})},
            "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, add_noise, noise_seed, steps, cfg, shift, sampler_name, positive, negative, latent_image,
               start_at_step, end_at_step, return_with_leftover_noise, node_id=None, step_cache=None):
        for name, value in (("add_noise", add_noise), ("return_with_leftover_noise", return_with_leftover_noise)):
            if value not in ("enable", "disable"):
                raise ValueError(f"{name} must be 'enable' or 'disable', got {value!r}")
        return run_sampler(model, latent_image, node_id, cache=step_cache or {},
                           seed=noise_seed, steps=steps, cfg=cfg, shift=shift,
                           sampler=sampler_name, add_noise=add_noise == "enable", start_step=start_at_step,
                           end_step=end_at_step, leftover_noise=return_with_leftover_noise == "enable",
                           positive=wan_conditioning(positive, "positive"),
                           negative=wan_conditioning(negative, "negative"))


class UspVaeLoader:
    DESCRIPTION = "Loads a video VAE (Wan 2.1 or HunyuanVideo) on rank 0 of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
            "vae_name": (services.list_models("vae"), {"tooltip": "wan_2.1_vae.safetensors or "
                                                                  "hunyuan_video_vae_bf16.safetensors from models/vae."}),
        }}

    RETURN_TYPES = ("USP_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, vae_name):
        return ({"group": group, "path": services.model_path("vae", vae_name)},)


class UspVaeDecode:
    DESCRIPTION = "Decodes a Wan 2.1 or HunyuanVideo latent to frames on the USP group (tiled for HunyuanVideo)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("USP_VAE", {"tooltip": "From USP Load VAE: the VAE of the model that made the latent."}),
            "samples": ("LATENT", {"tooltip": "A USP sampler's output (or a native video latent of the same model)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, vae, samples, node_id=None):
        progress = services.Progress(1, node_id)

        def on_progress(event: dict) -> None:
            if event["step"] == 1:  # the group answered: show it once, not every step
                show_group(vae["group"])
            progress.update(event["step"], event["total"])
            services.publish_status(state=f"decoding {event['step']}/{event['total']}")

        try:
            frames = api.decode(vae["group"], vae["path"], samples["samples"], family=samples.get(LATENT_TAG),
                                on_progress=on_progress)
        except BaseException:
            services.publish_status(state="interrupted" if services.interrupt_requested() else "failed")
            raise
        services.publish_status(state="ready")
        if progress.value == 0:  # a decode that reported nothing still ends the bar
            progress.update(1)
        return (frames,)


class UspVaeEncode:
    DESCRIPTION = ("Encodes a video (IMAGE frames) to a latent with the Wan 2.1 or Wan 2.2 VAE on the USP group, "
                   "its rows split across the ranks: the latent ComfyUI's VAE Encode gives (a start video, or a "
                   "video to re-sample with denoise < 1).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The video: 1 + 4k frames (1, 5, ..., 81), width and height in multiples "
                                            "of 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE)."}),
            "vae": ("USP_VAE", {"tooltip": "From USP Load VAE: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 A14B) or the "
                                           "Wan 2.2 VAE (TI2V-5B)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels, vae, node_id=None):
        progress = services.Progress(1, node_id)

        def on_progress(event: dict) -> None:
            if event["step"] == 1:
                show_group(vae["group"])
            progress.update(event["step"], event["total"])
            services.publish_status(state=f"encoding {event['step']}/{event['total']}")

        try:
            # the first 3 channels, as VAE Encode takes them (an RGBA IMAGE too); a view: pixels stay unchanged
            latent, family = api.encode_video(vae["group"], vae["path"], pixels[..., :3], on_progress=on_progress)
        except BaseException:
            services.publish_status(state="interrupted" if services.interrupt_requested() else "failed")
            raise
        services.publish_status(state="ready")
        if progress.value == 0:
            progress.update(1)
        return ({"samples": latent, LATENT_TAG: family},)


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspWanModelLoader": (UspWanModelLoader, "USP Load Wan 2.1 Model"),
    "UspTextEncoderLoader": (UspTextEncoderLoader, "USP Load Text Encoder (UMT5)"),
    "UspTextEncode": (UspTextEncode, "USP Text Encode (Wan)"),
    "UspWanSampler": (UspWanSampler, "USP Sampler (Wan 2.1)"),
    "UspWanSamplerAdvanced": (UspWanSamplerAdvanced, "USP Sampler Advanced (Wan)"),
    "UspVaeLoader": (UspVaeLoader, "USP Load VAE (Wan / HunyuanVideo)"),
    "UspVaeDecode": (UspVaeDecode, "USP VAE Decode"),
    "UspVaeEncode": (UspVaeEncode, "USP VAE Encode"),
}

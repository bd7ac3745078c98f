"""The Wan 2.1 nodes: thin adapters between ComfyUI types and distributed.api."""

from __future__ import annotations

import logging
import time

from ..distributed import api
from ..distributed.client import Interrupted
from ..distributed.sampling.samplers import SAMPLERS
from . import services
from .group_node import CATEGORY

log = logging.getLogger("usp_video")


def _conditioning_tensor(conditioning, name: str):
    """CONDITIONING ([[tensor, dict], ...]) -> the tensor; only plain text conditioning is supported."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name}: expected CONDITIONING from a text-encode node")
    if len(conditioning) > 1:
        raise ValueError(f"{name}: combined/area conditioning ({len(conditioning)} entries) is not supported; "
                         "connect a single text encode")
    return conditioning[0][0]


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
        path = services.model_path("diffusion_models", model_name)
        info = api.load_dit(group, path)
        text = (f"{model_name}: {info['layers']} layers, {info['heads']} heads; "
                f"ulysses={info['ulysses']} x ring={info['ring']}")
        log.info("usp-video: %s", text)
        return ({"group": group, "path": path, "info": info}, text)


class UspTextEncoderLoader:
    DESCRIPTION = "Loads the UMT5 text encoder for Wan 2.1 on rank 0 of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP",),
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
            "text_encoder": ("USP_TEXT_ENCODER",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text):
        cond = api.encode_text(text_encoder["group"], text_encoder["path"], text)
        return ([[cond, {}]],)


class UspWanSampler:
    DESCRIPTION = ("Denoises a video latent with the Wan 2.1 model on all ranks of the USP group "
                   "(sequence parallel). The same seed gives the same video on 1 or N GPUs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("USP_WAN_MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent (e.g. EmptyHunyuanLatentVideo) "
                                                   "or a latent to re-noise with denoise < 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": api.MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed; means the same as in a native KSampler."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance; 1.0 skips the negative pass."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift (ModelSamplingSD3). Wan 2.1: 5 for 720p; 8-12 "
                                           "often better for the 1.3B model at 480p."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "unipc: Wan's reference solver (bh2); "
                                                         "euler: same as ComfyUI's euler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, shift, sampler_name, denoise,
               node_id=None):
        if "noise_mask" in latent_image:
            raise ValueError("latent_image has a noise mask; masked (inpainting) sampling is not supported")
        progress = services.Progress(steps, node_id)
        started = time.monotonic()

        def on_progress(event: dict) -> None:
            progress.update(event["step"], event["total"], event.get("x0"))
            per_step = event["elapsed"] / event["step"]
            log.info("usp-video: step %d/%d, %.2f s/step, ETA %.0f s", event["step"], event["total"], per_step,
                     per_step * (event["total"] - event["step"]))

        try:
            samples, info = api.sample(
                model["group"], model["path"], positive=_conditioning_tensor(positive, "positive"),
                negative=_conditioning_tensor(negative, "negative"), latent=latent_image["samples"], seed=seed,
                steps=steps, cfg=cfg, shift=shift, sampler=sampler_name, denoise=denoise,
                text_dim=model["info"].get("text_dim"), on_progress=on_progress,
                should_cancel=services.interrupt_requested, preview=progress.wants_preview)
        except Interrupted:
            services.throw_if_interrupted()
            raise
        log.info("usp-video: sampled %d steps in %.1f s (ulysses=%d ring=%d)", steps, time.monotonic() - started,
                 info["ulysses"], info["ring"])
        out = latent_image.copy()  # never mutate a cached input
        out["samples"] = samples
        return (out,)


class UspVaeLoader:
    DESCRIPTION = "Loads the Wan 2.1 VAE on rank 0 of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP",),
            "vae_name": (services.list_models("vae"), {"tooltip": "wan_2.1_vae.safetensors from models/vae."}),
        }}

    RETURN_TYPES = ("USP_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, vae_name):
        return ({"group": group, "path": services.model_path("vae", vae_name)},)


class UspVaeDecode:
    DESCRIPTION = "Decodes a Wan 2.1 video latent to frames on the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("USP_VAE",), "samples": ("LATENT",)}, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, vae, samples, node_id=None):
        progress = services.Progress(1, node_id)
        frames = api.decode(vae["group"], vae["path"], samples["samples"])
        progress.update(1)
        return (frames,)

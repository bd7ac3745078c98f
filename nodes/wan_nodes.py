"""The Wan 2.1 nodes: thin adapters between ComfyUI types and distributed.api, and Wan's side of a CONDITIONING
(`wan_conditioning`: the text and, from a native image-to-video node, the start video and CLIP vision), which
the Wan 2.2 node files use too. The VAE nodes every family uses are in vae_nodes.py."""

from __future__ import annotations


from ..distributed import api
from ..distributed.sampling.samplers import SAMPLERS
from . import services
from .common import TIP_DENOISE, TIP_GROUP, TIP_NEGATIVE, TIP_POSITIVE, TIP_STEPS, TIP_TEXT
from .conditioning import conditioning_parts
from .model_socket import load_model
from .native_nodes import TIP_SHIFT_RULE, NativeModelNode
from .sampler_run import run_sampler
from .cache_node import TIP_STEP_CACHE
from .group_node import CATEGORY


# Native image-to-video conditioning (WanImageToVideo, WanFirstLastFrameToVideo, CLIPVisionEncode) that the Wan
# samplers apply: the start video's latent and mask, and CLIP vision's penultimate hidden states.
WAN_IMAGE_KEYS = ("concat_latent_image", "concat_mask", "clip_vision_output")


def wan_conditioning(conditioning, name: str) -> dict:
    """A Wan sampler's side of the conditioning as the request carries it: {"tokens"} and, from a native
    image-to-video node, "concat_latent_image", "concat_mask" and "clip_vision" (the model checks that they fit
    it: distributed/models/wan21)."""
    tokens, extra = conditioning_parts(conditioning, name, WAN_IMAGE_KEYS)
    cond = {"tokens": tokens}
    for key in ("concat_latent_image", "concat_mask"):
        if extra.get(key) is not None:
            cond[key] = extra[key]
    vision = extra.get("clip_vision_output")
    if vision is not None:
        hidden = getattr(vision, "penultimate_hidden_states", None)
        if hidden is None:
            raise ValueError(f"{name}: its clip_vision_output has no penultimate_hidden_states (not a CLIPVisionEncode "
                             "output?)")
        cond["clip_vision"] = hidden
    return cond


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



class UspNativeWanModel(NativeModelNode):
    FAMILIES = ("wan2.1", "wan2.2-ti2v-5b")
    RETURN_TYPES = ("USP_WAN_MODEL", "STRING")
    OUTPUT_TOOLTIPS = ("For the USP Wan samplers. " + TIP_SHIFT_RULE, "What was read from the graph and loaded.")


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspWanModelLoader": (UspWanModelLoader, "USP Load Wan 2.1 Model"),
    "UspTextEncoderLoader": (UspTextEncoderLoader, "USP Load Text Encoder (UMT5)"),
    "UspTextEncode": (UspTextEncode, "USP Text Encode (Wan)"),
    "UspWanSampler": (UspWanSampler, "USP Sampler (Wan 2.1)"),
    "UspWanSamplerAdvanced": (UspWanSamplerAdvanced, "USP Sampler Advanced (Wan)"),
    "UspNativeWanModel": (UspNativeWanModel, "USP Model from native MODEL (Wan 2.1 / 2.2 5B)"),
}

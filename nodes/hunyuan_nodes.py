"""The HunyuanVideo nodes: thin adapters between ComfyUI types and distributed.api.
The VAE nodes are every family's (vae_nodes.py)."""

from __future__ import annotations


from ..distributed import api
from ..distributed.sampling.samplers import SAMPLERS
from . import services
from .common import TIP_DENOISE, TIP_GROUP, TIP_POSITIVE, TIP_STEPS, TIP_TEXT
from .conditioning import conditioning_parts
from .model_socket import load_model
from .native_nodes import TIP_SHIFT_RULE, NativeModelNode
from .sampler_run import run_sampler
from .cache_node import TIP_STEP_CACHE
from .group_node import CATEGORY


class UspNativeHunyuanModel(NativeModelNode):
    FAMILIES = ("hunyuan-video",)
    RETURN_TYPES = ("USP_HUNYUAN_MODEL", "STRING")
    OUTPUT_TOOLTIPS = ("For USP Sampler (HunyuanVideo). " + TIP_SHIFT_RULE, "What was read from the graph and loaded.")


class UspHunyuanModelLoader:
    DESCRIPTION = "Loads a HunyuanVideo text-to-video diffusion model on every rank of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": "From the USP Group node."}),
            "model_name": (services.list_models("diffusion_models"),
                           {"tooltip": "hunyuan_video_t2v_720p_bf16.safetensors (or fp8) from "
                                       "models/diffusion_models."}),
        }}

    RETURN_TYPES = ("USP_HUNYUAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, model_name):
        return load_model(group, model_name, "hunyuan-video")


class UspHunyuanTextEncoderLoader:
    DESCRIPTION = ("Loads HunyuanVideo's text encoders (LLaVA-Llama-3 and CLIP-L) on rank 0 of the USP group. "
                   "Same files as native DualCLIPLoader (type hunyuan_video).")

    @classmethod
    def INPUT_TYPES(cls):
        names = services.list_models("text_encoders")
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
            "llama_name": (names, {"tooltip": "llava_llama3_fp8_scaled.safetensors (or fp16) from "
                                              "models/text_encoders."}),
            "clip_name": (names, {"tooltip": "clip_l.safetensors from models/text_encoders."}),
            "tokenizer_folder": ("STRING", {"default": "", "tooltip": (
                "Folder with the Llama 3 and CLIP tokenizers. Empty: the ones ComfyUI ships "
                "(comfy/text_encoders/llama_tokenizer, comfy/sd1_tokenizer).")}),
        }}

    RETURN_TYPES = ("USP_HUNYUAN_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, llama_name, clip_name, tokenizer_folder):
        folder = tokenizer_folder.strip() or services.comfyui_dir()
        if folder is None:
            raise ValueError("tokenizer_folder: outside ComfyUI there are no bundled tokenizers; give a folder "
                             "with llama/ and clip/ (e.g. from `usp-video make-tiny-models`)")
        return ({"group": group, "llama": services.model_path("text_encoders", llama_name),
                 "clip": services.model_path("text_encoders", clip_name), "tokenizers": str(folder)},)


class UspHunyuanTextEncode:
    DESCRIPTION = ("Encodes a prompt for HunyuanVideo; the CONDITIONING has the format of native "
                   "CLIPTextEncode with DualCLIPLoader (hunyuan_video): tokens plus pooled_output.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("USP_HUNYUAN_TEXT_ENCODER", {"tooltip": "From USP Load HunyuanVideo Text Encoders."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": TIP_TEXT}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text):
        files = {name: text_encoder[name] for name in ("llama", "clip", "tokenizers")}
        cond = api.encode(text_encoder["group"], "hunyuan-video", files, text)
        # the family's conditioning speaks ComfyUI's words: its tensors beside the tokens are the dict
        return ([[cond["tokens"], {key: value for key, value in cond.items() if key != "tokens"}]],)


# The conditioning keys the HunyuanVideo sampler applies (CLIP-L's pooled text, FluxGuidance's guidance).
APPLIED_KEYS = ("pooled_output", "guidance")


def _pooled(extra: dict, name: str):
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{name}: this CONDITIONING has no pooled_output; HunyuanVideo needs CLIP-L's pooled "
                         "output (use USP HunyuanVideo Text Encode, or native DualCLIPLoader type hunyuan_video)")
    return pooled


class UspHunyuanSampler:
    DESCRIPTION = ("Denoises a video latent with HunyuanVideo on all ranks of the USP group (sequence "
                   "parallel, text tokens handled exactly). The same seed gives the same video on 1 or N GPUs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("USP_HUNYUAN_MODEL", {"tooltip": "From USP Load HunyuanVideo Model."}),
            "positive": ("CONDITIONING", {"tooltip": TIP_POSITIVE}),
            "negative": ("CONDITIONING", {"tooltip": "Used only when cfg != 1."}),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent (EmptyHunyuanLatentVideo) or a latent "
                                                   "to re-noise with denoise < 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": api.MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed; means the same as in a native KSampler."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": TIP_STEPS}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Real classifier-free guidance; HunyuanVideo uses 1.0 (one pass) "
                                         "and embedded guidance instead."}),
            "guidance": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Embedded (distilled) guidance. A FluxGuidance node on the "
                                              "positive conditioning overrides it, as in native workflows."}),
            "shift": ("FLOAT", {"default": 7.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift; HunyuanVideo's default is 7."}),
            "sampler_name": (sorted(SAMPLERS), {"tooltip": "euler: HunyuanVideo's reference solver."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": TIP_DENOISE}),
        }, "optional": {"step_cache": ("USP_STEP_CACHE", {"tooltip": TIP_STEP_CACHE})},
            "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, guidance, shift, sampler_name,
               denoise, node_id=None, step_cache=None):
        pos, pos_extra = conditioning_parts(positive, "positive", APPLIED_KEYS)
        neg, neg_extra = conditioning_parts(negative, "negative", APPLIED_KEYS)
        if pos_extra.get("guidance") is not None:
            guidance = float(pos_extra["guidance"])
        if neg_extra.get("guidance") is not None and float(neg_extra["guidance"]) != guidance:
            raise ValueError(f"negative: its FluxGuidance ({float(neg_extra['guidance'])}) differs from the positive's "
                             f"({guidance}); HunyuanVideo's guidance is one per step: set it on the positive only")
        use_negative = cfg != 1.0
        return run_sampler(model, latent_image, node_id, cache=step_cache or {},
                           seed=seed, steps=steps, cfg=cfg, shift=shift,
                           sampler=sampler_name, denoise=denoise, options={"guidance": guidance},
                           positive={"tokens": pos, "pooled_output": _pooled(pos_extra, "positive")},
                           negative={"tokens": neg, "pooled_output": _pooled(neg_extra, "negative")} if use_negative else None)


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspHunyuanModelLoader": (UspHunyuanModelLoader, "USP Load HunyuanVideo Model"),
    "UspHunyuanTextEncoderLoader": (UspHunyuanTextEncoderLoader, "USP Load Text Encoders (HunyuanVideo)"),
    "UspHunyuanTextEncode": (UspHunyuanTextEncode, "USP Text Encode (HunyuanVideo)"),
    "UspHunyuanSampler": (UspHunyuanSampler, "USP Sampler (HunyuanVideo)"),
    "UspNativeHunyuanModel": (UspNativeHunyuanModel, "USP Model from native MODEL (HunyuanVideo)"),
}

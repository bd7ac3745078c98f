"""The Wan 2.2 A14B nodes: a loader with a slot per expert and the one-node sampler that switches
expert at the boundary. Text encoding, the VAE and USP Sampler Advanced (for the two-sampler layout)
are the Wan nodes'."""

from __future__ import annotations

from ..distributed import api
from ..distributed.models import FAMILIES
from ..distributed.sampling.samplers import SAMPLERS
from . import services
from .common import TIP_DENOISE, TIP_GROUP, TIP_NEGATIVE, TIP_POSITIVE, TIP_STEPS
from .model_socket import expert_socket, load_model
from .native_nodes import HIDDEN, MEMORY_NOTE, TIP_MODEL, TIP_SHIFT_RULE, replay
from .sampler_run import run_sampler
from .wan_nodes import wan_conditioning
from .cache_node import TIP_STEP_CACHE
from .group_node import CATEGORY

FAMILY = FAMILIES["wan2.2-a14b"]
EXPERTS_AS = "wan2.1"  # the family ComfyUI loads each expert as (a WAN21_T2V MODEL): the native adapter checks it
DEFAULTS = FAMILY.defaults


class UspWan22ModelLoader:
    DESCRIPTION = ("Loads Wan 2.2 A14B's two experts on every rank of the USP group; both stay loaded, so "
                   "switching between them costs no reload.")

    @classmethod
    def INPUT_TYPES(cls):
        models = services.list_models("diffusion_models")
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": "From the USP Group node."}),
            "high_noise_model": (models, {"tooltip": "The high-noise expert (early steps), e.g. "
                                                     "wan2.2_t2v_high_noise_14B_fp16.safetensors."}),
            "low_noise_model": (models, {"tooltip": "The low-noise expert (late steps), e.g. "
                                                    "wan2.2_t2v_low_noise_14B_fp16.safetensors."}),
        }}

    RETURN_TYPES = ("USP_WAN22_MODEL", "USP_WAN_MODEL", "USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "high_noise", "low_noise", "info")
    OUTPUT_TOOLTIPS = ("Both experts, for USP Sampler (Wan 2.2).",
                       "The high-noise expert alone, for a USP Sampler Advanced running the first steps.",
                       "The low-noise expert alone, for a USP Sampler Advanced running the last steps.",
                       "What was loaded, and how it is split across the ranks.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, high_noise_model, low_noise_model):
        model, text = load_model(group, [high_noise_model, low_noise_model], FAMILY.name)
        return model, expert_socket(model, 0), expert_socket(model, 1), text


class UspWan22Sampler:
    DESCRIPTION = ("Denoises a video latent with Wan 2.2 A14B on all ranks of the USP group: the high-noise "
                   "expert for the steps whose sigma is at or above the boundary, the low-noise one after.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("USP_WAN22_MODEL", {"tooltip": "From USP Load Wan 2.2 Models."}),
            "positive": ("CONDITIONING", {"tooltip": TIP_POSITIVE}),
            "negative": ("CONDITIONING", {"tooltip": TIP_NEGATIVE}),
            "latent_image": ("LATENT", {"tooltip": "An empty video latent (e.g. EmptyHunyuanLatentVideo) "
                                                   "or a latent to re-noise with denoise < 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": api.MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed; means the same as in a native KSampler."}),
            "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000, "tooltip": TIP_STEPS}),
            "cfg_high_noise": ("FLOAT", {"default": DEFAULTS.cfg[0], "min": 0.0, "max": 100.0, "step": 0.1,
                                         "round": 0.01, "tooltip": "Guidance on the high-noise expert's steps."}),
            "cfg_low_noise": ("FLOAT", {"default": DEFAULTS.cfg[1], "min": 0.0, "max": 100.0, "step": 0.1,
                                        "round": 0.01, "tooltip": "Guidance on the low-noise expert's steps."}),
            "shift": ("FLOAT", {"default": DEFAULTS.shift, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift (ModelSamplingSD3); 12 in Wan 2.2's T2V config."}),
            "boundary": ("FLOAT", {"default": DEFAULTS.boundaries[0], "min": 0.001, "max": 0.999, "step": 0.001,
                                   "tooltip": "The sigma where the low-noise expert takes over (0.875 for T2V)."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "unipc: Wan's reference solver (bh2); "
                                                         "euler: same as ComfyUI's euler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": TIP_DENOISE}),
        }, "optional": {"step_cache": ("USP_STEP_CACHE", {"tooltip": TIP_STEP_CACHE})},
            "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg_high_noise, cfg_low_noise, shift,
               boundary, sampler_name, denoise, node_id=None, step_cache=None):
        if len(model.get("experts", [])) != 2:
            raise ValueError("model: USP Sampler (Wan 2.2) needs both experts; connect the 'model' output of "
                             "USP Load Wan 2.2 Models")
        return run_sampler(model, latent_image, node_id, cache=step_cache or {},
                           seed=seed, steps=steps, cfg=[cfg_high_noise, cfg_low_noise],
                           shift=shift, sampler=sampler_name, denoise=denoise, boundaries=[boundary],
                           positive=wan_conditioning(positive, "positive"),
                           negative=wan_conditioning(negative, "negative"))


class UspNativeWan22Model:
    DESCRIPTION = ("Runs Wan 2.2 A14B's two native MODEL chains (a UNETLoader per expert, each with its own LoRAs and "
                   "ModelSamplingSD3) on the USP group, both experts loaded as by USP Load Wan 2.2 A14B Models. "
                   + MEMORY_NOTE + " " + TIP_SHIFT_RULE)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
                             "high_noise_model": ("MODEL", {"tooltip": "The high-noise expert's chain. " + TIP_MODEL}),
                             "low_noise_model": ("MODEL", {"tooltip": "The low-noise expert's chain. " + TIP_MODEL})},
                "hidden": dict(HIDDEN)}

    RETURN_TYPES = ("USP_WAN22_MODEL", "USP_WAN_MODEL", "USP_WAN_MODEL", "STRING")
    RETURN_NAMES = ("model", "high_noise", "low_noise", "info")
    OUTPUT_TOOLTIPS = ("Both experts, for USP Sampler (Wan 2.2 A14B). " + TIP_SHIFT_RULE,
                       "The high-noise expert alone, for a USP Sampler Advanced running the first steps.",
                       "The low-noise expert alone, for a USP Sampler Advanced running the last steps.",
                       "What was read from the graph and loaded.")
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    def convert(self, group, high_noise_model, low_noise_model, prompt=None, dynprompt=None, node_id=None):
        model, info = replay(group, [("high_noise_model", high_noise_model), ("low_noise_model", low_noise_model)],
                             (EXPERTS_AS,), prompt, dynprompt, node_id, family=FAMILY.name)
        return model, expert_socket(model, 0), expert_socket(model, 1), info


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspWan22ModelLoader": (UspWan22ModelLoader, "USP Load Wan 2.2 A14B Models (high + low noise)"),
    "UspWan22Sampler": (UspWan22Sampler, "USP Sampler (Wan 2.2 A14B)"),
    "UspNativeWan22Model": (UspNativeWan22Model, "USP Models from native MODELs (Wan 2.2 A14B)"),
}

"""The generic samplers: USP Sampler (KSampler's inputs) and USP Sampler Advanced (KSamplerAdvanced's), for every
model family. `model` is a USP loader's socket, or a native MODEL (UNETLoader -> LoRAs -> ModelSamplingSD3),
which the group replays from the graph: turning a native workflow into a USP one is swapping its KSampler for a
USP Sampler and adding a USP Group.

Family facts (default shift, embedded guidance, experts and their boundary) come from the family package; an
input the model's family does not use (cfg_low_noise on a one-model family, say) is refused, never ignored."""

from __future__ import annotations

import math

from ..distributed import api, models
from ..distributed.sampling.samplers import SAMPLERS
from . import socket_types
from .cache_node import TIP_STEP_CACHE
from .common import TIP_DENOISE, TIP_GROUP, TIP_NEGATIVE, TIP_POSITIVE, TIP_STEPS
from .conditioning import family_conditioning
from .loaders import ALL_EXPERTS, EXPERT_NAMES, expert_paths
from .model_socket import ModelSocket, expert_socket
from .native_nodes import MEMORY_NOTE, TIP_MODEL, native_socket
from .sampler_run import run_sampler
from .v3 import CATEGORY, HIDDEN_ALL, advanced, io, schema

TIP_SHIFT = ("Flow shift (ModelSamplingSD3). 0: the model's - a native MODEL's own shift, else the family's default "
             "(Wan 2.1 and Wan 2.2 TI2V-5B 5, Wan 2.2 A14B 12, HunyuanVideo 7). A native MODEL refuses another value.")
TIP_CFG_LOW = ("Two-expert models (Wan 2.2 A14B): the guidance of the low-noise expert's steps; 0: the same as cfg. "
               "Leave 0 for other models.")
TIP_BOUNDARY = ("Two-expert models (Wan 2.2 A14B): the sigma where the low-noise expert takes over; 0: the family's "
                "(0.875). Leave 0 for other models.")
TIP_SAMPLER_GROUP = ("The USP Group, when `model` is a native MODEL (it is replayed on the group). A USP model brings "
                     "its own group: leave this unconnected, or connect the same group.")


def usp_model(model, group, prompt, dynprompt, node_id) -> ModelSocket:
    """The model socket to sample with: a USP loader's as it is, or a native MODEL replayed on `group`."""
    if isinstance(model, dict) and "experts" in model:
        if group is not None and group != model["group"]:
            raise ValueError("group: this USP model was loaded on another USP group than the one connected here; "
                             "leave group unconnected (a USP model brings its group) or connect the same one")
        return model
    if group is None:
        raise ValueError("group: model is a native MODEL, which runs on the USP group: connect a USP Group node's "
                         "group output to this sampler's group input")
    return native_socket(group, model, prompt, dynprompt, node_id)


def expert_settings(model: ModelSocket, cfg: float, cfg_low_noise: float, boundary: float) -> dict:
    """cfg (one per expert for a model of several), boundaries and the family: the request's fields that depend on
    the model's experts. cfg_low_noise and boundary are 0 for "as the family says"; set on a model of one
    expert, they are refused."""
    family = models.get(model["info"]["family"])
    experts = len(model["experts"])
    for name, value in (("cfg_low_noise", cfg_low_noise), ("boundary", boundary)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if value and experts < 2:
            raise ValueError(f"{name}: {model['info']['model']} runs one model, not experts: set {name} to 0 "
                             "(it is for two-expert models such as Wan 2.2 A14B)")
    if experts < 2:
        return {"cfg": cfg, "boundaries": []}
    boundaries = [boundary] if boundary else list(family.defaults.boundaries)
    return {"cfg": [cfg] + [cfg_low_noise or cfg] * (experts - 1), "boundaries": boundaries}


def model_shift(model: ModelSocket, shift: float) -> float:
    """The sampler's shift: the widget's, or for 0 the native MODEL's (else the family's default)."""
    if shift == 0:
        native = model.get("native_shift")
        return native if native is not None else models.get(model["info"]["family"]).defaults.shift
    return shift


def sample(model: ModelSocket, positive, negative, latent_image: dict, node_id, *, cfg, options=None,
           step_cache=None, **request) -> tuple[dict]:
    """Run a sampler for any family: its conditionings read as the family takes them, its options (embedded
    guidance) from the positive's conditioning over `options`, the negative dropped where no expert's cfg uses it."""
    family = models.get(model["info"]["family"])
    pos, pos_options = family_conditioning(positive, "positive", family)
    neg, neg_options = family_conditioning(negative, "negative", family)
    options = {**(options or {}), **pos_options}
    for key, value in neg_options.items():
        used = options.get(key, family.options[key].default)
        if value != used:
            raise ValueError(f"negative: its {key} ({value}) differs from the positive's ({used}); {family.label}'s "
                             f"{key} is one per step: set it on the positive only")
    uses_negative = any(scale != 1.0 for scale in (cfg if isinstance(cfg, list) else [cfg]))
    return run_sampler(model, latent_image, node_id, cache=step_cache or {}, cfg=cfg, options=options,
                       positive=pos, negative=neg if uses_negative else None, **request)


def _model_input():
    return io.MultiType.Input("model", types=[socket_types.Model, io.Model], tooltip=(
        "A USP model (USP Load Diffusion Model, USP LoRA), or a native MODEL with a USP Group connected below. "
        + TIP_MODEL + " " + MEMORY_NOTE))


def _conditioning_inputs() -> list:
    return [io.Conditioning.Input("positive", tooltip=TIP_POSITIVE),
            io.Conditioning.Input("negative", tooltip=TIP_NEGATIVE),
            io.Latent.Input("latent_image", tooltip=("An empty video latent (EmptyHunyuanLatentVideo, a family's "
                                                     "image-to-video node) or a latent to re-noise."))]


def _optional_inputs() -> list:
    return [socket_types.Group.Input("group", optional=True, tooltip=TIP_SAMPLER_GROUP),
            socket_types.StepCache.Input("step_cache", optional=True, tooltip=TIP_STEP_CACHE),
            advanced(io.Float.Input, "cfg_low_noise", optional=True, default=0.0, min=0.0, max=100.0, step=0.1,
                     round=0.01, tooltip=TIP_CFG_LOW),
            advanced(io.Float.Input, "boundary", optional=True, default=0.0, min=0.0, max=0.999, step=0.001,
                     tooltip=TIP_BOUNDARY)]


def _shift_input():
    return io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01, tooltip=TIP_SHIFT)


def _cfg_input(default: float):
    return io.Float.Input("cfg", default=default, min=0.0, max=100.0, step=0.1, round=0.01,
                          tooltip="Classifier-free guidance; 1.0 skips the negative pass (distilled models, "
                                  "HunyuanVideo, whose embedded guidance comes from a FluxGuidance node, default 6).")


class UspSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspSampler", display_name="USP Sampler", category=CATEGORY,
            description=("KSampler on the USP group: denoises a video latent with any supported model on all ranks "
                         "(sequence parallel; the same seed gives the same video on 1 or N GPUs). Takes a USP model "
                         "or a native MODEL; a two-expert model switches expert at its boundary."),
            search_aliases=["KSampler", "sampler", "multi-gpu sampler", "sequence parallel", "xdit", "usp"],
            inputs=[_model_input(),
                    io.Int.Input("seed", default=0, min=0, max=api.MAX_SEED, control_after_generate=True,
                                 tooltip="Noise seed; means the same as in a native KSampler."),
                    io.Int.Input("steps", default=30, min=1, max=10000, tooltip=TIP_STEPS),
                    _cfg_input(5.0),
                    io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler", tooltip=(
                        "euler: ComfyUI's euler (HunyuanVideo's reference). unipc: Wan's reference solver (bh2).")),
                    *_conditioning_inputs(),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=TIP_DENOISE),
                    _shift_input(), *_optional_inputs()],
            outputs=[io.Latent.Output("LATENT")],
            hidden=HIDDEN_ALL,
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, positive, negative, latent_image, denoise, shift,
                group=None, step_cache=None, cfg_low_noise=0.0, boundary=0.0):
        hidden = cls.hidden
        model = usp_model(model, group, hidden.prompt, hidden.dynprompt, hidden.unique_id)
        return io.NodeOutput(*sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache,
                                     seed=seed, steps=steps, shift=model_shift(model, shift), sampler=sampler_name,
                                     denoise=denoise, **expert_settings(model, cfg, cfg_low_noise, boundary)))


def _enable(name: str, value: str) -> bool:
    if value not in ("enable", "disable"):
        raise ValueError(f"{name} must be 'enable' or 'disable', got {value!r}")
    return value == "enable"


def advanced_request(add_noise, start_at_step, end_at_step, return_with_leftover_noise) -> dict:
    """KSamplerAdvanced's step range and noise switches as request fields."""
    return {"add_noise": _enable("add_noise", add_noise), "start_step": start_at_step, "end_step": end_at_step,
            "leftover_noise": _enable("return_with_leftover_noise", return_with_leftover_noise)}


class UspSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspSamplerAdvanced", display_name="USP Sampler Advanced", category=CATEGORY,
            description=("KSamplerAdvanced on the USP group: runs steps start_at_step..end_at_step of the schedule and "
                         "can return the latent with its leftover noise, in ComfyUI's convention, so that it mixes "
                         "with native KSamplerAdvanced nodes either way (Wan 2.2's high-noise / low-noise two-sampler "
                         "layout: pick the expert). With euler the handoff is exact."),
            search_aliases=["KSamplerAdvanced", "advanced sampler", "two sampler", "high noise low noise"],
            inputs=[_model_input(),
                    io.Combo.Input("add_noise", options=["enable", "disable"], tooltip=(
                        "disable when the latent comes with leftover noise from the sampler before this one.")),
                    io.Int.Input("noise_seed", default=0, min=0, max=api.MAX_SEED, control_after_generate=True,
                                 tooltip="Noise seed (used when add_noise is enable); as in KSamplerAdvanced."),
                    io.Int.Input("steps", default=20, min=1, max=10000,
                                 tooltip="Steps of the whole schedule (all samplers of the layout)."),
                    _cfg_input(3.5),
                    io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler", tooltip=(
                        "euler: split runs equal one run. unipc: its history restarts at a split, so they differ.")),
                    *_conditioning_inputs(),
                    io.Int.Input("start_at_step", default=0, min=0, max=10000,
                                 tooltip="The first step of the schedule this sampler runs."),
                    io.Int.Input("end_at_step", default=10000, min=0, max=10000,
                                 tooltip="The step it stops before (10000: to the end)."),
                    io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], tooltip=(
                        "enable to hand the latent to another sampler mid-schedule.")),
                    _shift_input(),
                    io.Combo.Input("expert", options=[ALL_EXPERTS, *EXPERT_NAMES], default=ALL_EXPERTS, tooltip=(
                        "Two-expert models: all switches at the boundary; high_noise / low_noise runs that expert "
                        "only (the other stays loaded), as the two-sampler layout does. all for other models.")),
                    *_optional_inputs()],
            outputs=[io.Latent.Output("LATENT")],
            hidden=HIDDEN_ALL,
        )

    @classmethod
    def execute(cls, model, add_noise, noise_seed, steps, cfg, sampler_name, positive, negative, latent_image,
                start_at_step, end_at_step, return_with_leftover_noise, shift, expert=ALL_EXPERTS, group=None,
                step_cache=None, cfg_low_noise=0.0, boundary=0.0):
        hidden = cls.hidden
        model = usp_model(model, group, hidden.prompt, hidden.dynprompt, hidden.unique_id)
        if expert != ALL_EXPERTS:
            (path,) = expert_paths(model, expert)
            model = expert_socket(model, model["experts"].index(path))
        request = advanced_request(add_noise, start_at_step, end_at_step, return_with_leftover_noise)
        return io.NodeOutput(*sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache,
                                     seed=noise_seed, steps=steps, shift=model_shift(model, shift),
                                     sampler=sampler_name, **expert_settings(model, cfg, cfg_low_noise, boundary),
                                     **request))


NODES = [UspSampler, UspSamplerAdvanced]

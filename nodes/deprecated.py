"""The node ids of earlier releases (per-family loaders, samplers, LoRA nodes and native-MODEL adapters), kept so
that saved workflows load and run unchanged: each keeps its inputs, widget order, defaults and socket types, is
marked deprecated (the page hides it from search) and runs through the generic nodes' code (loaders.py,
samplers.py). New graphs use the generic nodes; nothing here may grow."""

from __future__ import annotations

from typing import Callable

from ..distributed import api, models
from ..distributed.sampling.samplers import SAMPLERS
from . import services, socket_types
from .cache_node import TIP_STEP_CACHE
from .common import TIP_DENOISE, TIP_GROUP, TIP_NEGATIVE, TIP_POSITIVE, TIP_STEPS, TIP_TEXT
from .i2v_nodes import wan22_latent
from .loaders import encode_text, expert_paths, load_diffusion_model, text_encoder_socket, with_lora, TIP_LORA, \
    TIP_STRENGTH
from .model_socket import expert_socket, load_model
from .native_nodes import TIP_MODEL, replay
from .samplers import advanced_request, expert_settings, sample
from .v3 import CATEGORY, HIDDEN_ALL, io, schema

WAN21, WAN22, TI2V, HUNYUAN = (models.get(name) for name in ("wan2.1", "wan2.2-a14b", "wan2.2-ti2v-5b", "hunyuan-video"))
REPLACED_BY = "Deprecated: use {0} (same result). Kept so that saved workflows run."


def _legacy(node_id: str, display_name: str, replaced_by: str, inputs: Callable[[], list], outputs: Callable[[], list],
            run: Callable, hidden: list | None = None, node_id_input: bool = False) -> type:
    """A deprecated V3 node: this schema, and run(hidden, **inputs) -> the output tuple."""

    def define_schema(cls):
        return schema(node_id=node_id, display_name=display_name, category=CATEGORY, is_deprecated=True,
                      description=REPLACED_BY.format(replaced_by), inputs=inputs(), outputs=outputs(),
                      hidden=hidden or ([io.Hidden.unique_id] if node_id_input else []))

    def execute(cls, **kwargs):
        return io.NodeOutput(*run(cls.hidden, **kwargs))

    return type(node_id, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                           "execute": classmethod(execute), "__doc__": f"Deprecated {display_name}."})


def _group():
    return socket_types.Group.Input("group", tooltip=TIP_GROUP)


def _files(name: str, folder: str, tooltip: str):
    return io.Combo.Input(name, options=services.list_models(folder), tooltip=tooltip)


def _model_out(socket):
    return [socket.Output("model"), io.String.Output("info")]


def _expert_outs(socket):
    return [socket.Output("model"), socket_types.WanModel.Output("high_noise"),
            socket_types.WanModel.Output("low_noise"), io.String.Output("info")]


def _loader(node_id, display_name, socket, family, tooltip):
    return _legacy(node_id, display_name, "USP Load Diffusion Model",
                   lambda: [_group(), _files("model_name", "diffusion_models", tooltip)], lambda: _model_out(socket),
                   lambda hidden, group, model_name: load_model(group, model_name, family.name))


def _seed(name="seed"):
    return io.Int.Input(name, default=0, min=0, max=api.MAX_SEED, control_after_generate=True,
                        tooltip="Noise seed; means the same as in a native KSampler.")


def _float(name, default, tooltip, low=0.0, high=100.0, step=0.1, **extra):
    return io.Float.Input(name, default=default, min=low, max=high, step=step, tooltip=tooltip, **extra)


def _cond_latent():
    return [io.Conditioning.Input("positive", tooltip=TIP_POSITIVE), io.Conditioning.Input("negative", tooltip=TIP_NEGATIVE),
            io.Latent.Input("latent_image", tooltip="An empty video latent, or a latent to re-noise with denoise < 1.")]


def _cache():
    return socket_types.StepCache.Input("step_cache", optional=True, tooltip=TIP_STEP_CACHE)


def _one_model_sampler(node_id, display_name, socket, steps, cfg, shift):
    """The earlier Wan 2.1 / TI2V-5B samplers: model, conditionings, seed, steps, cfg, shift, sampler, denoise."""
    def inputs():
        return [socket.Input("model", tooltip="A USP model socket."), *_cond_latent(), _seed(),
                io.Int.Input("steps", default=steps, min=1, max=10000, tooltip=TIP_STEPS),
                _float("cfg", cfg, "Classifier-free guidance; 1.0 skips the negative pass.", round=0.01),
                _float("shift", shift, "Flow shift (ModelSamplingSD3).", low=0.01, step=0.01),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), tooltip="The solver."),
                _float("denoise", 1.0, TIP_DENOISE, low=0.01, high=1.0, step=0.01), _cache()]

    def run(hidden, model, positive, negative, latent_image, seed, steps, cfg, shift, sampler_name, denoise,
            step_cache=None):
        return sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache, seed=seed,
                      steps=steps, shift=shift, sampler=sampler_name, denoise=denoise,
                      **expert_settings(model, cfg, 0.0, 0.0))
    return _legacy(node_id, display_name, "USP Sampler", inputs, lambda: [io.Latent.Output("LATENT")], run,
                   node_id_input=True)


def _wan_advanced_inputs():
    return [socket_types.WanModel.Input("model", tooltip="A Wan model socket, or one expert of a Wan 2.2 loader."),
            io.Combo.Input("add_noise", options=["enable", "disable"], tooltip="disable after a leftover-noise handoff."),
            _seed("noise_seed"), io.Int.Input("steps", default=20, min=1, max=10000, tooltip=TIP_STEPS),
            _float("cfg", 3.5, "Classifier-free guidance.", round=0.01),
            _float("shift", 8.0, "Flow shift (ModelSamplingSD3).", low=0.01, step=0.01),
            io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler", tooltip="The solver."),
            *_cond_latent(),
            io.Int.Input("start_at_step", default=0, min=0, max=10000, tooltip="The first step this sampler runs."),
            io.Int.Input("end_at_step", default=10000, min=0, max=10000, tooltip="The step it stops before."),
            io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], tooltip="enable to hand on."),
            _cache()]


def _wan_advanced(hidden, model, add_noise, noise_seed, steps, cfg, shift, sampler_name, positive, negative,
                  latent_image, start_at_step, end_at_step, return_with_leftover_noise, step_cache=None):
    request = advanced_request(add_noise, start_at_step, end_at_step, return_with_leftover_noise)
    return sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache, seed=noise_seed,
                  steps=steps, shift=shift, sampler=sampler_name, **expert_settings(model, cfg, 0.0, 0.0), **request)


def _hunyuan_sampler_inputs():
    return [socket_types.HunyuanModel.Input("model", tooltip="From USP Load HunyuanVideo Model."), *_cond_latent(),
            _seed(), io.Int.Input("steps", default=50, min=1, max=10000, tooltip=TIP_STEPS),
            _float("cfg", 1.0, "Real classifier-free guidance; HunyuanVideo uses 1.0.", round=0.01),
            _float("guidance", 6.0, "Embedded guidance; a FluxGuidance on the positive overrides it."),
            _float("shift", 7.0, "Flow shift.", low=0.01, step=0.01),
            io.Combo.Input("sampler_name", options=sorted(SAMPLERS), tooltip="The solver."),
            _float("denoise", 1.0, TIP_DENOISE, low=0.01, high=1.0, step=0.01), _cache()]


def _hunyuan_sampler(hidden, model, positive, negative, latent_image, seed, steps, cfg, guidance, shift, sampler_name,
                     denoise, step_cache=None):
    return sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache,
                  options={"guidance": guidance}, seed=seed, steps=steps, shift=shift, sampler=sampler_name,
                  denoise=denoise, **expert_settings(model, cfg, 0.0, 0.0))


def _wan22_sampler_inputs():
    defaults = WAN22.defaults
    return [socket_types.Wan22Model.Input("model", tooltip="From USP Load Wan 2.2 Models."), *_cond_latent(), _seed(),
            io.Int.Input("steps", default=defaults.steps, min=1, max=10000, tooltip=TIP_STEPS),
            _float("cfg_high_noise", defaults.cfg[0], "Guidance on the high-noise expert's steps.", round=0.01),
            _float("cfg_low_noise", defaults.cfg[1], "Guidance on the low-noise expert's steps.", round=0.01),
            _float("shift", defaults.shift, "Flow shift (ModelSamplingSD3).", low=0.01, step=0.01),
            _float("boundary", defaults.boundaries[0], "The sigma where the low-noise expert takes over.", low=0.001,
                   high=0.999, step=0.001),
            io.Combo.Input("sampler_name", options=list(SAMPLERS), tooltip="The solver."),
            _float("denoise", 1.0, TIP_DENOISE, low=0.01, high=1.0, step=0.01), _cache()]


def _wan22_sampler(hidden, model, positive, negative, latent_image, seed, steps, cfg_high_noise, cfg_low_noise, shift,
                   boundary, sampler_name, denoise, step_cache=None):
    if len(model.get("experts", [])) != 2:
        raise ValueError("model: USP Sampler (Wan 2.2) needs both experts; connect the 'model' output of "
                         "USP Load Wan 2.2 Models")
    return sample(model, positive, negative, latent_image, hidden.unique_id, step_cache=step_cache, seed=seed,
                  steps=steps, shift=shift, sampler=sampler_name, denoise=denoise,
                  **expert_settings(model, cfg_high_noise, cfg_low_noise, boundary))


def _native(node_id, display_name, socket, families):
    return _legacy(node_id, display_name, "USP Sampler with the native MODEL connected",
                   lambda: [_group(), io.Model.Input("model", tooltip=TIP_MODEL)], lambda: _model_out(socket),
                   lambda hidden, group, model: replay(group, [("model", model)], families, hidden.prompt,
                                                       hidden.dynprompt, hidden.unique_id),
                   hidden=HIDDEN_ALL)


def _wan22_native(hidden, group, high_noise_model, low_noise_model):
    model, info = replay(group, [("high_noise_model", high_noise_model), ("low_noise_model", low_noise_model)],
                         (WAN21.name,), hidden.prompt, hidden.dynprompt, hidden.unique_id, family=WAN22.name)
    return model, expert_socket(model, 0), expert_socket(model, 1), info


def _wan22_loader(hidden, group, high_noise_model, low_noise_model):
    model, text = load_diffusion_model(group, high_noise_model, low_noise_model)
    return model, expert_socket(model, 0), expert_socket(model, 1), text


def _lora(node_id, display_name, socket, expert_choice=False):
    def inputs():
        extra = [io.Combo.Input("expert", options=["both", "high_noise", "low_noise"], tooltip="Which expert.")]
        return [socket.Input("model", tooltip="A USP model socket."),
                io.Combo.Input("lora_name", options=services.list_models("loras"), tooltip=TIP_LORA),
                _float("strength", 1.0, TIP_STRENGTH, low=-10.0, high=10.0, step=0.01)] + (extra if expert_choice else [])

    def run(hidden, model, lora_name, strength, expert="both"):
        paths = expert_paths(model, "all" if expert == "both" else expert)
        return (with_lora(model, paths, services.model_path("loras", lora_name), strength),)
    return _legacy(node_id, display_name, "USP LoRA", inputs, lambda: [socket.Output("model")], run)


def _empty_wan22_latent(hidden, width, height, length, batch_size=1):
    problems = [f"{name} {value} must be a positive multiple of {TI2V.pixel_multiple}"
                for name, value in (("width", width), ("height", height))
                if value < TI2V.pixel_multiple or value % TI2V.pixel_multiple]
    if length < 1 or (length - 1) % 4:
        problems.append(f"length {length} must be 4k + 1 frames (1, 5, ..., 121)")
    if problems:
        raise ValueError("; ".join(problems))
    return (wan22_latent(TI2V, None, width, height, length, batch_size),)


TE_NAMES = lambda: services.list_models("text_encoders")  # noqa: E731

NODES = [
    _loader("UspWanModelLoader", "USP Load Wan 2.1 Model", socket_types.WanModel, WAN21, "A Wan 2.1 T2V file."),
    _loader("UspHunyuanModelLoader", "USP Load HunyuanVideo Model", socket_types.HunyuanModel, HUNYUAN,
            "A HunyuanVideo file."),
    _loader("UspWan22TI2V5BModelLoader", "USP Load Wan 2.2 TI2V-5B Model", socket_types.WanModel, TI2V,
            "wan2.2_ti2v_5B_fp16.safetensors."),
    _legacy("UspWan22ModelLoader", "USP Load Wan 2.2 A14B Models (high + low noise)", "USP Load Diffusion Model",
            lambda: [_group(), _files("high_noise_model", "diffusion_models", "The high-noise expert."),
                     _files("low_noise_model", "diffusion_models", "The low-noise expert.")],
            lambda: _expert_outs(socket_types.Wan22Model), _wan22_loader),
    _legacy("UspTextEncoderLoader", "USP Load Text Encoder (UMT5)", "USP Load Text Encoder",
            lambda: [_group(), io.Combo.Input("text_encoder_name", options=TE_NAMES(), tooltip="umt5_xxl_fp16.")],
            lambda: [socket_types.TextEncoder.Output("text_encoder")],
            lambda hidden, group, text_encoder_name: (text_encoder_socket(group, [text_encoder_name]),)),
    _legacy("UspHunyuanTextEncoderLoader", "USP Load Text Encoders (HunyuanVideo)", "USP Load Text Encoder",
            lambda: [_group(), io.Combo.Input("llama_name", options=TE_NAMES(), tooltip="llava_llama3."),
                     io.Combo.Input("clip_name", options=TE_NAMES(), tooltip="clip_l."),
                     io.String.Input("tokenizer_folder", default="", tooltip="Empty: ComfyUI's own tokenizers.")],
            lambda: [socket_types.HunyuanTextEncoder.Output("text_encoder")],
            lambda hidden, group, llama_name, clip_name, tokenizer_folder: (
                text_encoder_socket(group, [llama_name, clip_name], tokenizer_folder),)),
    _legacy("UspHunyuanTextEncode", "USP Text Encode (HunyuanVideo)", "USP Text Encode",
            lambda: [socket_types.HunyuanTextEncoder.Input("text_encoder", tooltip="A USP text encoder."),
                     io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=TIP_TEXT)],
            lambda: [io.Conditioning.Output("CONDITIONING")],
            lambda hidden, text_encoder, text: (encode_text(text_encoder, text),)),
    _one_model_sampler("UspWanSampler", "USP Sampler (Wan 2.1)", socket_types.WanModel, 30, 5.0, 5.0),
    _one_model_sampler("UspWan22TI2V5BSampler", "USP Sampler (Wan 2.2 TI2V-5B)", socket_types.WanModel,
                       TI2V.defaults.steps, TI2V.defaults.cfg, TI2V.defaults.shift),
    _legacy("UspWanSamplerAdvanced", "USP Sampler Advanced (Wan)", "USP Sampler Advanced", _wan_advanced_inputs,
            lambda: [io.Latent.Output("LATENT")], _wan_advanced, node_id_input=True),
    _legacy("UspHunyuanSampler", "USP Sampler (HunyuanVideo)", "USP Sampler", _hunyuan_sampler_inputs,
            lambda: [io.Latent.Output("LATENT")], _hunyuan_sampler, node_id_input=True),
    _legacy("UspWan22Sampler", "USP Sampler (Wan 2.2 A14B)", "USP Sampler", _wan22_sampler_inputs,
            lambda: [io.Latent.Output("LATENT")], _wan22_sampler, node_id_input=True),
    _native("UspNativeWanModel", "USP Model from native MODEL (Wan 2.1 / 2.2 5B)", socket_types.WanModel,
            (WAN21.name, TI2V.name)),
    _native("UspNativeHunyuanModel", "USP Model from native MODEL (HunyuanVideo)", socket_types.HunyuanModel,
            (HUNYUAN.name,)),
    _legacy("UspNativeWan22Model", "USP Models from native MODELs (Wan 2.2 A14B)", "two USP Sampler Advanced",
            lambda: [_group(), io.Model.Input("high_noise_model", tooltip=TIP_MODEL),
                     io.Model.Input("low_noise_model", tooltip=TIP_MODEL)],
            lambda: _expert_outs(socket_types.Wan22Model), _wan22_native, hidden=HIDDEN_ALL),
    _legacy("UspEmptyWan22Latent", "USP Empty Wan 2.2 Latent (TI2V-5B)", "USP Wan 2.2 Image To Video Latent",
            lambda: [io.Int.Input("width", default=1280, min=32, max=8192, step=32, tooltip="Pixels."),
                     io.Int.Input("height", default=704, min=32, max=8192, step=32, tooltip="Pixels."),
                     io.Int.Input("length", default=121, min=1, max=8192, step=4, tooltip="Frames: 4k + 1."),
                     io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos made at once.")],
            lambda: [io.Latent.Output("LATENT")], _empty_wan22_latent),
    _lora("UspLora", "USP LoRA (Wan)", socket_types.WanModel),
    _lora("UspHunyuanLora", "USP LoRA (HunyuanVideo)", socket_types.HunyuanModel),
    _lora("UspWan22Lora", "USP LoRA (Wan 2.2 A14B)", socket_types.Wan22Model, expert_choice=True),
]

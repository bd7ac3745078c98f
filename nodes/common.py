"""What the sampler nodes of both models share: reading CONDITIONING and running the sampler."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..distributed import api, models
from ..distributed.client import Interrupted
from ..distributed.registry import get_group
from . import services

log = logging.getLogger("usp_video")

# The key of the model family in the LATENTs our samplers return. Native latents carry no tag: a
# latent from a native node cannot be checked against the VAE it is decoded with.
LATENT_TAG = "usp_family"

# Tooltips that several nodes share.
TIP_STEPS = ('Denoising steps. Each step runs the model once (twice when cfg != 1) on all ranks; the time per step is shown on the USP Group node.')
TIP_DENOISE = ('1.0: start from pure noise (text to video). Below 1 re-noises latent_image that much and runs only the last part of the schedule (video to video).')
TIP_TEXT = ("The prompt. Encoded once per new text; the conditioning equals the native text-encode node's.")
TIP_POSITIVE = ("What the video shows: a USP Text Encode's CONDITIONING (or a native text encode's).")
TIP_NEGATIVE = ('What to steer away from; used only when cfg != 1.')
TIP_GROUP = ('From the USP Group node.')


def quantization_text(layers: dict[str, str]) -> str:
    """The loader's lines on a GGUF model: which layers stay quantized, in which ggml type."""
    from ..distributed.models.gguf_weights import by_layer_kind, summary

    kinds = "; ".join(f"{kind} {types}" for kind, types in by_layer_kind(layers).items())
    return (f"GGUF: {len(layers)} layers stay quantized ({summary(layers)}), dequantized as each runs: {kinds}. "
            "Other tensors were dequantized at load.")


def _kernels(info: dict) -> str:
    """Which attention kernel runs (as resolved on the ranks: "auto" becomes a name) and what is compiled."""
    parts = [f"attention {info['attention']}"] if "attention" in info else []
    if info.get("compiled_blocks"):
        parts.append(f"{info['compiled_blocks']} blocks compiled ({info['compile']})")
    return ", ".join(parts)


def load_model(group, model_name: str | list[str], family: str) -> tuple[dict, str]:
    """A DiT from models/diffusion_models on every rank, or the experts of one model (a list, in the
    family's expert order): (the model socket's value, the info text). The socket holds "path" (the
    first) and "experts" (all)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    paths = [services.model_path("diffusion_models", name) for name in names]
    info = api.load_dit(group, paths if len(paths) > 1 else paths[0], family=family)
    show_group(group)
    text = (f"{' + '.join(names)}: {info['layers']} layers, {info['heads']} heads; "
            f"ulysses={info['ulysses']} x ring={info['ring']}")
    if info.get("cfg_parallel", 1) == 2:
        text += " x cfg-parallel 2 (used when cfg != 1)"
    if "parameter_bytes" in info:
        text += (f"; weights per rank {info['parameter_bytes'] / 2**30:.2f} GiB"
                 f"{' per expert' if len(paths) > 1 else ''} "
                 f"({'sharded across the ranks' if info['sharded'] else 'a full copy on every rank'}"
                 f"{', in host memory (dit_offload)' if info.get('dit_offload') else ''}), "
                 f"free memory {info['free_bytes'] / 2**30:.1f} GiB")
    if info.get("fp8_layers"):
        text += f"; {info['fp8_layers']} layers keep their fp8 weights"
        if info.get("fp8_compute_layers"):
            text += f", {info['fp8_compute_layers']} multiply in fp8 (fp8_compute)"
    kernels = _kernels(info)
    if kernels:
        text += f"; {kernels}"
    if info.get("quantized_layers"):
        text += "\n" + quantization_text(info["quantized_layers"])
    warnings = list(info.get("warnings", []))
    if info.get("fp8_compute") and not info.get("fp8_compute_layers"):
        warnings.append("fp8_compute is on, but this model has no fp8 layers (a bf16/fp16 or GGUF file): nothing "
                        "multiplies in fp8; pick an fp8 file to use it")
    for warning in warnings:
        log.warning("usp-video: %s", warning)
        text += f"\nwarning: {warning}"
    log.info("usp-video: %s", text)
    degrees = f"ulysses {info['ulysses']} x ring {info['ring']}"
    if info.get("cfg_parallel", 1) == 2:
        degrees += " x cfg-parallel 2"
    if kernels:
        degrees += f", {kernels}"
    weights = None
    if "parameter_bytes" in info:
        weights = (f"{info['parameter_bytes'] / 2**30:.2f} GiB{' per expert' if len(paths) > 1 else ''}, "
                   f"{'sharded' if info['sharded'] else 'a full copy on every rank'}"
                   f"{', in host memory (dit_offload)' if info.get('dit_offload') else ''}")
        if len(paths) > 1 and info.get("placement", "keep") != "keep" and not info.get("dit_offload"):
            weights += "; the idle expert waits in host memory"
    services.publish_status(model=" + ".join(names), degrees=degrees, weights=weights,
                            free=info.get("free_bytes_per_rank"))
    return {"group": group, "path": paths[0], "experts": paths, "info": info}, text


def show_group(config) -> None:
    """Show the group that a node has just used on the USP Group node (ComfyUI caches that node's output,
    so a group freed or crashed since was started again by the node that needed it). Called once the
    group answered: inputs refused before any group is asked start nothing."""
    services.note_group(get_group(config), config)


def expert_socket(model: dict, index: int) -> dict:
    """One expert of a loaded model as a model socket of its own, for a sampler that runs only some
    steps (the two-sampler layout); the other experts stay loaded beside it."""
    path = model["experts"][index]
    return {**model, "path": path, "experts": [path], "keep": [p for p in model["experts"] if p != path]}


# What a native conditioning's dict may carry that the USP samplers do not apply, and the node that puts it
# there (for the message). Anything else unknown is refused too, under its own name.
_NOT_APPLIED = {
    "start_percent": "ConditioningSetTimestepRange", "end_percent": "ConditioningSetTimestepRange",
    "area": "ConditioningSetArea", "strength": "ConditioningSetArea / ConditioningSetMask",
    "set_area_to_bounds": "ConditioningSetMask", "mask": "ConditioningSetMask", "mask_strength": "ConditioningSetMask",
    "control": "a ControlNet apply node", "control_apply_to_uncond": "a ControlNet apply node",
    "gligen": "GLIGENTextBoxApply", "hooks": "a hook node (SetClipHooks, CreateHookLora...)",
    "concat_latent_image": "an image-to-video node (WanImageToVideo...)",
    "concat_mask": "an image-to-video node (WanImageToVideo...)",
    "clip_vision_output": "CLIPVisionEncode / an image-to-video node",
    "reference_latents": "ReferenceLatent", "noise_augmentation": "an unCLIP node",
}
# Keys whose value is applied whatever the family (the text's own attention mask) or means nothing here.
_ALWAYS = {"attention_mask"}
# A timestep range covering every step changes nothing: accepted.
_WHOLE_RANGE = {"start_percent": 0.0, "end_percent": 1.0}


def conditioning_parts(conditioning, name: str, applies: tuple[str, ...] = ()):
    """CONDITIONING ([[tensor, dict]]) -> (tensor, dict); only plain text conditioning is supported.

    A native conditioning whose dict carries an attention_mask (ComfyUI drops it when nothing is
    masked) keeps only its unmasked tokens, which is what the model attends to. applies: the other keys
    of the dict the calling sampler uses (HunyuanVideo's pooled_output and guidance). Any other key set
    (a timestep range, an area or mask, a ControlNet, image-to-video inputs...) is refused by name: the
    sampler would ignore it, and the video would silently not be what the graph asks for."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name}: expected CONDITIONING from a text-encode node")
    if len(conditioning) > 1:
        raise ValueError(f"{name}: combined/area conditioning ({len(conditioning)} entries) is not supported; "
                         "connect a single text encode")
    tensor, extra = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    extra = extra if isinstance(extra, dict) else {}
    ignored = [key for key, value in extra.items()
               if value is not None and key not in _ALWAYS and key not in applies
               and not (key in _WHOLE_RANGE and value == _WHOLE_RANGE[key])]
    if ignored:
        named = ", ".join(f"{key} (from {_NOT_APPLIED[key]})" if key in _NOT_APPLIED else key for key in ignored)
        raise ValueError(f"{name}: this conditioning carries {named}, which the USP sampler does not apply; "
                         "remove that node between the text encode and the sampler (the USP sampler takes plain "
                         "text conditioning" + (f", with {', '.join(applies)}" if applies else "") + ")")
    mask = extra.get("attention_mask")
    if mask is not None and tensor.shape[0] == 1:
        tensor = tensor[:, mask[0].bool()]
    return tensor, extra


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


def run_sampler(model: dict, latent_image: dict, node_id, *, positive: dict, negative: dict | None,
                **request) -> tuple[dict]:
    """Sample on the group with the page's progress bar, previews and Cancel; returns (LATENT,).

    model: a loader's socket value ({"group", "path", "info"}, and "keep": the other experts of its model,
    kept loaded); positive/negative: conditionings as the family's tensors ({"tokens": ..., ...});
    request: the other fields of requests.SampleRequest (seed, steps, cfg, shift, sampler, denoise,
    options, experts and boundaries, the KSamplerAdvanced step range)."""
    if latent_image.get("noise_mask") is not None:  # checked against the model with the request
        request["noise_mask"] = latent_image["noise_mask"]
    native_shift = model.get("native_shift")  # a native MODEL's shift (nodes/native_nodes.py): never ignored
    if native_shift is not None and abs(request["shift"] - native_shift) > 1e-6 * max(1.0, native_shift):
        raise ValueError(f"shift: this sampler's shift is {request['shift']:g}, its native MODEL's is {native_shift:g} "
                         "(its ModelSamplingSD3, else ComfyUI's default for the model): set them equal")
    steps = request["steps"]
    model_info = model["info"]
    made_by = latent_image.get(LATENT_TAG)
    if made_by in models.FAMILIES and not models.same_latent_space(made_by, model_info["family"]):
        raise ValueError(f"latent_image was sampled by a {models.get(made_by).label} model; this is "
                         f"{model_info['model']}: their latent spaces differ. Start from an empty latent, or decode it "
                         "with its own model's VAE")
    progress = services.Progress(steps, node_id, model_info["latent_format"])
    started = time.monotonic()

    def on_progress(event: dict) -> None:
        if event["step"] == 1:  # the group answered: show it once, not every step
            show_group(model["group"])
        progress.update(event["step"], event["total"], event.get("x0"))
        per_step = event["elapsed"] / event["step"]
        skipped = f", {event['skipped']} skipped by the step cache" if "skipped" in event else ""
        log.info("usp-video: step %d/%d, %.2f s/step, ETA %.0f s%s", event["step"], event["total"], per_step,
                 per_step * (event["total"] - event["step"]), skipped)
        services.publish_status(state=f"sampling step {event['step']}/{event['total']} ({per_step:.2f} s/step{skipped})")

    request.setdefault("experts", model.get("experts", [model["path"]]))
    chains = model.get("loras", {})  # the USP LoRA nodes' chains, per expert file
    request.setdefault("loras", [chains.get(path, []) for path in request["experts"]] if chains else [])
    sample_request = api.SampleRequest(positive=positive, negative=negative, latent=latent_image["samples"],
                                       preview=progress.wants_preview, family=model_info["family"],
                                       keep=[p for p in model.get("keep", []) if p not in request["experts"]],
                                       **request)
    try:
        samples, info = api.sample(model["group"], sample_request, text_dim=model_info.get("text_dim"),
                                   on_progress=on_progress, should_cancel=services.interrupt_requested)
    except Interrupted:
        services.publish_status(state="interrupted")
        services.throw_if_interrupted()
        raise
    except BaseException:  # ComfyUI's Cancel arrives as its own exception, raised by the progress hook
        services.publish_status(state="interrupted" if services.interrupt_requested() else "failed")
        raise
    for warning in info.get("warnings", []):
        log.warning("usp-video: %s", warning)
    if chains:
        log.info("usp-video: LoRAs %s; files read so far by the group: %s",
                 "; ".join(f"{Path(p).name}: " + ", ".join(f"{Path(f).name} x{s:g}" for f, s in chain)
                           for p, chain in chains.items()), info.get("load_counts"))
    ran = progress.value  # the steps actually run (a step range may run fewer than `steps`, or none)
    log.info("usp-video: sampled %d steps in %.1f s (ulysses=%d ring=%d)", ran, time.monotonic() - started,
             info["ulysses"], info["ring"])
    per_step = info.get("sampling_seconds", info.get("seconds", 0.0)) / max(ran, 1)
    last_run = f"{ran} steps, {per_step:.2f} s/step, {time.monotonic() - started:.1f} s in all"
    if "cache" in info:
        skipped = info["cache"]["skipped_steps"]
        last_run += f", {len(skipped)} skipped by {info['cache']['method']}"
        log.info("usp-video: the step cache (%s) skipped steps %s", info["cache"]["method"], skipped)
    services.publish_status(state="ready", last_run=last_run)
    if info.get("cfg_parallel", 1) == 2 and request.get("cfg") == 1.0:
        log.warning("usp-video: cfg is 1, so cfg-parallel had nothing to split: both halves ran the same pass")
    out = latent_image.copy()  # never mutate a cached input
    out["samples"] = samples
    out[LATENT_TAG] = model_info["family"]  # which model family's latent space (checked by the VAE decode)
    return (out,)

"""Running a USP sampler from a node: the request built from the model socket, the LATENT and the node's inputs,
then sent to the group (api.sample) with the page's progress bar, latent previews, status line and Cancel, and
the LATENT that comes back tagged with its family. Every family's sampler node calls `run_sampler`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from ..distributed import api, models
from ..distributed.client import GroupError, Interrupted
from . import services
from .common import LATENT_TAG
from .model_socket import ModelSocket, show_group

log = logging.getLogger("usp_video")


def _check_inputs(model: ModelSocket, latent_image: dict, shift: float) -> None:
    """What the request cannot check for itself: a native MODEL's shift, and the family that made latent_image."""
    native_shift = model.get("native_shift")  # a native MODEL's shift (nodes/native_nodes.py): never ignored
    if native_shift is not None and abs(shift - native_shift) > 1e-6 * max(1.0, native_shift):
        raise ValueError(f"shift: this sampler's shift is {shift:g}, its native MODEL's is {native_shift:g} "
                         "(its ModelSamplingSD3, else ComfyUI's default for the model): set them equal")
    model_info = model["info"]
    made_by = latent_image.get(LATENT_TAG)
    if made_by in models.FAMILIES and not models.same_latent_space(made_by, model_info["family"]):
        raise ValueError(f"latent_image was sampled by a {models.get(made_by).label} model; this is "
                         f"{model_info['model']}: their latent spaces differ. Start from an empty latent, or decode it "
                         "with its own model's VAE")


def _progress_reporter(model: ModelSocket, progress: services.Progress) -> Callable[[dict], None]:
    """api.sample's on_progress: each step moves the bar (with its preview), and is logged and shown as status."""
    def on_progress(event: dict) -> None:
        if event["step"] == 1:  # the group answered: show it once, not every step
            show_group(model["group"])
        progress.update(event["step"], event["total"], event.get("x0"))
        per_step = event["elapsed"] / event["step"]
        skipped = f", {event['skipped']} skipped by the step cache" if "skipped" in event else ""
        log.info("usp-video: step %d/%d, %.2f s/step, ETA %.0f s%s", event["step"], event["total"], per_step,
                 per_step * (event["total"] - event["step"]), skipped)
        services.publish_status(state=f"sampling step {event['step']}/{event['total']} ({per_step:.2f} s/step{skipped})")
    return on_progress


def _report(info: dict, chains: dict, ran: int, started: float, cfg) -> None:
    """Log what the run did and show its last-run line on the USP Group node. ran: the steps actually run."""
    for warning in info.get("warnings", []):
        log.warning("usp-video: %s", warning)
    if chains:
        log.info("usp-video: LoRAs %s; files read so far by the group: %s",
                 "; ".join(f"{Path(p).name}: " + ", ".join(f"{Path(f).name} x{s:g}" for f, s in chain)
                           for p, chain in chains.items()), info.get("load_counts"))
    log.info("usp-video: sampled %d steps in %.1f s (ulysses=%d ring=%d)", ran, time.monotonic() - started,
             info["ulysses"], info["ring"])
    per_step = info.get("sampling_seconds", info.get("seconds", 0.0)) / max(ran, 1)
    last_run = f"{ran} steps, {per_step:.2f} s/step, {time.monotonic() - started:.1f} s in all"
    if "cache" in info:
        skipped = info["cache"]["skipped_steps"]
        last_run += f", {len(skipped)} skipped by {info['cache']['method']}"
        log.info("usp-video: the step cache (%s) skipped steps %s", info["cache"]["method"], skipped)
    services.publish_status(state="ready", last_run=last_run)
    if info.get("cfg_parallel", 1) == 2 and cfg == 1.0:
        log.warning("usp-video: cfg is 1, so cfg-parallel had nothing to split: both halves ran the same pass")


def run_sampler(model: ModelSocket, latent_image: dict, node_id, *, positive: dict, negative: dict | None,
                **request) -> tuple[dict]:
    """Sample on the group with the page's progress bar, previews and Cancel; returns (LATENT,).

    model: a loader's socket value (model_socket.ModelSocket); positive/negative: conditionings as the family's
    tensors ({"tokens": ..., ...}); request: the other fields of requests.SampleRequest (seed, steps, cfg, shift,
    sampler, denoise, options, experts and boundaries, the KSamplerAdvanced step range)."""
    if latent_image.get("noise_mask") is not None:  # checked against the model with the request
        request["noise_mask"] = latent_image["noise_mask"]
    _check_inputs(model, latent_image, request["shift"])
    model_info = model["info"]
    progress = services.Progress(request["steps"], node_id, model_info["latent_format"])
    started = time.monotonic()
    request.setdefault("experts", model.get("experts", [model["path"]]))
    chains = model.get("loras", {})  # the USP LoRA nodes' chains, per expert file
    request.setdefault("loras", [chains.get(path, []) for path in request["experts"]] if chains else [])
    sample_request = api.SampleRequest(positive=positive, negative=negative, latent=latent_image["samples"],
                                       preview=progress.wants_preview, family=model_info["family"],
                                       keep=[p for p in model.get("keep", []) if p not in request["experts"]],
                                       max_step_s=float(getattr(model["group"], "max_step_s", 0.0)), **request)
    cancelled = []  # ComfyUI clears its interrupt flag when its progress hook raises: remember that it was set

    def should_cancel() -> bool:
        if services.interrupt_requested():
            cancelled.append(True)
        return bool(cancelled)

    def on_start() -> None:  # the models are loaded; the first step runs
        show_group(model["group"])
        services.publish_status(state="sampling (the first step is running)")

    # ComfyUI's own models (its text encoders, VAEs, a native MODEL it sampled) leave the group's devices first
    services.free_comfy_models(services.group_devices(model["group"]))
    services.publish_status(state="loading")  # until the group starts the first step (on_start)
    try:
        samples, info = api.sample(model["group"], sample_request, text_dim=model_info.get("text_dim"),
                                   on_progress=_progress_reporter(model, progress), should_cancel=should_cancel,
                                   on_start=on_start)
    except Interrupted as stop:
        log.info("usp-video: %s", stop)
        services.publish_status(state="interrupted (the group was stopped; the next prompt starts a new one)"
                                if stop.group_stopped else "interrupted")
        services.raise_interrupted()
        raise
    except BaseException as exc:  # ComfyUI's Cancel arrives as its own exception, raised by the progress hook
        interrupted = services.is_comfy_interrupt(exc) or (bool(cancelled) and not isinstance(exc, GroupError))
        services.publish_status(state="interrupted" if interrupted else "failed")
        raise
    _report(info, chains, progress.value, started, request.get("cfg"))
    out = latent_image.copy()  # never mutate a cached input
    out["samples"] = samples
    out[LATENT_TAG] = model_info["family"]  # which model family's latent space (checked by the VAE decode)
    return (out,)

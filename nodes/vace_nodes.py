"""USP Wan VACE To Video: native WanVaceToVideo's conditioning and latent, with the control video (split by its mask
into the inactive and reactive halves) and the reference image encoded by the USP group's split VAE encode
(distributed/parallel/vae_split.py: exact, each rank its rows) instead of ComfyUI's own VAE. Its outputs are what
WanVaceToVideo gives (the VACE lists appended, so several nodes stack), so either node feeds the USP samplers and
TrimVideoLatent."""

from __future__ import annotations

import torch

from ..distributed.models import get
from ..distributed.models.video import comfy_upscale, resized_frames
from . import services, socket_types
from .common import LATENT_TAG
from .i2v_nodes import _check_size, empty_latent, encode_frames, wan_conditioning_inputs
from .v3 import CATEGORY, io, schema

VACE_KEYS = ("vace_frames", "vace_mask", "vace_strength")


def appended(conditioning: list, values: dict) -> list:
    """A copy of a CONDITIONING with each value appended to its key's list (ComfyUI's conditioning_set_values with
    append=True): a second VACE node adds a second control context."""
    return [[tensor, {**extra, **{k: list(extra.get(k) or []) + [v] for k, v in values.items()}}]
            for tensor, extra in conditioning]


def control_pixels(control_video, control_masks, width: int, height: int, length: int):
    """WanVaceToVideo's control video ([length, H, W, 3], 0..1: resized, padded with gray frames; gray without one)
    and mask ([length, H, W, 1], 1: generate; resized, padded with 1; ones without one)."""
    if control_video is None:
        video = torch.full((length, height, width, 3), 0.5)
    else:
        video = resized_frames(control_video, width, height, length)[..., :3].float()
        video = torch.nn.functional.pad(video, (0, 0, 0, 0, 0, 0, 0, length - video.shape[0]), value=0.5)
    if control_masks is None:
        mask = torch.ones(length, height, width, 1)
    else:
        mask = control_masks.float()
        mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
        mask = comfy_upscale(mask[:length], width, height).movedim(1, -1)
        mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, 0, 0, length - mask.shape[0]), value=1.0)
    return video, mask


class UspWanVaceToVideo(io.ComfyNode):
    FAMILY = "wan2.1-vace"

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspWanVaceToVideo", display_name="USP Wan VACE To Video", category=CATEGORY,
            description=("Native WanVaceToVideo on the USP group, for Wan 2.1 VACE: the control video split by its "
                         "mask into what to keep and what to generate, and the reference image, are encoded by the "
                         "Wan 2.1 VAE split across the ranks and appended (with the strength) to both conditionings; "
                         "the empty latent to sample, with the reference's frame in front (trim_latent says how many "
                         "frames TrimVideoLatent cuts after sampling)."),
            search_aliases=["WanVaceToVideo", "vace", "control video", "reference to video"],
            inputs=[
                *wan_conditioning_inputs("USP Load VAE with wan_2.1_vae.safetensors."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="How strongly this control steers the video (ComfyUI's vace_strength)."),
                io.Image.Input("control_video", optional=True, tooltip=(
                    "The control frames (depth, pose, edges, or a video to inpaint / extend); resized to the video, "
                    "padded with gray. None: gray (reference-to-video).")),
                io.Mask.Input("control_masks", optional=True, tooltip=(
                    "1 where the video is generated, 0 where the control video is kept; None: all generated.")),
                io.Image.Input("reference_image", optional=True, tooltip=(
                    "A subject or style image: its latent goes in front of the video as one more frame (cut after "
                    "sampling: trim_latent).")),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative"),
                     io.Latent.Output("latent"), io.Int.Output("trim_latent", tooltip="Into TrimVideoLatent.")],
        )

    @classmethod
    def execute(cls, positive, negative, vae, width, height, length, batch_size, strength, control_video=None,
                control_masks=None, reference_image=None):
        from ..distributed.models.wan_vace import dit as vace_dit

        family = get(cls.FAMILY)
        _check_size(family, width, height, length)
        video, mask = control_pixels(control_video, control_masks, width, height, length)
        frames, latent_mask = vace_dit.control_conditioning(
            video, mask, lambda pixels: encode_frames(vae, pixels, family, "control video"), family.spatial_compression)
        trim = 0
        if reference_image is not None:
            reference = encode_frames(vae, resized_frames(reference_image[:1], width, height, 1), family,
                                      "reference image")
            reference = torch.cat([reference, family.process_out(torch.zeros_like(reference))], dim=1)
            frames = torch.cat([reference, frames], dim=2)
            latent_mask = torch.cat([torch.zeros_like(latent_mask[:, :, :reference.shape[2]]), latent_mask], dim=2)
            trim = reference.shape[2]
        values = {"vace_frames": frames, "vace_mask": latent_mask, "vace_strength": float(strength)}
        latent = empty_latent(family, width, height, length, batch_size, extra_frames=trim)
        services.publish_status(state="ready")
        return io.NodeOutput(appended(positive, values), appended(negative, values),
                             {"samples": latent, LATENT_TAG: family.name}, trim)


NODES = [UspWanVaceToVideo]

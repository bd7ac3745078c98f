"""USP Wan Image To Video: native WanImageToVideo's conditioning and latent, with the start video encoded by the
USP group's split VAE encode (distributed/parallel/vae_split.py: exact, each rank its rows) instead of ComfyUI's
own VAE. Its outputs are what WanImageToVideo gives, so either node feeds the USP samplers (and native ones)."""

from __future__ import annotations

import torch

from ..distributed import api
from ..distributed.models import get
from ..distributed.models.video import resized_frames
from . import services, socket_types
from .common import LATENT_TAG
from .v3 import CATEGORY, io, schema


def with_values(conditioning: list, values: dict) -> list:
    """A copy of a CONDITIONING with these keys set on every entry (ComfyUI's conditioning_set_values)."""
    return [[tensor, {**extra, **values}] for tensor, extra in conditioning]


def video_size_inputs(width: int, height: int, length: int, step: int, example: str) -> list:
    """The width / height / length / batch_size widgets of an image-to-video node (sizes in multiples of step)."""
    return [io.Int.Input("width", default=width, min=step, max=8192, step=step, tooltip="Video width (pixels)."),
            io.Int.Input("height", default=height, min=step, max=8192, step=step, tooltip="Video height (pixels)."),
            io.Int.Input("length", default=length, min=1, max=8192, step=4, tooltip=f"Frames: 1 + 4k ({example})."),
            io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos per run.")]


def conditioning_inputs(vae_tooltip: str, width: int, height: int, length: int, step: int, length_hint: str) -> list:
    """The inputs every image-to-video conditioning node starts with, as ComfyUI's: positive, negative, the VAE, the
    size (its defaults and step the model's)."""
    return [io.Conditioning.Input("positive", tooltip="The prompt's conditioning (USP Text Encode, or native)."),
            io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
            socket_types.Vae.Input("vae", tooltip=vae_tooltip),
            *video_size_inputs(width, height, length, step, length_hint)]


def wan_conditioning_inputs(vae_tooltip: str, length: int = 81) -> list:
    """conditioning_inputs at Wan's sizes (832 x 480, 81 frames, steps of 16)."""
    return conditioning_inputs(vae_tooltip, 832, 480, length, 16, "81 at 16 fps is 5 s")


def empty_latent(family, width: int, height: int, length: int, batch_size: int, extra_frames: int = 0):
    """The empty latent of a video of this size (checked: _check_size), extra_frames latent frames longer."""
    _check_size(family, width, height, length)
    down = family.spatial_compression
    return torch.zeros(batch_size, family.latent_channels, (length - 1) // 4 + 1 + extra_frames, height // down,
                       width // down)


def _check_size(family, width: int, height: int, length: int) -> None:
    """The family's pixel multiple for width and height, and 1 + 4k frames."""
    step = family.pixel_multiple
    if width % step or height % step or (length - 1) % 4:
        raise ValueError(f"width and height must be multiples of {step} and length 1 + 4k, got {width}x{height}x{length}")


class UspWanImageToVideo(io.ComfyNode):
    FAMILY = "wan2.1"  # Wan 2.1 I2V's latent, which Wan 2.2 I2V A14B shares

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspWanImageToVideo", display_name="USP Wan Image To Video",
            category=CATEGORY,
            description=("Native WanImageToVideo on the USP group: the start image (resized to the video, then gray "
                         "frames) is encoded by the Wan 2.1 VAE split across the ranks, and set with its mask (and the "
                         "CLIP vision output) on both conditionings; the empty latent to sample. For Wan 2.1 I2V and "
                         "Wan 2.2 I2V A14B."),
            search_aliases=["WanImageToVideo", "image to video", "i2v"],
            inputs=[
                *wan_conditioning_inputs("USP Load VAE with wan_2.1_vae.safetensors (Wan 2.1 I2V and Wan 2.2 I2V "
                                         "A14B use the Wan 2.1 VAE)."),
                io.Image.Input("start_image", optional=True,
                               tooltip="The first frame(s); resized to the video after a centred crop."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True, tooltip=(
                    "CLIP Vision Encode of the start image (clip_vision_h, crop none): Wan 2.1 I2V needs it, Wan 2.2 "
                    "I2V takes none.")),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative"),
                     io.Latent.Output("latent")],
        )

    @classmethod
    def execute(cls, positive, negative, vae, width, height, length, batch_size, start_image=None,
                clip_vision_output=None):
        return io.NodeOutput(*image_to_video(cls.FAMILY, positive, negative, vae, width, height, length, batch_size,
                                             start_image, clip_vision_output))


def image_to_video(family_name: str, positive, negative, vae, width, height, length, batch_size, start_image=None,
                   clip_vision_output=None) -> tuple:
    """(positive, negative, LATENT) of an image-to-video node of the family, as ComfyUI's: the empty latent, and the
    start image's conditioning (the family's, its frames encoded by the group's split VAE) and the CLIP vision output
    set on both conditionings."""
    family = get(family_name)
    latent = empty_latent(family, width, height, length, batch_size)
    values = {}
    if start_image is not None:
        values.update(api.encode_start_image(vae["group"], vae["path"], start_image, width, height, length,
                                             family=family.name))
    if clip_vision_output is not None:
        values["clip_vision_output"] = clip_vision_output
    services.publish_status(state="ready")
    return with_values(positive, values), with_values(negative, values), {"samples": latent, LATENT_TAG: family.name}


def encode_frames(vae, frames: torch.Tensor, family, what: str) -> torch.Tensor:
    """IMAGE frames (resized to the video) encoded by the group's split VAE encode, as ComfyUI's Wan VAE encodes
    them: the first frame, then whole groups of 4 (trailing frames of a partial group are not encoded there either)."""
    frames = frames[:1 + (frames.shape[0] - 1) // 4 * 4, ..., :3]
    latent, vae_family = api.encode_video(vae["group"], vae["path"], frames)
    if latent.shape[1] != family.latent_channels:
        raise ValueError(f"vae: this is the {get(vae_family).label} VAE ({latent.shape[1]} channels); the {what} of "
                         f"{family.label} is encoded by its {family.latent_channels}-channel VAE: load wan_2.1_vae.safetensors")
    return latent


class UspWanFunControlToVideo(io.ComfyNode):
    FAMILY = "wan2.1"

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspWanFunControlToVideo", display_name="USP Wan Fun Control To Video",
            category=CATEGORY,
            description=("Native WanFunControlToVideo on the USP group, for Wan 2.1 Fun Control: the control video "
                         "(depth, pose, edges...) and the start image, resized to the video, are encoded by the Wan 2.1 "
                         "VAE split across the ranks and set side by side (32 channels) on both conditionings, with the "
                         "CLIP vision output if given; the empty latent to sample."),
            search_aliases=["WanFunControlToVideo", "fun control", "control video", "controlnet"],
            inputs=[
                *wan_conditioning_inputs("USP Load VAE with wan_2.1_vae.safetensors."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True, tooltip=(
                    "CLIP Vision Encode of the start image (clip_vision_h, crop none); optional, as in native "
                    "WanFunControlToVideo.")),
                io.Image.Input("start_image", optional=True,
                               tooltip="The first frame(s); resized to the video after a centred crop."),
                io.Image.Input("control_video", optional=True, tooltip=(
                    "The control frames (a depth, pose or edge video, e.g. Load Video -> Get Video Components, or a "
                    "preprocessor's output); resized to the video, its first `length` frames used.")),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative"),
                     io.Latent.Output("latent")],
        )

    @classmethod
    def execute(cls, positive, negative, vae, width, height, length, batch_size, clip_vision_output=None,
                start_image=None, control_video=None):
        family = get(cls.FAMILY)
        latent = empty_latent(family, width, height, length, batch_size)
        # as WanFunControlToVideo: the latent format's empty value where nothing is encoded, control then start
        concat = family.process_out(torch.zeros_like(latent[:1])).repeat(1, 2, 1, 1, 1)
        for offset, video, what in ((family.latent_channels, start_image, "start image"), (0, control_video, "control video")):
            if video is not None:
                encoded = encode_frames(vae, resized_frames(video, width, height, length), family, what)
                kept = min(encoded.shape[2], latent.shape[2])
                concat[:, offset:offset + family.latent_channels, :kept] = encoded[:, :, :kept]
        values = {"concat_latent_image": concat}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        services.publish_status(state="ready")
        return io.NodeOutput(with_values(positive, values), with_values(negative, values),
                             {"samples": latent, LATENT_TAG: family.name})


class UspWan22ImageToVideoLatent(io.ComfyNode):
    FAMILY = "wan2.2-ti2v-5b"

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspWan22ImageToVideoLatent",
            display_name="USP Wan 2.2 Image To Video Latent", category=CATEGORY,
            description=("Native Wan22ImageToVideoLatent on the USP group, for Wan 2.2 TI2V-5B: the empty latent of "
                         "its VAE's shape; with a start image (resized to the video), that image encoded by the Wan "
                         "2.2 VAE split across the ranks and kept as the first latent frame(s), with the LATENT's "
                         "noise_mask saying so (the USP samplers honour it)."),
            search_aliases=["Wan22ImageToVideoLatent", "ti2v", "wan 2.2 5b latent", "empty latent"],
            inputs=[socket_types.Vae.Input("vae", tooltip="USP Load VAE with wan2.2_vae.safetensors (the TI2V-5B's VAE)."),
                    *video_size_inputs(1280, 704, 49, 32, "121 at 24 fps is 5 s"),
                    io.Image.Input("start_image", optional=True, tooltip=(
                        "The first frame (1 + 4k frames); resized to the video after a centred crop."))],
            outputs=[io.Latent.Output("latent")],
        )

    @classmethod
    def execute(cls, vae, width, height, length, batch_size, start_image=None):
        return io.NodeOutput(wan22_latent(get(cls.FAMILY), vae, width, height, length, batch_size, start_image))


def wan22_latent(family, vae, width, height, length, batch_size, start_image=None) -> dict:
    """Wan22ImageToVideoLatent's LATENT: empty, or with the start image's frames kept under a noise_mask."""
    latent = empty_latent(family, width, height, length, 1)
    if start_image is None:
        return {"samples": latent.repeat(batch_size, 1, 1, 1, 1), LATENT_TAG: family.name}
    frames = resized_frames(start_image, width, height, length)
    start, vae_family = api.encode_video(vae["group"], vae["path"], frames[..., :3])
    if vae_family != family.name:
        raise ValueError(f"vae: this is the {get(vae_family).label} VAE; the TI2V-5B's start image is encoded by "
                         "the Wan 2.2 VAE: load wan2.2_vae.safetensors")
    kept = start.shape[2]
    latent[:, :, :kept] = start
    mask = torch.ones(1, 1, latent.shape[2], *latent.shape[-2:])
    mask[:, :, :kept] = 0.0
    # as ComfyUI: the start frames as encoded, the rest the latent format's empty value
    samples = family.process_out(latent) * mask + latent * (1.0 - mask)
    return {"samples": samples.repeat(batch_size, 1, 1, 1, 1), "noise_mask": mask.repeat(batch_size, 1, 1, 1, 1),
            LATENT_TAG: family.name}


NODES = [UspWanImageToVideo, UspWanFunControlToVideo, UspWan22ImageToVideoLatent]

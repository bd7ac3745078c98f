"""USP Wan Animate To Video: native WanAnimateToVideo's conditioning, latent and frame counts, with the reference
image, the pose video and the video to continue encoded by the USP group's split VAE encode
(distributed/parallel/vae_split.py: exact, each rank its rows) instead of ComfyUI's own VAE: no second Wan VAE on
rank 0's card. Its outputs are what WanAnimateToVideo gives (the pixels' part: models/wan_animate/conditioning.py),
so it swaps in for it in front of the USP samplers (or native ones), TrimVideoLatent and ImageFromBatch."""

from __future__ import annotations

from ..distributed.models import get
from ..distributed.models.wan_animate.conditioning import animate_conditioning
from . import services
from .common import LATENT_TAG
from .i2v_nodes import _check_size, empty_latent, encode_frames, wan_conditioning_inputs, with_values
from .v3 import CATEGORY, io, schema


class UspWanAnimateToVideo(io.ComfyNode):
    FAMILY = "wan2.2-animate"

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspWanAnimateToVideo", display_name="USP Wan Animate To Video", category=CATEGORY,
            description=("Native WanAnimateToVideo on the USP group, for Wan 2.2 Animate: the reference image, the "
                         "pose video and the video to continue (gray, continued frames, a background video), resized "
                         "to the video, are encoded by the Wan 2.1 VAE split across the ranks and set with the mask "
                         "(character_mask), the face video (512x512) and the CLIP vision output on both "
                         "conditionings; the empty latent to sample, the reference's frame in front (trim_latent), "
                         "and where the next chunk starts (video_frame_offset)."),
            search_aliases=["WanAnimateToVideo", "animate", "character animation", "character replacement"],
            inputs=[
                *wan_conditioning_inputs("USP Load VAE with wan_2.1_vae.safetensors (Wan 2.2 Animate uses the Wan "
                                         "2.1 VAE).", length=77),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True, tooltip=(
                    "CLIP Vision Encode of the reference image (clip_vision_h, crop none): the model needs it.")),
                io.Image.Input("reference_image", optional=True, tooltip=(
                    "The character; resized to the video (area, centred crop). None: a black image.")),
                io.Image.Input("face_video", optional=True, tooltip=(
                    "The driving face, cropped (e.g. a face detector's crops); resized to 512x512. The negative gets "
                    "a blank face.")),
                io.Image.Input("pose_video", optional=True, tooltip=(
                    "The driving pose (a pose preprocessor's skeleton video); resized to the video, its last frame "
                    "held to `length`.")),
                io.Int.Input("continue_motion_max_frames", default=5, min=1, max=8192, step=4, tooltip=(
                    "How many of continue_motion's last frames are kept (1 + 4k).")),
                io.Image.Input("background_video", optional=True, tooltip=(
                    "Character replacement: the video to put the character into (with character_mask).")),
                io.Mask.Input("character_mask", optional=True, tooltip=(
                    "Character replacement: 1 where the character is (generated), 0 the background kept.")),
                io.Image.Input("continue_motion", optional=True, tooltip=(
                    "The previous chunk's decoded frames, to extend a video: its last frames start this one.")),
                io.Int.Input("video_frame_offset", default=0, min=0, max=1 << 20, tooltip=(
                    "Frames to seek in all the input videos, for a longer video made in chunks: connect the previous "
                    "node's video_frame_offset output.")),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative"),
                     io.Latent.Output("latent"),
                     io.Int.Output("trim_latent", tooltip="Into TrimVideoLatent after sampling (the reference's frames)."),
                     io.Int.Output("trim_image", tooltip=("Decoded frames that repeat continue_motion: drop them "
                                                          "(ImageFromBatch) before joining the chunks.")),
                     io.Int.Output("video_frame_offset", tooltip="Into the next chunk's video_frame_offset.")],
        )

    @classmethod
    def execute(cls, positive, negative, vae, width, height, length, batch_size, continue_motion_max_frames,
                video_frame_offset, clip_vision_output=None, reference_image=None, face_video=None, pose_video=None,
                background_video=None, character_mask=None, continue_motion=None):
        family = get(cls.FAMILY)
        _check_size(family, width, height, length)
        made = animate_conditioning(lambda frames, what: encode_frames(vae, frames, family, what), width, height,
                                    length, continue_motion_max_frames, video_frame_offset,
                                    reference_image=reference_image, face_video=face_video, pose_video=pose_video,
                                    continue_motion=continue_motion, background_video=background_video,
                                    character_mask=character_mask)
        values = [made.positive, made.negative]
        if clip_vision_output is not None:
            values = [dict(v, clip_vision_output=clip_vision_output) for v in values]
        latent = empty_latent(family, width, height, length, batch_size, extra_frames=made.trim_latent)
        services.publish_status(state="ready")
        return io.NodeOutput(with_values(positive, values[0]), with_values(negative, values[1]),
                             {"samples": latent, LATENT_TAG: family.name}, made.trim_latent, made.trim_image,
                             made.video_frame_offset)


NODES = [UspWanAnimateToVideo]

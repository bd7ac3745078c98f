"""What ComfyUI 0.3.64's WanAnimateToVideo makes of its pixels, with the VAE encode handed in (the pack's node hands
in the USP group's split encode): the reference image's latent and the latent of the video to continue (gray, the
continued frames, a background video), the 4-channel mask beside them, the pose video's latent and the face video's
pixels, and the frame counts the node returns. Each video seeks `video_frame_offset` frames first (continued
motion counts back from it) and is resized to the video ("area", after a centred crop), the face video to 512x512.

The character mask is placed as 0.3.64 places it: frame f of the mask on mask row f of the 4 (latent frames) rows,
from the first frame after the continued motion's latents. (Newer ComfyUI moves frame f >= 1 to row f + 3, the
layout of the continued-motion rows and of Wan's reference get_i2v_mask; this follows the release it is compared
with, tests/comfyui_reference/animate_node.py.)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..video import comfy_upscale, resized_frames

FACE_SIZE = 512  # WanAnimateToVideo resizes the face video to this, whatever the model's motion encoder takes


class AnimateConditioning(NamedTuple):
    positive: dict   # the values set on the positive conditioning
    negative: dict   # the same, the face video's pixels -1
    trim_latent: int    # the reference's latent frames (TrimVideoLatent cuts them after sampling)
    trim_image: int     # decoded frames that repeat the continued motion
    video_frame_offset: int  # where the next chunk's videos start


def _seek(video: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    """The video from frame `offset` on; None where it has no frame there."""
    return None if video is None or video.shape[0] <= offset else video[offset:]


def _mask_rows(character_mask, video_frame_offset: int, length: int, motion_latents: int, size) -> torch.Tensor:
    """The video's part of the concat mask, [1, 4, latent frames, h, w] (1: generated): 4 rows per latent frame, 0
    over the continued motion's latents, the character mask (nearest-exact to the latent's size) after them."""
    latent_frames = (length - 1) // 4 + 1
    first_free = max(0, motion_latents * 4 - 3)
    rows = torch.ones(1, 1, latent_frames * 4, *size)
    rows[:, :, :motion_latents * 4] = 0.0
    if character_mask is not None and (character_mask.shape[0] > video_frame_offset or character_mask.shape[0] == 1):
        mask = character_mask
        if mask.shape[0] == 1:
            mask = mask.repeat(length, *(1,) * (mask.dim() - 1))
        else:
            mask = mask[video_frame_offset:]
        if mask.dim() == 3:
            mask = mask.unsqueeze(1).movedim(0, 1)  # (F, H, W) -> (1, F, H, W)
        if mask.dim() == 4:
            mask = mask.unsqueeze(1)  # -> (1, 1, F, H, W)
        mask = comfy_upscale(mask[:, :, :length].float(), size[1], size[0], "nearest-exact")
        if mask.shape[2] > first_free:
            rows[:, :, first_free:mask.shape[2]] = mask[:, :, first_free:]
    return rows.view(1, latent_frames, 4, *size).transpose(1, 2)  # (1, 4, latent frames, h, w)


def animate_conditioning(encode: Callable[[torch.Tensor, str], torch.Tensor], width: int, height: int, length: int,
                         continue_motion_max_frames: int, video_frame_offset: int, reference_image=None,
                         face_video=None, pose_video=None, continue_motion=None, background_video=None,
                         character_mask=None) -> AnimateConditioning:
    """WanAnimateToVideo's conditioning values for a video of width x height x length (1 + 4k frames). IMAGE
    inputs are [frames, H, W, C] in 0..1, character_mask a MASK [frames, H, W] (1: the character, generated).
    encode(frames [F, height, width, C], what) -> raw latent [1, 16, (F - 1) // 4 + 1, height / 8, width / 8]."""
    if reference_image is None:
        reference_image = torch.zeros(1, height, width, 3)
    reference = encode(resized_frames(reference_image, width, height, length, "area"), "reference image")
    rows_shape = reference.shape[-2:]
    video = torch.full((length, height, width, 3), 0.5)
    motion_latents = 0
    if continue_motion is not None:
        motion = continue_motion[-continue_motion_max_frames:]
        video_frame_offset = max(0, video_frame_offset - motion.shape[0])
        motion = resized_frames(motion[-length:], width, height, length, "area")
        video = torch.full((length, height, width, motion.shape[-1]), 0.5, dtype=motion.dtype)
        video[:motion.shape[0]] = motion
        motion_latents = (motion.shape[0] - 1) // 4 + 1
    positive, negative = {}, {}

    pose = _seek(pose_video, video_frame_offset)
    if pose is not None:
        pose = resized_frames(pose, width, height, length, "area")
        if pose.shape[0] < length:  # the last frame held
            pose = torch.cat([pose, pose[-1:].repeat(length - pose.shape[0], 1, 1, 1)])
        positive["pose_video_latent"] = negative["pose_video_latent"] = encode(pose, "pose video")

    face = _seek(face_video, video_frame_offset)
    if face is not None:
        face = comfy_upscale(face[:length].movedim(-1, 1), FACE_SIZE, FACE_SIZE, "area") * 2.0 - 1.0  # (F, C, 512, 512)
        positive["face_video_pixels"] = face.movedim(0, 1).unsqueeze(0)  # (1, C, F, 512, 512) in -1..1
        negative["face_video_pixels"] = torch.full_like(positive["face_video_pixels"], -1.0)

    first_free = max(0, motion_latents * 4 - 3)  # the first frame after the continued motion's latents
    background = _seek(background_video, video_frame_offset)
    if background is not None:
        background = resized_frames(background, width, height, length, "area")
        if background.shape[0] > first_free:
            video[first_free:background.shape[0]] = background[first_free:]

    concat = torch.cat([reference, encode(video, "video to continue")], dim=2)
    rows = _mask_rows(character_mask, video_frame_offset, length, motion_latents, rows_shape)
    concat_mask = torch.cat([torch.zeros(1, 4, reference.shape[2], *rows_shape), rows], dim=2)
    for values in (positive, negative):
        values.update(concat_latent_image=concat, concat_mask=concat_mask)
    return AnimateConditioning(positive, negative, reference.shape[2], max(0, motion_latents * 4 - 3),
                               video_frame_offset + length)

"""What a Wan DiT takes beside the noise, as ComfyUI's WAN21 model_base builds it from a conditioning: the concat
(concat_cond: the start video, a mask, the control video, in the widths the DiT's patch embedding reads) and the
reference image's latent (extra_conds' reference_latent, for Wan 2.2 Fun Control's ref_conv). `family` is the
Wan family loading the DiT (its latent channels, process_in, concat_channels, comfy_image_to_video, CONCAT_NODES)."""

from __future__ import annotations

import torch


def concat_cond(family, model, image, mask, latent_shape, name, mask_index: int = 0):
    """ComfyUI's WAN21.concat_cond: what enters the DiT beside the noise, [B, concat_channels, T, H, W]. The
    image (the node's concat_latent_image, raw latents of the VAE's channels each) resized to the latent and taken
    to the model's space (process_in) one latent at a time; then, unless the DiT takes the image alone (Wan 2.1 Fun
    Control: 32 = 16 + 16), the mask (1 where the start video holds, on 4 channels) at mask_index (Wan 2.2 Fun
    Control: after the control video; else in front)."""
    from ..video import comfy_upscale, resize_to_batch

    batch, channels, frames, height, width = latent_shape
    extra = family.concat_channels(model)
    image = comfy_upscale(image.float(), width, height)
    if image.shape[2] != frames or image.shape[1] % channels:
        raise ValueError(f"{name}.concat_latent_image is {tuple(image.shape)}; the latent is {tuple(latent_shape)}: "
                         "make both with the same width, height and length")
    image = torch.cat([family.process_in(part) for part in image.split(channels, dim=1)], dim=1)
    image = resize_to_batch(image, batch)
    image_to_video = family.comfy_image_to_video(model)
    if extra != image.shape[1] + 4 and (not image_to_video or extra == image.shape[1]):
        if image.shape[1] != extra:
            node = family.CONCAT_NODES.get(extra, "its own conditioning node")
            raise ValueError(f"{name}.concat_latent_image has {image.shape[1]} channels; this DiT takes {extra} "
                             f"beside the noise: make the conditioning with {node}")
        return image
    image = image[:, :extra - 4]
    if mask is None:
        mask = torch.zeros(batch, 4, frames, height, width)
    else:
        mask = mask.float()
        if mask.shape[1] != 4:
            mask = mask.mean(dim=1, keepdim=True)
        mask = comfy_upscale(1.0 - mask, width, height)
        if mask.shape[2] < frames:
            mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, frames - mask.shape[2]))
        if mask.shape[1] == 1:
            mask = mask.repeat(1, 4, 1, 1, 1)
        mask = resize_to_batch(mask, batch)
    mask = mask[:, :, :frames]
    return torch.cat([image[:, :mask_index], mask, image[:, mask_index:]], dim=1)


def reference(family, model, latent, latent_shape, name):
    """A reference image's latent as ComfyUI's WAN21.extra_conds gives it to ref_conv: its first frame in the
    model's space, [B, 16, H, W] (None without one). Refused for a DiT without ref_conv (ComfyUI drops it)."""
    from ..video import resize_to_batch

    if latent is None:
        return None
    if getattr(model, "ref_conv", None) is None:
        raise ValueError(f"{name} carries a reference image (reference_latents, from Wan22FunControlToVideo's "
                         "ref_image or ReferenceLatent), and this model has no reference-image input: it would "
                         "be ignored; disconnect it, or load a Wan 2.2 Fun Control model")
    batch, channels, _, height, width = latent_shape
    if latent.shape[1] != channels or tuple(latent.shape[-2:]) != (height, width):
        raise ValueError(f"{name}.reference_latent is {tuple(latent.shape)}; the latent is {tuple(latent_shape)}: "
                         "make the reference image at the video's width and height (Wan22FunControlToVideo does)")
    return resize_to_batch(family.process_in(latent.float())[:, :, 0], batch)

"""The VAE nodes every family uses: load a video VAE on the group, decode a latent to frames and encode frames to
a latent, each split across the ranks where the family's VAE allows it. The family comes from the file (load) or
from the LATENT's tag (decode), never from the node: one set of VAE nodes serves every family."""

from __future__ import annotations

from ..distributed import api
from . import services
from .common import LATENT_TAG, TIP_GROUP
from .group_node import CATEGORY
from .model_socket import show_group


def _with_progress(vae: dict, node_id, verb: str, call):
    """call(on_progress) on the group, with the node's progress bar and the group's state box ("decoding 3/9");
    the state says interrupted or failed when it raises."""
    progress = services.Progress(1, node_id, None)

    def on_progress(event: dict) -> None:
        if event["step"] == 1:  # the group answered: show it once, not every step
            show_group(vae["group"])
        progress.update(event["step"], event["total"])
        services.publish_status(state=f"{verb} {event['step']}/{event['total']}")

    try:
        result = call(on_progress)
    except BaseException:
        services.publish_status(state="interrupted" if services.interrupt_requested() else "failed")
        raise
    services.publish_status(state="ready")
    if progress.value == 0:  # a call that reported nothing still ends the bar
        progress.update(1)
    return result


class UspVaeLoader:
    DESCRIPTION = "Loads a video VAE (Wan 2.1 or HunyuanVideo) on rank 0 of the USP group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "group": ("USP_GROUP", {"tooltip": TIP_GROUP}),
            "vae_name": (services.list_models("vae"), {"tooltip": "wan_2.1_vae.safetensors or "
                                                                  "hunyuan_video_vae_bf16.safetensors from models/vae."}),
        }}

    RETURN_TYPES = ("USP_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, group, vae_name):
        return ({"group": group, "path": services.model_path("vae", vae_name)},)


class UspVaeDecode:
    DESCRIPTION = "Decodes a Wan 2.1 or HunyuanVideo latent to frames on the USP group (tiled for HunyuanVideo)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("USP_VAE", {"tooltip": "From USP Load VAE: the VAE of the model that made the latent."}),
            "samples": ("LATENT", {"tooltip": "A USP sampler's output (or a native video latent of the same model)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, vae, samples, node_id=None):
        frames = _with_progress(vae, node_id, "decoding", lambda on_progress: api.decode(
            vae["group"], vae["path"], samples["samples"], family=samples.get(LATENT_TAG), on_progress=on_progress))
        return (frames,)


class UspVaeEncode:
    DESCRIPTION = ("Encodes a video (IMAGE frames) to a latent with the Wan 2.1 or Wan 2.2 VAE on the USP group, "
                   "its rows split across the ranks: the latent ComfyUI's VAE Encode gives (a start video, or a "
                   "video to re-sample with denoise < 1).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The video: 1 + 4k frames (1, 5, ..., 81), width and height in multiples "
                                            "of 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE)."}),
            "vae": ("USP_VAE", {"tooltip": "From USP Load VAE: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 A14B) or the "
                                           "Wan 2.2 VAE (TI2V-5B)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels, vae, node_id=None):
        # the first 3 channels, as VAE Encode takes them (an RGBA IMAGE too); a view: pixels stay unchanged
        latent, family = _with_progress(vae, node_id, "encoding", lambda on_progress: api.encode_video(
            vae["group"], vae["path"], pixels[..., :3], on_progress=on_progress))
        return ({"samples": latent, LATENT_TAG: family},)


# the nodes of this file: {ComfyUI type name: (class, display name)} (collected by nodes/__init__.py)
NODES = {
    "UspVaeLoader": (UspVaeLoader, "USP Load VAE (Wan / HunyuanVideo)"),
    "UspVaeDecode": (UspVaeDecode, "USP VAE Decode"),
    "UspVaeEncode": (UspVaeEncode, "USP VAE Encode"),
}

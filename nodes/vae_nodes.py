"""The VAE nodes every family uses: load a video VAE on the group, decode a latent to frames and encode frames to
a latent, each split across the ranks where the family's VAE allows it. The family comes from the file (load) or
from the LATENT's tag (decode), never from the node: one set of VAE nodes serves every family."""

from __future__ import annotations

from ..distributed import api
from ..distributed.client import Interrupted
from . import services, socket_types
from .common import LATENT_TAG, TIP_GROUP
from .model_socket import show_group
from .v3 import CATEGORY, io, schema


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
    except BaseException as exc:  # ComfyUI's Cancel comes as its own exception, its flag cleared by then
        interrupted = services.is_comfy_interrupt(exc) or services.interrupt_requested() or isinstance(exc, Interrupted)
        services.publish_status(state="interrupted" if interrupted else "failed")
        raise
    services.publish_status(state="ready")
    if progress.value == 0:  # a call that reported nothing still ends the bar
        progress.update(1)
    return result


class UspVaeLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspVaeLoader", display_name="USP Load VAE", category=CATEGORY,
            description="Loads a video VAE (Wan 2.1, Wan 2.2 or HunyuanVideo: read from the file) on the USP group.",
            search_aliases=["VAELoader", "load vae"],
            inputs=[socket_types.Group.Input("group", tooltip=TIP_GROUP),
                    io.Combo.Input("vae_name", options=services.list_models("vae"), tooltip=(
                        "From models/vae: wan_2.1_vae.safetensors (Wan 2.1, Wan 2.2 A14B), wan2.2_vae.safetensors "
                        "(Wan 2.2 TI2V-5B) or hunyuan_video_vae_bf16.safetensors."))],
            outputs=[socket_types.Vae.Output("vae", tooltip="For USP VAE Decode / Encode and the image-to-video nodes.")],
        )

    @classmethod
    def execute(cls, group, vae_name):
        return io.NodeOutput({"group": group, "path": services.model_path("vae", vae_name)})


class UspVaeDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspVaeDecode", display_name="USP VAE Decode", category=CATEGORY,
            description=("Decodes a video latent to frames on the USP group, split across the ranks (Wan: each rank "
                         "its rows, exact; HunyuanVideo: the ranks share its tiles)."),
            search_aliases=["VAEDecode", "decode"],
            inputs=[socket_types.Vae.Input("vae", tooltip="From USP Load VAE: the VAE of the model that made the latent."),
                    io.Latent.Input("samples", tooltip="A USP sampler's output (or a native video latent of the same "
                                                       "model).")],
            outputs=[io.Image.Output("IMAGE")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, samples):
        frames = _with_progress(vae, cls.hidden.unique_id, "decoding", lambda on_progress: api.decode(
            vae["group"], vae["path"], samples["samples"], family=samples.get(LATENT_TAG), on_progress=on_progress))
        return io.NodeOutput(frames)


class UspVaeEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspVaeEncode", display_name="USP VAE Encode", category=CATEGORY,
            description=("Encodes a video (IMAGE frames) to a latent with the Wan 2.1 or Wan 2.2 VAE on the USP group, "
                         "its rows split across the ranks: the latent ComfyUI's VAE Encode gives (a start video, or a "
                         "video to re-sample with denoise < 1)."),
            search_aliases=["VAEEncode", "encode"],
            inputs=[io.Image.Input("pixels", tooltip=("The video: 1 + 4k frames (1, 5, ..., 81), width and height in "
                                                      "multiples of 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE).")),
                    socket_types.Vae.Input("vae", tooltip=("From USP Load VAE: the Wan 2.1 VAE (Wan 2.1, Wan 2.2 A14B) or "
                                                           "the Wan 2.2 VAE (TI2V-5B)."))],
            outputs=[io.Latent.Output("LATENT")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, pixels, vae):
        # the first 3 channels, as VAE Encode takes them (an RGBA IMAGE too); a view: pixels stay unchanged
        latent, family = _with_progress(vae, cls.hidden.unique_id, "encoding", lambda on_progress: api.encode_video(
            vae["group"], vae["path"], pixels[..., :3], on_progress=on_progress))
        return io.NodeOutput({"samples": latent, LATENT_TAG: family})


NODES = [UspVaeLoader, UspVaeDecode, UspVaeEncode]

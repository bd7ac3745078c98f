"""USP HunyuanVideo 1.5 Image To Video: native HunyuanVideo15ImageToVideo's conditioning and latent (newest ComfyUI),
with the start image encoded by the USP group's split VAE encode; without a start image, the empty latent of
native EmptyHunyuanVideo15Latent (32 channels, 16x space), which ComfyUI before HunyuanVideo 1.5 lacks."""

from __future__ import annotations

from .i2v_nodes import conditioning_inputs, image_to_video
from .v3 import CATEGORY, io, schema


class UspHunyuanVideo15ImageToVideo(io.ComfyNode):
    FAMILY = "hunyuan-video-1.5"

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspHunyuanVideo15ImageToVideo", display_name="USP HunyuanVideo 1.5 Image To Video",
            category=CATEGORY,
            description=("Native HunyuanVideo15ImageToVideo on the USP group: the start image, resized to the video, "
                         "is encoded by the HunyuanVideo 1.5 VAE split across the ranks and set with its mask (and the "
                         "CLIP vision output: SigLIP's) on both conditionings; the empty latent to sample. Without a "
                         "start image: text to video (EmptyHunyuanVideo15Latent's latent)."),
            search_aliases=["HunyuanVideo15ImageToVideo", "EmptyHunyuanVideo15Latent", "hunyuan 1.5", "i2v"],
            inputs=[
                *conditioning_inputs("USP Load VAE with hunyuanvideo15_vae_fp16.safetensors.", 848, 480, 121, 16,
                                     "121 at 24 fps is 5 s"),
                io.Image.Input("start_image", optional=True,
                               tooltip="The first frame; resized to the video after a centred crop."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True, tooltip=(
                    "CLIP Vision Encode of the start image with sigclip_vision_patch14_384 (the I2V models need it).")),
            ],
            outputs=[io.Conditioning.Output("positive"), io.Conditioning.Output("negative"),
                     io.Latent.Output("latent")],
        )

    @classmethod
    def execute(cls, positive, negative, vae, width, height, length, batch_size, start_image=None,
                clip_vision_output=None):
        return io.NodeOutput(*image_to_video(cls.FAMILY, positive, negative, vae, width, height, length, batch_size,
                                             start_image, clip_vision_output))


NODES = [UspHunyuanVideo15ImageToVideo]

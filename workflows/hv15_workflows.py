"""The HunyuanVideo 1.5 workflows (make_workflows.py writes them with the others): the generic USP nodes (USP Load
Text Encoder takes the Qwen2.5-VL + ByT5 pair) around the pack's USP HunyuanVideo 1.5 Image To Video (native
HunyuanVideo15ImageToVideo with the start image encoded by USP Load VAE's split VAE; without a start image, native
EmptyHunyuanVideo15Latent's latent, which ComfyUI before HunyuanVideo 1.5 lacks).

    hunyuan_video15_t2v_usp                  480p text to video (50 steps, shift 5, cfg 6: tencent's settings)
    hunyuan_video15_i2v_usp                  480p image to video, SigLIP (sigclip_vision_patch14_384) of the image
    hunyuan_video15_i2v_step_distilled_usp   the step-distilled 480p I2V: 8 steps at cfg 1
"""

from __future__ import annotations

SOCKETS = {"UspHunyuanVideo15ImageToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                             ("vae", "USP_VAE"), ("start_image", "IMAGE"),
                                             ("clip_vision_output", "CLIP_VISION_OUTPUT")]}
SIZES = {"UspHunyuanVideo15ImageToVideo": (380, 250)}
WIDGETS = {"UspHunyuanVideo15ImageToVideo": ["width", "height", "length", "batch_size"]}
_OUTPUTS = [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]


def _hv15(wan_t2v: dict, dit: str, prefix: str, sampling: list, prompt: str, links: dict, extra: dict) -> dict:
    """The text-to-video graph (make_workflows.WAN_T2V) with HunyuanVideo 1.5's files, its latent node (17: `links`
    into it) and sampler settings, and `extra` nodes."""
    graph = {k: v for k, v in wan_t2v.items() if k != 6}
    graph.update({
        2: ("UspLoadDiffusionModel", None, [dit, "none"], {"group": (1, 0)},
            [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
        3: ("UspLoadTextEncoder", None, ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "byt5_small_glyphxl_fp16.safetensors",
                                         ""], {"group": (1, 0)}, [("text_encoder", "USP_TEXT_ENCODER")], (440, 240)),
        4: ("UspTextEncode", "Positive prompt", [prompt], {"text_encoder": (3, 0)},
            [("CONDITIONING", "CONDITIONING")], (1040, 60)),
        5: ("UspTextEncode", "Negative prompt (used when cfg > 1)", [""], {"text_encoder": (3, 0)},
            [("CONDITIONING", "CONDITIONING")], (1040, 300)),
        7: ("UspSampler", None, [42, "fixed", *sampling, "euler", 1.0, 5.0, 0.0, 0.0],
            {"model": (2, 0), "positive": (17, 0), "negative": (17, 1), "latent_image": (17, 2)},
            [("LATENT", "LATENT")], (1460, 60)),
        8: ("UspVaeLoader", None, ["hunyuanvideo15_vae_fp16.safetensors"], {"group": (1, 0)}, [("vae", "USP_VAE")],
            (1460, 760)),
        10: ("SaveAnimatedWEBP", None, [f"usp_video/{prefix}", 24.0, False, 90, "default"], {"images": (9, 0)}, [],
             (1900, 240)),
        17: ("UspHunyuanVideo15ImageToVideo", None, [848, 480, 121, 1],
             {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), **links}, _OUTPUTS, (1040, 560)),
    })
    graph.update(extra)
    return dict(sorted(graph.items()))


def hv15_workflows(wan_t2v: dict) -> dict[str, dict]:
    """{name: graph} of the HunyuanVideo 1.5 workflows, in make_workflows' format."""
    image_nodes = {
        12: ("LoadImage", "Start image", ["example.png", "image"], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
             (40, 660)),
        13: ("CLIPVisionLoader", None, ["sigclip_vision_patch14_384.safetensors"], {},
             [("CLIP_VISION", "CLIP_VISION")], (440, 420)),
        14: ("CLIPVisionEncode", None, ["center"], {"clip_vision": (13, 0), "image": (12, 0)},
             [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], (440, 560)),
    }
    image_links = {"start_image": (12, 0), "clip_vision_output": (14, 0)}
    moving = "The fox turns its head toward the camera and trots away through the snow, soft morning light"
    return {
        "hunyuan_video15_t2v_usp": _hv15(
            wan_t2v, "hunyuanvideo1.5_480p_t2v_fp16.safetensors", "hunyuan15_t2v", [50, 6.0],
            'A red fox trots through fresh snow past a wooden sign that says "north", sunrise, soft light', {}, {}),
        "hunyuan_video15_i2v_usp": _hv15(wan_t2v, "hunyuanvideo1.5_480p_i2v_fp16.safetensors", "hunyuan15_i2v",
                                         [50, 6.0], moving, image_links, image_nodes),
        "hunyuan_video15_i2v_step_distilled_usp": _hv15(
            wan_t2v, "hunyuanvideo1.5_480p_i2v_step_distilled_fp16.safetensors", "hunyuan15_i2v_distilled", [8, 1.0],
            moving, image_links, image_nodes),
    }

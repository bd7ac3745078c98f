"""The Wan control and character workflows (make_workflows.py writes them with the others):

    wan21_fun_control_usp     Wan 2.1 Fun Control 1.3B: a control video (Load Video -> Get Video Components: a depth,
                              pose or edge video) and a start image through the pack's USP Wan Fun Control To Video
                              (both encoded by the group's split VAE encode). CLIP vision is optional for Fun Control,
                              as in native WanFunControlToVideo: connect CLIP Vision Encode of the start image to its
                              clip_vision_output as in the I2V workflow.
    wan22_animate_usp         Wan 2.2 Animate: a reference image driven by pose and face videos through the pack's
                              USP Wan Animate To Video (native WanAnimateToVideo with the reference and the videos
                              encoded by USP Load VAE's split encode; CLIP vision of the reference) into the USP
                              sampler (Animate's 20 steps, cfg 1, shift 5); TrimVideoLatent drops the reference frame
                              (its trim_latent; trim_image is 0 without continue_motion), the USP VAE decodes the rest.
"""

from __future__ import annotations


def control_workflows(wan_t2v: dict, wan_i2v: dict) -> dict[str, dict]:
    """{name: graph} in make_workflows' format, built on its Wan 2.1 text- and image-to-video graphs."""
    fun = {k: v for k, v in wan_t2v.items() if k != 6}
    fun.update({
        2: ("UspLoadDiffusionModel", None, ["wan2.1_fun_control_1.3B_bf16.safetensors", "none"], {"group": (1, 0)},
            [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
        4: ("UspTextEncode", "Positive prompt",
            ["A fox in a red scarf walks through a snowy forest, following the motion of the control video"],
            {"text_encoder": (3, 0)}, [("CONDITIONING", "CONDITIONING")], (1040, 60)),
        7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 5.0, 0.0, 0.0],
            {"model": (2, 0), "positive": (16, 0), "negative": (16, 1), "latent_image": (16, 2)},
            [("LATENT", "LATENT")], (1460, 60)),
        10: ("SaveAnimatedWEBP", None, ["usp_video/wan21_fun_control", 16.0, False, 90, "default"],
             {"images": (9, 0)}, [], (1900, 240)),
        12: ("LoadImage", "Start image", ["example.png", "image"], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
             (40, 660)),
        17: ("LoadVideo", "Control video", ["control.mp4", "image"], {}, [("VIDEO", "VIDEO")], (440, 660)),
        18: ("GetVideoComponents", None, [], {"video": (17, 0)},
             [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], (440, 1060)),
        16: ("UspWanFunControlToVideo", None, [832, 480, 81, 1],
             {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), "start_image": (12, 0),
              "control_video": (18, 0)},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")], (1040, 560)),
    })
    animate = {k: v for k, v in wan_i2v.items() if k not in (6, 15)}
    animate.update({
        2: ("UspLoadDiffusionModel", None, ["wan2.2_animate_14B_bf16.safetensors", "none"], {"group": (1, 0)},
            [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
        4: ("UspTextEncode", "Positive prompt", ["The character dances in a sunlit studio, smooth natural motion"],
            {"text_encoder": (3, 0)}, [("CONDITIONING", "CONDITIONING")], (1040, 60)),
        7: ("UspSampler", None, [42, "fixed", 20, 1.0, "unipc", 1.0, 5.0, 0.0, 0.0],
            {"model": (2, 0), "positive": (15, 0), "negative": (15, 1), "latent_image": (15, 2)},
            [("LATENT", "LATENT")], (1460, 60)),
        9: ("UspVaeDecode", None, [], {"vae": (8, 0), "samples": (22, 0)}, [("IMAGE", "IMAGE")], (1900, 60)),
        10: ("SaveAnimatedWEBP", None, ["usp_video/wan22_animate", 16.0, False, 90, "default"], {"images": (9, 0)},
             [], (1900, 240)),
        12: ("LoadImage", "Reference image", ["example.png", "image"], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
             (40, 660)),
        15: ("UspWanAnimateToVideo", None, [832, 480, 77, 1, 5, 0],
             {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), "clip_vision_output": (14, 0),
              "reference_image": (12, 0), "face_video": (20, 0), "pose_video": (18, 0)},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
              ("trim_latent", "INT"), ("trim_image", "INT"), ("video_frame_offset", "INT")], (1040, 560)),
        17: ("LoadVideo", "Pose video", ["pose.mp4", "image"], {}, [("VIDEO", "VIDEO")], (40, 1040)),
        18: ("GetVideoComponents", None, [], {"video": (17, 0)},
             [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], (440, 1040)),
        19: ("LoadVideo", "Face video", ["face.mp4", "image"], {}, [("VIDEO", "VIDEO")], (40, 1420)),
        20: ("GetVideoComponents", None, [], {"video": (19, 0)},
             [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], (440, 1420)),
        22: ("TrimVideoLatent", None, [0], {"samples": (7, 0), "trim_amount": (15, 3)}, [("LATENT", "LATENT")],
             (1460, 560)),
    })
    return {"wan21_fun_control_usp": fun, "wan22_animate_usp": animate}


# Their nodes' sockets, sizes and widgets (the native nodes shared with the VACE workflows are defined there:
# LoadVideo, GetVideoComponents, TrimVideoLatent)
CONTROL_SOCKETS = {
    "UspWanFunControlToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "USP_VAE"),
                                ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE"),
                                ("control_video", "IMAGE")],
    "UspWanAnimateToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "USP_VAE"),
                             ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("reference_image", "IMAGE"),
                             ("face_video", "IMAGE"), ("pose_video", "IMAGE"), ("background_video", "IMAGE"),
                             ("character_mask", "MASK"), ("continue_motion", "IMAGE")],
}
CONTROL_SIZES = {"UspWanFunControlToVideo": (380, 270), "UspWanAnimateToVideo": (380, 420)}
CONTROL_WIDGETS = {"UspWanFunControlToVideo": ["width", "height", "length", "batch_size"],
                   "UspWanAnimateToVideo": ["width", "height", "length", "batch_size", "continue_motion_max_frames",
                                            "video_frame_offset"]}

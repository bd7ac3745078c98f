"""The Wan 2.1 VACE workflows (make_workflows.py writes them with the others): the generic USP nodes around the pack's
USP Wan VACE To Video (native WanVaceToVideo with the control video and the reference image encoded by USP Load VAE's
Wan 2.1 VAE split across the ranks: no second VAE in ComfyUI's memory; native WanVaceToVideo with a native VAELoader
feeds the sampler the same) and TrimVideoLatent (a reference image adds latent frames in front, which trim_latent
cuts after sampling); the USP VAE decodes the trimmed latent.

    wan21_vace_r2v_usp        from a reference image and the prompt (no control video)
    wan21_vace_control_usp    following a control video (depth, pose, edges... from any preprocessor) via LoadVideo
"""

from __future__ import annotations


def _vace(wan_t2v: dict, prefix: str, links: dict, extra: dict) -> dict:
    """The Wan 2.1 text-to-video graph (make_workflows.WAN_T2V) with VACE's nodes: `links` into USP Wan VACE To Video,
    `extra` nodes."""
    graph = {k: v for k, v in wan_t2v.items() if k != 6}
    graph.update({
        2: ("UspLoadDiffusionModel", None, ["wan2.1_vace_14B_fp16.safetensors", "none"], {"group": (1, 0)},
            [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
        7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 5.0, 0.0, 0.0],
            {"model": (2, 0), "positive": (17, 0), "negative": (17, 1), "latent_image": (17, 2)},
            [("LATENT", "LATENT")], (1460, 60)),
        9: ("UspVaeDecode", None, [], {"vae": (8, 0), "samples": (18, 0)}, [("IMAGE", "IMAGE")], (1900, 60)),
        10: ("SaveAnimatedWEBP", None, [f"usp_video/{prefix}", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
             (1900, 240)),
        17: ("UspWanVaceToVideo", None, [832, 480, 81, 1, 1.0],
             {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), **links},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"), ("trim_latent", "INT")],
             (1040, 560)),
        18: ("TrimVideoLatent", None, [0], {"samples": (7, 0), "trim_amount": (17, 3)}, [("LATENT", "LATENT")],
             (1460, 520)),
    })
    graph.update(extra)
    return dict(sorted(graph.items()))


def vace_workflows(wan_t2v: dict) -> dict[str, dict]:
    """{name: graph} of the VACE workflows, in make_workflows' format."""
    r2v = _vace(wan_t2v, "wan_vace_r2v", {"reference_image": (12, 0)}, {
        12: ("LoadImage", "Reference image", ["example.png", "image"], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
             (40, 660)),
    })
    control = _vace(wan_t2v, "wan_vace_control", {"control_video": (20, 0)}, {
        19: ("LoadVideo", "Control video", ["control_video.mp4", "image"], {}, [("VIDEO", "VIDEO")], (40, 660)),
        20: ("GetVideoComponents", None, [], {"video": (19, 0)},
             [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], (440, 560)),
    })
    return {"wan21_vace_r2v_usp": r2v, "wan21_vace_control_usp": control}


VACE_SOCKETS = {
    "UspWanVaceToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "USP_VAE"),
                          ("control_video", "IMAGE"), ("control_masks", "MASK"), ("reference_image", "IMAGE")],
    "TrimVideoLatent": [("samples", "LATENT"), ("trim_amount", "INT")], "GetVideoComponents": [("video", "VIDEO")],
}
VACE_SIZES = {"UspWanVaceToVideo": (380, 300), "TrimVideoLatent": (300, 90), "LoadVideo": (340, 340),
              "GetVideoComponents": (300, 110)}
VACE_WIDGETS = {"UspWanVaceToVideo": ["width", "height", "length", "batch_size", "strength"],
                "TrimVideoLatent": ["trim_amount"], "LoadVideo": ["file", "upload"],
                "GetVideoComponents": []}
# ComfyUI's own nodes' optional inputs that a shipped workflow may leave open (tests/test_workflow.py)
NATIVE_OPTIONAL: dict[str, set[str]] = {}

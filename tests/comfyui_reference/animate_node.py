"""The pack's USP Wan Animate To Video against ComfyUI's own WanAnimateToVideo on the same inputs: ComfyUI's node with
ComfyUI's WanVAE built at the tiny Wan 2.1 VAE's width (vae_encode.comfy_vae), ours with our split VAE encode (here
our engine's encode in this process, as vace.py and i2v.py run the other Wan nodes). Every case compares both
conditionings' every value (the VAE latents: relative error; the masks, the face pixels, the text: equal; the CLIP
vision output: the same object), the LATENT and the three counts (trim_latent, trim_image, video_frame_offset).

Run as `python -m comfyui_reference animate_node COMFYUI_DIR FILES_JSON` -> one JSON object: per case its errors
and facts. FILES_JSON: the wan_animate family's tiny set (make_tiny: "vae").
"""

import torch

from .common import rel, run_node

LATENT_KEYS = ("concat_latent_image", "pose_video_latent")  # encoded by a VAE: ours vs ComfyUI's, within 1e-5


def cases(g: torch.Generator) -> dict:
    """{case: WanAnimateToVideo's inputs} beside width 48, height 32: videos of other sizes and lengths than the
    video's, offsets that skip frames, continued motion that moves the offset back."""
    def video(frames, height=40, width=56):
        return torch.rand(frames, height, width, 3, generator=g)

    def mask(frames, height=24, width=36):
        return (torch.rand(frames, height, width, generator=g) > 0.5).float()

    reference = video(1, 36, 60)
    full = dict(reference_image=reference, pose_video=video(7), face_video=video(6, 48, 48),
                background_video=video(11), character_mask=mask(12))
    return {
        "nothing": dict(length=5),  # no reference either: a black one
        "reference_only": dict(length=9, reference_image=reference),
        "pose_face": dict(length=9, reference_image=reference, pose_video=video(12), face_video=video(9, 40, 40)),
        "replacement": dict(length=9, **full),
        "offset": dict(length=9, video_frame_offset=3, **full),
        "offset_past_the_videos": dict(length=5, video_frame_offset=11, **full),  # pose, face, background dropped
        "continue_motion": dict(length=9, video_frame_offset=9, continue_motion=video(8), continue_motion_max_frames=5,
                                **full),
        "continue_one_frame_one_mask": dict(length=13, video_frame_offset=9, continue_motion=video(3),
                                            continue_motion_max_frames=1, reference_image=reference,
                                            background_video=video(20), character_mask=mask(1), batch_size=2),
        "two_reference_frames": dict(length=9, reference_image=video(5), pose_video=video(9)),
    }


def compare(paths: dict) -> dict:
    import comfy.clip_vision
    import comfy.ldm.wan.vae
    from comfy_extras.nodes_wan import WanAnimateToVideo

    from .vae_encode import comfy_vae
    from usp_video.distributed import api
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG

    vae = comfy_vae(paths["vae"], comfy.ldm.wan.vae, {"dim": TINY_VAE_CONFIG["base_dim"]})
    engine = Engine()
    api.encode_video = lambda group, vae_path, frames, on_progress=None: (engine.encode_video(vae_path, frames),
                                                                          "wan2.1")
    g = torch.Generator().manual_seed(21)
    text = [[[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 9, 4096, generator=g), {}]]]
    vision = comfy.clip_vision.Output()
    vision.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
    out = {}
    for name, spec in cases(g).items():
        spec = dict(spec)
        sizes = dict(width=48, height=32, length=spec.pop("length"), batch_size=spec.pop("batch_size", 1),
                     continue_motion_max_frames=spec.pop("continue_motion_max_frames", 5),
                     video_frame_offset=spec.pop("video_frame_offset", 0))
        with torch.inference_mode():
            native = WanAnimateToVideo.execute(*text, vae, clip_vision_output=vision, **sizes, **spec).result
        before = {k: v.clone() for k, v in spec.items()}
        ours = run_node("UspWanAnimateToVideo", positive=text[0], negative=text[1],
                        vae={"group": None, "path": paths["vae"]}, clip_vision_output=vision, **sizes, **spec)
        case = {"counts": [list(ours[3:]), list(native[3:])], "keys": [], "latent_rel": 0.0, "exact": True,
                "inputs_unchanged": all(torch.equal(v, before[k]) for k, v in spec.items())
                and all(not c[1] for c in text[0] + text[1]),  # ComfyUI caches node outputs: nothing mutated
                "latent_equal": bool(torch.equal(ours[2]["samples"], native[2]["samples"]))}
        for mine, theirs in zip(ours[:2], native[:2]):
            (tokens, extra), (native_tokens, native_extra) = mine[0], theirs[0]
            case["keys"].append([sorted(extra), sorted(native_extra)])
            case["exact"] &= tokens is native_tokens and extra.get("clip_vision_output") is vision
            for key, value in native_extra.items():
                if key in LATENT_KEYS:
                    assert extra[key].shape == value.shape, (name, key, extra[key].shape, value.shape)
                    case["latent_rel"] = max(case["latent_rel"], rel(extra[key], value))
                elif isinstance(value, torch.Tensor):
                    case["exact"] &= bool(key in extra and torch.equal(extra[key], value))
        made = native[0][0][1]
        case["shapes"] = {k: list(v.shape) for k, v in made.items() if isinstance(v, torch.Tensor)}
        case["mask_mean"] = float(made["concat_mask"].mean())
        out[name] = case
    return out

"""The tiny Wan 2.2 Animate set, in ComfyUI's on-disk layout (its names: face_adapter.fuser_blocks.*,
motion_encoder.enc.*, the conv biases [1, C, 1, 1], the blur kernels), beside the tiny Wan 2.1 VAE and UMT5:

    diffusion_models/tiny_wan2.2_animate.safetensors        12 heads x 8, text 32 (the tiny UMT5's), 10 blocks (the
                                                            face adapter after blocks 0 and 5), small motion and face
                                                            encoders (16x16 faces): the parity tests and the demo
    diffusion_models/tiny_wan2.2_animate_comfy.safetensors  what ComfyUI's UNETLoader detects and builds: 2 heads x
                                                            128, text 4096, freq 256, 10 blocks, ComfyUI's fixed-size
                                                            motion and face encoders (512x512 faces; ~40M parameters)

Each carries its config in the metadata (the loader reads the shapes of a real file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from ..wan21 import dit as wan
from ..wan21.tiny import TINY_WAN_CONFIG, make_tiny_models as make_wan21_tiny
from ..wan21 import tiny as wan21_tiny
from . import dit

_DIT = dict(TINY_WAN_CONFIG, num_layers=10, in_channels=36, latent_channels=16, image_dim=1280,
            added_kv_proj_dim=TINY_WAN_CONFIG["num_attention_heads"] * TINY_WAN_CONFIG["attention_head_dim"])
for _key in ("qk_norm", "cross_attn_norm", "eps", "rope_max_seq_len", "patch_size"):
    _DIT[_key] = TINY_WAN_CONFIG[_key]
TINY_ANIMATE_CONFIG = dict(_DIT, motion_encoder_size=16, motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8},
                           motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                           face_encoder_num_heads=4)
# ComfyUI's detection: heads = dim // 128, text 4096, freq 256; AnimateWanModel's encoders at their fixed size
TINY_COMFY_CONFIG = dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=2, ffn_dim=256, num_layers=10,
                         in_channels=36, latent_channels=16, image_dim=1280, added_kv_proj_dim=256)
FACE_SIZE = TINY_ANIMATE_CONFIG["motion_encoder_size"]
FILES = {"dit": "diffusion_models/tiny_wan2.2_animate.safetensors",
         "dit_comfy": "diffusion_models/tiny_wan2.2_animate_comfy.safetensors"}
CONFIGS = {"dit": TINY_ANIMATE_CONFIG, "dit_comfy": TINY_COMFY_CONFIG}
_VERSION = "1"


def _config(config: dict) -> dict:
    """The diffusers config without what WanAnimateTransformer3DModel does not take (Wan 2.1's T2V keys)."""
    return {k: v for k, v in config.items() if k not in ("out_channels",)} | {"out_channels": 16}


def tiny_model(config: dict, seed: int):
    """diffusers' WanAnimateTransformer3DModel at this config, random; the parameters diffusers starts at zero (biases,
    the face encoder's padding tokens) random too, so that each part counts in the tests."""
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    model = WanAnimateTransformer3DModel(**_config(config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any():
                param.normal_(0.0, 0.1)
    return model


def make_tiny_models(root: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the set under root (skipped where already written): {"dit", "dit_comfy", "text_encoder", "vae"}."""
    root = Path(root)
    shared = make_wan21_tiny(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-wan2.2-animate"
    if not (stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values())):
        for seed, (name, path) in enumerate(paths.items(), start=61):
            config = _config(CONFIGS[name])
            state = dit.to_comfy_keys(tiny_model(config, seed).state_dict(), config)
            save_safetensors({k: v.to(dtype) for k, v in state.items()}, path,
                             {dit.CONFIG_METADATA_KEY: json.dumps(config)})
        stamp.write_text(_VERSION)
    return {**paths, "text_encoder": shared["text_encoder"], "vae": shared["vae"]}


# -- the tiny debug config (tests/parity_targets.py) -------------------------------------------------------------

def tiny_inputs(shape: tuple[int, int, int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """One forward's positional inputs (latent [2, 36, T, H, W], timesteps, text), as Wan 2.1's tiny_inputs."""
    return wan21_tiny.tiny_inputs(shape, seed, channels=36)


def tiny_animate_conditioning(shape: tuple[int, int, int], seed: int = 4, negative: bool = False,
                              face_size: int = FACE_SIZE, pose_frames: int | None = None,
                              face_frames: int | None = None) -> dict[str, torch.Tensor]:
    """One side as WanAnimateToVideo (+ CLIPVisionEncode) makes it for a latent of shape (T, H, W), the reference
    frame first: the reference then video latents and their mask (0 on the reference frame), CLIP vision features,
    the pose video's latent (T - 1 frames) and the face video (4 (T - 1) - 3 frames; -1 everywhere on the
    negative, as the node makes it)."""
    g = torch.Generator().manual_seed(seed)
    frames = shape[0]
    cond = {"tokens": torch.randn(1, 24, TINY_WAN_CONFIG["text_dim"], generator=g),
            "concat_latent_image": torch.randn(1, 16, *shape, generator=g),
            "concat_mask": torch.ones(1, 4, *shape),
            "clip_vision": torch.randn(1, 257, 1280, generator=g),
            "pose_video_latent": torch.randn(1, 16, frames - 1 if pose_frames is None else pose_frames, *shape[1:],
                                             generator=g)}
    cond["concat_mask"][:, :, 0] = 0.0
    count = max(4 * (frames - 1) - 3, 1) if face_frames is None else face_frames
    face = torch.rand(1, 3, count, face_size, face_size, generator=g) * 2.0 - 1.0
    cond["face_video_pixels"] = face * 0.0 - 1.0 if negative else face
    return cond


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], steps: int = 3, sampler: str = "euler",
                 cfg: float = 2.0, seed: int = 9, pose_frames: int | None = None,
                 face_frames: int | None = None, without: tuple[str, ...] = ()) -> dict:
    """The fields of an Animate SampleRequest on the tiny DiT: both sides conditioned as WanAnimateToVideo does
    (the negative's face -1, its own text), an empty latent with the reference frame. pose_frames / face_frames:
    a pose video latent or face video of another length than the node would make (cut or padded by the model);
    without: the inputs left out on both sides (e.g. no pose or face video: ComfyUI runs without them)."""
    positive = tiny_animate_conditioning(shape, pose_frames=pose_frames, face_frames=face_frames)
    negative = dict(positive, tokens=tiny_animate_conditioning(shape, seed=5)["tokens"],
                    face_video_pixels=positive["face_video_pixels"] * 0.0 - 1.0)
    positive, negative = ({k: v for k, v in side.items() if k not in without} for side in (positive, negative))
    return dict(experts=list(experts), positive=positive, negative=negative, latent=torch.zeros(1, 16, *shape),
                seed=seed, steps=steps, cfg=cfg, shift=5.0, sampler=sampler)

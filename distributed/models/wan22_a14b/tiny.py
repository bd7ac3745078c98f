"""The tiny Wan 2.2 A14B set: two tiny experts (different random weights, the same architecture) in
ComfyUI's file layout and names, beside the tiny Wan 2.1 VAE and UMT5 they share with Wan 2.1:

    diffusion_models/tiny_wan2.2_t2v_high_noise_14B.safetensors
    diffusion_models/tiny_wan2.2_t2v_low_noise_14B.safetensors
    diffusion_models/tiny_wan2.2_i2v_{high,low}_noise_14B.safetensors   image-to-video experts (36 input channels)
    diffusion_models/tiny_wan2.2_fun_control_{high,low}_noise_14B.safetensors   Fun Control experts (52 input
        channels and the reference-image convolution, wan21/dit.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from ..wan21 import dit as wan
from ..wan21.tiny import TINY_WAN_CONFIG, make_tiny_models as make_wan21_tiny, wan_to_original_keys
from ..wan21.tiny import tiny_inputs, tiny_request as _wan21_request

__all__ = ["FILES", "SEEDS", "make_tiny_models", "tiny_inputs", "tiny_request"]

FILES = {"high_noise": "diffusion_models/tiny_wan2.2_t2v_high_noise_14B.safetensors",
         "low_noise": "diffusion_models/tiny_wan2.2_t2v_low_noise_14B.safetensors",
         "i2v_high_noise": "diffusion_models/tiny_wan2.2_i2v_high_noise_14B.safetensors",
         "i2v_low_noise": "diffusion_models/tiny_wan2.2_i2v_low_noise_14B.safetensors",
         "fun_control_high_noise": "diffusion_models/tiny_wan2.2_fun_control_high_noise_14B.safetensors",
         "fun_control_low_noise": "diffusion_models/tiny_wan2.2_fun_control_low_noise_14B.safetensors"}
SEEDS = {"high_noise": 22, "low_noise": 23, "i2v_high_noise": 32, "i2v_low_noise": 33, "fun_control_high_noise": 24,
         "fun_control_low_noise": 25}
TINY_I2V_CONFIG = dict(TINY_WAN_CONFIG, in_channels=wan.I2V_CHANNELS)  # the start video beside the noise, no CLIP
# Wan 2.2 Fun Control A14B, shrunk: control video, mask and start video beside the noise (52 channels), and the
# reference image's 2x2 patch convolution of a 16-channel latent
TINY_FUN_CONTROL_CONFIG = dict(TINY_WAN_CONFIG, in_channels=wan.FUN_CONTROL_A14B_CHANNELS, **{wan.REFERENCE_KEY: 16})
_VERSION = "3"


def make_tiny_models(root: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the set under root (skipped where already written): {"high_noise", "low_noise", the two image-to-video
    and the two Fun Control experts, "text_encoder", "vae"}."""
    root = Path(root)
    shared = make_wan21_tiny(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-wan2.2"
    if not (stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values())):
        for name, path in paths.items():
            torch.manual_seed(SEEDS[name])
            config = {"fun": TINY_FUN_CONTROL_CONFIG, "i2v": TINY_I2V_CONFIG}.get(name.split("_")[0], TINY_WAN_CONFIG)
            expert = wan.build_wan(config)
            save_safetensors({k: v.to(dtype) for k, v in wan_to_original_keys(expert.state_dict()).items()}, path,
                             {wan.CONFIG_METADATA_KEY: json.dumps(config)})
        stamp.write_text(_VERSION)
    return {**paths, "text_encoder": shared["text_encoder"], "vae": shared["vae"]}


# -- the tiny debug config (tests/parity_targets.py): an expert's forward takes Wan 2.1's tiny_inputs --------

def tiny_request(family, experts: list[str], shape: tuple[int, int, int], sampler: str = "unipc",
                 steps: int = 6) -> dict:
    """A run across the switch: shift 12 and boundary 0.875 put it after step 4 of 6; cfg per expert."""
    two = len(experts) == 2
    return dict(_wan21_request(family, experts, shape, steps=steps, sampler=sampler, cfg=4.0), family=family.name,
                shift=12.0, boundaries=[0.875] if two else [], cfg=[4.0, 3.0] if two else 4.0)

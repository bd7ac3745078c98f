"""LTX-2's video VAE and audio VAE, read from an all-in-one checkpoint (`vae.`, `audio_vae.`) into diffusers'
stock AutoencoderKLLTX2Video and AutoencoderKLLTX2Audio.

The names differ from diffusers' by renames only (diffusers' convert_ltx2_vae_to_diffusers and
convert_ltx2_audio_vae_to_diffusers, written for Lightricks' files, say which): the video VAE numbers its encoder
blocks and their downsamplers as one list (down_blocks.0 .. 7, the middle block 8) and its decoder's likewise
(up_blocks.0 the middle block, then upsampler and blocks in turn); `res_blocks` are diffusers' `resnets`; the
latent statistics are `per_channel_statistics.mean-of-means` / `std-of-means` (the file's other statistics are not
used). The configs of the released VAEs are carried (tiny files carry theirs in the metadata).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, read_header

VIDEO_CONFIG_KEY, AUDIO_CONFIG_KEY = "usp_video.ltx2_vae_config", "usp_video.ltx2_audio_vae_config"
# diffusers 0.42's defaults are the released LTX-2 VAEs'
RELEASED_VIDEO_VAE: dict = {}
RELEASED_AUDIO_VAE: dict = {}
TINY_VIDEO_VAE = dict(block_out_channels=(8, 16, 32, 64), decoder_block_out_channels=(8, 16, 32),
                      layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1))
TINY_AUDIO_VAE = dict(base_channels=8, ch_mult=(1, 2), num_res_blocks=1, mel_bins=16)

_STATISTICS = [("latents_mean", "per_channel_statistics.mean-of-means"),
               ("latents_std", "per_channel_statistics.std-of-means")]
UNUSED_STATISTICS = ("per_channel_statistics.channel", "per_channel_statistics.mean-of-stds")


def _video_to_diffusers(key: str) -> str:
    def down(m):  # encoder: blocks at even places, their downsamplers at odd ones, the middle block at 8
        i = int(m[1])
        return "mid_block" if i == 8 else f"down_blocks.{i // 2}" + (".downsamplers.0" if i % 2 else "")

    def up(m):  # decoder: the middle block first, then each block's upsampler and the block
        i = int(m[1])
        return "mid_block" if i == 0 else f"up_blocks.{(i - 1) // 2}" + ("" if i % 2 == 0 else ".upsamplers.0")

    key = re.sub(r"(?<=^encoder\.)down_blocks\.(\d+)", down, key)
    key = re.sub(r"(?<=^decoder\.)up_blocks\.(\d+)", up, key)
    key = key.replace("res_blocks", "resnets")
    return {old: new for new, old in _STATISTICS}.get(key, key)


def _video_to_original(key: str) -> str:
    for new, old in _STATISTICS:
        if key == new:
            return old
    key = key.replace("resnets", "res_blocks")
    if re.match(r"(en|de)coder\.mid_block\.", key):
        return key.replace("mid_block", "down_blocks.8" if key.startswith("encoder.") else "up_blocks.0", 1)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)(\.downsamplers\.0)?",
                 lambda m: f"encoder.down_blocks.{2 * int(m[1]) + bool(m[2])}", key)
    return re.sub(r"^decoder\.up_blocks\.(\d+)(\.upsamplers\.0)?",
                  lambda m: f"decoder.up_blocks.{2 * int(m[1]) + (1 if m[2] else 2)}", key)


def convert_video_vae(state: dict) -> dict:
    """The `vae.` tensors (prefix removed) -> AutoencoderKLLTX2Video names; the file's other parts left out."""
    return {_video_to_diffusers(k): v for k, v in state.items()
            if k.startswith(("encoder.", "decoder.", "per_channel_statistics.")) and k not in UNUSED_STATISTICS}


def convert_audio_vae(state: dict) -> dict:
    """The `audio_vae.` tensors (prefix removed) -> AutoencoderKLLTX2Audio names."""
    renames = {old: new for new, old in _STATISTICS}
    return {renames.get(k, k): v for k, v in state.items()
            if k.startswith(("encoder.", "decoder.", "per_channel_statistics.")) and k not in UNUSED_STATISTICS}


def video_vae_to_original(state: dict) -> dict:
    """AutoencoderKLLTX2Video names -> the file's (under `vae.`), the unused statistics added (the tiny set)."""
    out = {f"vae.{_video_to_original(k)}": v for k, v in state.items()}
    channels = state["latents_mean"].shape[0]
    out.update({f"vae.{k}": torch.zeros(channels) for k in UNUSED_STATISTICS})
    return out


def audio_vae_to_original(state: dict) -> dict:
    renames = dict(_STATISTICS)
    return {f"audio_vae.{renames.get(k, k)}": v for k, v in state.items()}


# the two VAEs: (diffusers class, the file's prefix, our metadata key, released config, key conversion, what)
_PARTS = {"video": ("AutoencoderKLLTX2Video", "vae", VIDEO_CONFIG_KEY, RELEASED_VIDEO_VAE, convert_video_vae),
          "audio": ("AutoencoderKLLTX2Audio", "audio_vae", AUDIO_CONFIG_KEY, RELEASED_AUDIO_VAE, convert_audio_vae)}


def _load(kind: str, path: str | Path, dtype: torch.dtype, device: torch.device | str):
    import diffusers

    class_name, part, key, released, convert = _PARTS[kind]
    path = Path(path)
    shapes, metadata = read_header(path)
    if not any(name.startswith(f"{part}.") for name in shapes):
        raise CheckpointError(f"{path.name} holds no {part}. tensors: an all-in-one LTX-2 checkpoint (such as "
                              f"ltx-2-19b-dev.safetensors) carries the LTX-2 VAEs")
    config = config_from_metadata(metadata, key) or dict(released)
    return streamed.load(lambda: getattr(diffusers, class_name)(**config), path, convert, dtype, device,
                         f"the LTX-2 {kind} VAE", prefixes=(f"{part}.",))


def load_video_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    return _load("video", path, dtype, device)


def load_audio_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    return _load("audio", path, dtype, device)


def vae_metadata() -> dict[str, str]:
    """The tiny VAEs' configs, as an all-in-one tiny file carries them."""
    return {VIDEO_CONFIG_KEY: json.dumps(TINY_VIDEO_VAE), AUDIO_CONFIG_KEY: json.dumps(TINY_AUDIO_VAE)}

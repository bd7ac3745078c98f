"""LTX-2's vocoder (mel spectrogram -> waveform), read from an all-in-one checkpoint (`vocoder.`) into diffusers'
stock LTX2Vocoder (the HiFi-GAN of LTX-2; LTX-2.3's vocoder with bandwidth extension is not read yet).

diffusers 0.42.1 has no converter for it; the file's names are those of Lightricks' / ComfyUI's Vocoder
(comfy/ldm/lightricks/vocoders/vocoder.py): conv_pre, ups.<i>, resblocks.<k>.convs1/convs2.<j>, conv_post, which
diffusers calls conv_in, upsamplers, resnets, conv_out. The strides are not in the weights: the config comes from
the file's own config metadata (its "vocoder" part, in Lightricks' names), or ours for the tiny set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, read_header

CONFIG_KEY = "usp_video.ltx2_vocoder_config"
TINY_VOCODER = dict(in_channels=32, hidden_channels=16, out_channels=2, upsample_kernel_sizes=[4, 4],
                    upsample_factors=[2, 2], resnet_kernel_sizes=[3, 5], resnet_dilations=[[1, 3], [1, 3]])
_RENAMES = [("conv_pre.", "conv_in."), ("ups.", "upsamplers."), ("resblocks.", "resnets."), ("conv_post.", "conv_out.")]
# Lightricks' vocoder config names -> diffusers' (in_channels: 128 stereo, 64 mono mel channels x bins)
_FILE_CONFIG = {"upsample_initial_channel": "hidden_channels", "upsample_rates": "upsample_factors",
                "upsample_kernel_sizes": "upsample_kernel_sizes", "resblock_kernel_sizes": "resnet_kernel_sizes",
                "resblock_dilation_sizes": "resnet_dilations", "use_bias_at_final": "final_bias"}


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def convert_vocoder(state: dict) -> dict:
    """The `vocoder.` tensors (prefix removed) -> LTX2Vocoder names."""
    return {_rename(k, _RENAMES): v for k, v in state.items()
            if k.startswith(tuple(old for old, _ in _RENAMES))}


def vocoder_to_original(state: dict) -> dict:
    """LTX2Vocoder names -> the file's, under `vocoder.` (the tiny set)."""
    return {f"vocoder.{_rename(k, [(new, old) for old, new in _RENAMES])}": v for k, v in state.items()}


def vocoder_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The LTX2Vocoder config of a file: ours (tiny), else from the "vocoder" part of the file's config metadata."""
    if any(k.startswith(("vocoder.bwe_generator.", "vocoder.vocoder.")) for k in shapes):
        raise CheckpointError(f"{path.name}: its vocoder has a bandwidth extension (LTX-2.3), which is not supported "
                              "yet; use an LTX-2 checkpoint (ltx-2-19b-dev)")
    if "vocoder.conv_pre.weight" not in shapes:
        raise CheckpointError(f"{path.name} holds no vocoder (vocoder.conv_pre.weight): an all-in-one LTX-2 "
                              "checkpoint such as ltx-2-19b-dev.safetensors carries it")
    config = config_from_metadata(metadata, CONFIG_KEY)
    if config is not None:
        return config
    try:
        given = json.loads(metadata.get("config", "{}")).get("vocoder", {})
    except (json.JSONDecodeError, AttributeError):
        given = {}
    if given.get("resblock", "1") != "1" or "upsample_rates" not in given:
        raise CheckpointError(f"{path.name}: its config metadata does not describe a HiFi-GAN vocoder (resblock '1' "
                              f"with upsample_rates); got {sorted(given) or 'none'}")
    config = {new: given[old] for old, new in _FILE_CONFIG.items() if old in given}
    config["in_channels"] = shapes["vocoder.conv_pre.weight"][0][1]
    config["out_channels"] = shapes["vocoder.conv_post.weight"][0][0]
    return config


def load_vocoder(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    path = Path(path)
    shapes, metadata = read_header(path)
    config = vocoder_config(path, shapes, metadata)
    return streamed.load(lambda: LTX2Vocoder(**config), path, convert_vocoder, dtype, device, "the LTX-2 vocoder",
                         prefixes=("vocoder.",))

"""The Wan 2.2 VAE's single file (wan2.2_vae.safetensors: the module tree of ComfyUI's
comfy/ldm/wan/vae2_2.py WanVAE, the original Wan 2.2 names) and diffusers' AutoencoderKLWan
(is_residual=True): key names both ways, the config read off the tensor shapes, and the test that
tells the file from the Wan 2.1 VAE's.

Key rules, ComfyUI -> diffusers (M is encoder or decoder; I a block, J a layer in it):

    conv1.*, conv2.*                         -> quant_conv.*, post_quant_conv.*
    M.conv1.*                                -> M.conv_in.*
    M.head.0.*, M.head.2.*                   -> M.norm_out.*, M.conv_out.*
    M.middle.0.*, M.middle.2.*               -> M.mid_block.resnets.0.*, M.mid_block.resnets.1.*
    M.middle.1.*                             -> M.mid_block.attentions.0.*
    encoder.downsamples.I.downsamples.J.*    -> encoder.down_blocks.I.resnets.J.*
    decoder.upsamples.I.upsamples.J.*        -> decoder.up_blocks.I.resnets.J.*
    ... a block's Resample (the layer whose parameters are resample.1.* and time_conv.*)
                                             -> encoder.down_blocks.I.downsampler.*,
                                                decoder.up_blocks.I.upsampler.*
    in a residual block: residual.0, residual.2, residual.3, residual.6, shortcut
                                             -> norm1, conv1, norm2, conv2, conv_shortcut

The attention's names (norm, to_qkv, proj) and the Resample's are the same on both sides; the
shortcuts of the residual up/down blocks (AvgDown3D, DupUp3D) have no parameters. Going back, a
block's Resample is its layer J = its number of residual blocks (num_res_blocks in the encoder, one
more in the decoder).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from torch import Tensor

_RESNET_LAYERS = [("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"),
                  ("residual.6", "conv2"), ("shortcut", "conv_shortcut")]
_RESAMPLE = r"(?=resample\.|time_conv\.)"  # followed by a Resample's parameter names

# Applied in order, each once, to every key (the residual-layer rules first: they only see names
# inside a residual block, before the block rules rename it).
_TO_DIFFUSERS = [
    *[(rf"\.{re.escape(comfy)}\.", f".{diffusers}.") for comfy, diffusers in _RESNET_LAYERS],
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (rf"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.{_RESAMPLE}", r"encoder.down_blocks.\1.downsampler."),
    (rf"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.{_RESAMPLE}", r"decoder.up_blocks.\1.upsampler."),
    (r"^encoder\.downsamples\.(\d+)\.downsamples\.", r"encoder.down_blocks.\1.resnets."),
    (r"^decoder\.upsamples\.(\d+)\.upsamples\.", r"decoder.up_blocks.\1.resnets."),
]


def _to_comfy_rules(encoder_resnets: int, decoder_resnets: int) -> list[tuple[str, str]]:
    """The inverse of _TO_DIFFUSERS; a block's Resample goes after its residual blocks."""
    return [
        *[(rf"(resnets\.\d+\.){re.escape(diffusers)}\.", rf"\g<1>{comfy}.") for comfy, diffusers in _RESNET_LAYERS],
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{encoder_resnets}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{decoder_resnets}."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.downsamples.\1.downsamples."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.upsamples.\1.upsamples."),
    ]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many different numbers the group of `pattern` takes among `keys`."""
    return len({m[1] for key in keys if (m := re.match(pattern, key))})


def comfy_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Wan 2.2 VAE state dict in ComfyUI's / the original names, renamed for diffusers' AutoencoderKLWan."""
    return {_rename(key, _TO_DIFFUSERS): value for key, value in state.items()}


def diffusers_to_comfy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of comfy_to_diffusers: an AutoencoderKLWan (Wan 2.2) state dict in ComfyUI's names."""
    rules = _to_comfy_rules(_count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                            _count(state, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
    return {_rename(key, rules): value for key, value in state.items()}


def is_wan22_vae(keys: set[str]) -> bool:
    """A Wan 2.2 VAE file in ComfyUI's names (ComfyUI's own test): the Wan VAEs' middle block, and the
    decoder's residual up blocks (the Wan 2.1 VAE has decoder.upsamples.0.residual.* instead)."""
    return ("decoder.middle.0.residual.0.gamma" in keys
            and "decoder.upsamples.0.upsamples.0.residual.2.weight" in keys)


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKLWan's kwargs for a Wan 2.2 VAE file in ComfyUI's names, from its tensor shapes
    (name -> shape): the real file's (base 160, decoder base 256, z 48) or any smaller one.

    latents_mean / latents_std are not in the file and not returned (diffusers' VAE does not use them
    in encode or decode); a caller that wants them in the config adds the family's."""
    base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
    levels = _count(shapes, r"encoder\.downsamples\.(\d+)\.")
    num_res_blocks = _count(shapes, r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.")
    dim_mult = [shapes[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"][0] // base_dim
                for i in range(levels)]
    temperal_downsample = [f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.weight" in shapes
                           for i in range(levels - 1)]
    patch_size = math.isqrt(in_channels // 3)  # RGB in patch_size x patch_size patches as channels
    return {
        "base_dim": base_dim,
        "decoder_base_dim": shapes["decoder.conv1.weight"][0] // dim_mult[-1],
        "z_dim": shapes["conv2.weight"][0],
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temperal_downsample,
        "is_residual": True,
        "in_channels": in_channels,
        "out_channels": shapes["decoder.head.2.weight"][0],
        "patch_size": patch_size,
        "scale_factor_temporal": 2 ** sum(temperal_downsample),
        "scale_factor_spatial": patch_size * 2 ** (levels - 1),
    }

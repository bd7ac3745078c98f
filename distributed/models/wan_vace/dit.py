"""The Wan VACE DiT: diffusers' WanVACETransformer3DModel (Wan 2.1's blocks plus VACE blocks that turn a control
context into hints added to the video tokens at some layers), loaded by the streamed loader into a thin subclass
(VaceTransformer) and parallelized from outside by `parallelize_vace`.

Why a thin subclass (VaceTransformer: diffusers' class, its weights, config and names, one more way to call it):
diffusers' forward takes one control context with one scale per VACE layer; ComfyUI (comfy/ldm/wan/model.py
VaceWanModel) takes K stacked contexts (several WanVaceToVideo nodes), each run through the VACE blocks on its own
and added with its own strength. Called with `vace_strength`, it runs `stacked_forward`, ComfyUI's loop on
diffusers' modules: after main block i at a VACE layer, each context's VACE block runs and its hint times that
context's strength is added to the video tokens; without, diffusers' own forward. With one context both agree
(tests/test_wan_vace.py). The call goes through the module, so FSDP's root hooks gather its own weights.

USP: parallelize_wan's hooks (the video tokens sharded entering block 0, RoPE sharded, gathered after proj_out),
and, on the first VACE block, the control tokens sharded exactly as the video tokens (the same padding and
layout) with the patch-embedded video they are added to; the VACE blocks' self-attention runs USP attention over
the shards, their cross-attention to the text is local; a rank's hints are for its own video tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed
from ...parallel.mesh import SequenceParallel
from ...parallel.sharding import shard_sequence
from ...parallel.usp_attention import KeyLayout
from ..family import SequenceHooks
from ..wan21 import dit as wan

# ComfyUI's WanVaceToVideo: 16 inactive + 16 reactive latent channels, and the 8x8 pixel mask of each latent
# position on 64 channels; the model's VACE input is both (96)
FRAME_CHANNELS, MASK_CHANNELS = 32, 64
KEEP_WITHIN = ("blocks.", "vace_blocks.")  # the blocks whose Linear weights may stay fp8


def vace_layers(num_layers: int, count: int, name: str) -> list[int]:
    """The main blocks after which the VACE blocks' hints are added: ComfyUI's vace_layers_mapping,
    range(0, layers, layers // count) (0, 2, ..., 28 for the 1.3B; 0, 5, ..., 35 for the 14B)."""
    if not 0 < count <= num_layers:
        raise CheckpointError(f"{name}: {count} VACE blocks for {num_layers} layers")
    layers = list(range(0, num_layers, num_layers // count))
    if len(layers) != count:
        raise CheckpointError(f"{name}: {count} VACE blocks do not spread evenly over {num_layers} layers "
                              f"(ComfyUI maps them to layers {layers})")
    return layers


def infer_vace_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers WanVACETransformer3DModel config of a VACE single file: our metadata's, else Wan 2.1's
    (matched by shapes) with the VACE blocks counted and the VACE input channels read, as ComfyUI's detection."""
    config = config_from_metadata(metadata, wan.CONFIG_METADATA_KEY)
    if config is not None and "vace_layers" in config:
        return config
    config = wan.infer_wan_config(path, shapes, metadata)
    stripped = unprefixed(shapes)
    count = 1 + max(int(k.split(".")[1]) for k in stripped if k.startswith("vace_blocks."))
    return dict(config, vace_layers=vace_layers(config["num_layers"], count, path.name),
                vace_in_channels=stripped["vace_patch_embedding.weight"][0][1])


@functools.cache
def vace_class():
    """VaceTransformer, diffusers' WanVACETransformer3DModel that also takes K stacked contexts (module docstring)."""
    from diffusers import WanVACETransformer3DModel

    class VaceTransformer(WanVACETransformer3DModel):
        def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                    control_hidden_states=None, control_hidden_states_scale=None, return_dict=True,
                    attention_kwargs=None, vace_strength=None):
            """diffusers' forward; with vace_strength [B, K], control_hidden_states holds K contexts
            [B, K, 96, T, H, W] (stacked_forward) and a tuple (velocity,) comes back."""
            if vace_strength is None:
                return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                       control_hidden_states, control_hidden_states_scale, return_dict,
                                       attention_kwargs)
            return (stacked_forward(self, hidden_states, timestep, encoder_hidden_states, control_hidden_states,
                                    vace_strength),)

    VaceTransformer.__name__ = VaceTransformer.__qualname__ = "VaceTransformer"
    return VaceTransformer


def load_vace_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          keep_fp8: bool = True, shard=None):
    """A Wan VACE DiT from a ComfyUI/original single file (streamed, each rank reading only its shards with
    shard) or a diffusers WanVACETransformer3DModel folder, as wan21.dit.load_wan_transformer."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    if path.is_dir():
        return from_folder(vace_class(), path, dtype, device,
                           "a diffusers WanVACETransformer3DModel folder (the 'transformer' subfolder of a Wan VACE "
                           "pipeline)", shard)
    shapes, metadata = read_header(path)
    config = infer_vace_config(path, shapes, metadata)
    model = streamed.load(lambda: vace_class()(**config), path, convert_wan_transformer_to_diffusers,
                          dtype, device, "the Wan VACE architecture", keep_within=KEEP_WITHIN if keep_fp8 else (),
                          shard=shard, ignore_unexpected=("norm_added_q",), comfy_dit=True)
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size,
                                  model.config.rope_max_seq_len).to(device)
    return model


def control_conditioning(video: torch.Tensor, mask: torch.Tensor, encode, stride: int = 8
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """WanVaceToVideo's control part (no reference image): video [L, H, W, 3] in 0..1 and mask [L, H, W, 1] (1:
    generate, 0: keep) at the video's size -> (vace_frames [1, 32, T, h, w]: the inactive and reactive videos'
    latents, encode(frames) -> [1, 16, T, h, w]; vace_mask [1, 64, T, h, w]: each latent position's stride x stride
    pixels of the mask, nearest-exact in time)."""
    length, height, width = video.shape[:3]
    centred = video - 0.5
    inactive, reactive = encode(centred * (1 - mask) + 0.5), encode(centred * mask + 0.5)
    frames = torch.cat([inactive, reactive], dim=1)
    rows, columns = height // stride, width // stride
    # (L, h*s, w*s, 1) -> (s, s, L, h, w) -> (s*s, L, h, w), then L -> T latent frames
    pixels = mask.reshape(length, rows, stride, columns, stride).permute(2, 4, 0, 1, 3)
    pixels = pixels.reshape(stride * stride, length, rows, columns)
    latent_mask = torch.nn.functional.interpolate(pixels[None], size=(frames.shape[2], rows, columns),
                                                  mode="nearest-exact")
    return frames, latent_mask


def stacked_forward(model, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, contexts: torch.Tensor,
            strengths: torch.Tensor) -> torch.Tensor:
    """The flow velocity [B, C, T, H, W] of a WanVACETransformer3DModel for x [B, C, T, H, W] at timesteps t [B],
    with text tokens [B, L, D], K control contexts [B, K, 96, T, H, W] (the model's space: ComfyUI's
    vace_context) and their strengths [B, K]."""
    batch, _, frames, height, width = x.shape
    p_t, p_h, p_w = model.config.patch_size
    if contexts.shape[-3:] != x.shape[-3:]:
        raise ValueError(f"the VACE context is {tuple(contexts.shape[-3:])} frames x rows x columns, the latent "
                         f"{tuple(x.shape[-3:])}")
    rotary_emb = model.rope(x)
    hidden = model.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, C, T, H, W) -> (B, S, D)
    count = contexts.shape[1]
    # (B, K, 96, T, H, W) -> (B*K, S, D) -> K contexts of (B, S, D)
    control = model.vace_patch_embedding(contexts.flatten(0, 1)).flatten(2).transpose(1, 2)
    control = list(control.unflatten(0, (batch, count)).unbind(1))
    temb, timestep_proj, text, _ = model.condition_embedder(t, tokens, None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    embedded = hidden  # what the first VACE block adds to each context (ComfyUI's x_orig)
    at_layer = {layer: n for n, layer in enumerate(model.config.vace_layers)}
    for i, block in enumerate(model.blocks):
        hidden = block(hidden, text, timestep_proj, rotary_emb)
        n = at_layer.get(i)
        if n is None:
            continue
        for k in range(count):
            hint, control[k] = model.vace_blocks[n](embedded, text, control[k], timestep_proj, rotary_emb)
            hidden = hidden + hint * strengths[:, k].to(hint.dtype).view(-1, 1, 1)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = model.proj_out(hidden)  # gathered here under USP (parallelize_wan)
    hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    # (B, T', H', W', pt, ph, pw, C) -> (B, C, T, H, W)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def parallelize_vace(model, sp: SequenceParallel, backend: str = "sdpa") -> SequenceHooks:
    """Sequence parallelism on a WanVACETransformer3DModel in place: Wan 2.1's hooks on the main blocks, USP
    attention in the VACE blocks, and their inputs (the control tokens and the patch-embedded video) sharded
    entering the first VACE block exactly as the video tokens are entering the first main block."""
    hooks = wan.parallelize_wan(model, sp, backend)
    state = hooks.state
    processor = wan.UspWanAttnProcessor(sp, backend, state)
    for block in model.vace_blocks:
        block.attn1.set_processor(processor)
        block.attn2.set_processor(processor)

    def shard_control(module, args):
        embedded, text, control, *rest = args  # (B, S, D) each, the whole sequence
        if embedded.shape[1] != control.shape[1]:
            raise ValueError(f"{control.shape[1]} control tokens for {embedded.shape[1]} video tokens")
        local = shard_sequence(embedded, 1, sp)  # (B, S, D) -> (B, S/N, D), the video tokens' padding and split
        state.valid_len = embedded.shape[1]
        state.layout = KeyLayout.tail_padded(state.valid_len, local.shape[1], sp)
        return (local, text, shard_sequence(control, 1, sp), *rest)

    model.vace_blocks[0].register_forward_pre_hook(shard_control)
    return hooks


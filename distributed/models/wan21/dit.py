"""Wan 2.1 text-to-video DiT: loading (ComfyUI single files, diffusers folders) and USP.

The model definition is diffusers' WanTransformer3DModel, unchanged. `parallelize_wan` applies
sequence parallelism from outside, torchtitan-style:
  - the RoPE tables and the patch tokens entering block 0 are padded and sliced per rank (per-token
    timesteps, the 5B's under a noise mask, too, before their embedding),
  - self-attention (attn1) runs USP attention over the shards; text cross-attention (attn2)
    stays local, every rank holding the whole text,
  - the output of proj_out is all-gathered and unpadded before unpatchify.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...parallel.mesh import SequenceParallel
from ...parallel.sharding import gather_sequence, shard_sequence
from ...parallel.usp_attention import KeyLayout, attention, usp_attention
from ...formats import streamed
from ..family import SequenceHooks
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed

CONFIG_METADATA_KEY = "usp_video.wan_config"

_COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
               freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
               added_kv_proj_dim=None, rope_max_seq_len=1024)

# The configs of the released checkpoints, carried so that nothing is fetched at run time.
WAN_VARIANTS = {
    "wan2.1-t2v-1.3b": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan2.2-ti2v-5b": dict(_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                           out_channels=48),
}
# Image to video (Wan 2.1 I2V 14B, 480p and 720p; Wan 2.2 I2V A14B): 36 input channels, the noisy latent then
# the start video's (4 mask channels, 16 latent channels). Wan 2.1's also attends to CLIP vision features
# (ViT-H's penultimate hidden states, 257 x 1280) through an image embedder and its own keys in cross-attention.
I2V_CHANNELS = 36
CLIP_VISION_DIM = 1280
# Wan 2.1 Fun Control (VideoX-Fun's Wan2.1-Fun-1.3B/14B-Control; ComfyUI's WAN21_FunControl2V): 48 input channels,
# the noisy latent then the control video's latent and the start video's (16 each, no mask), and Wan 2.1 I2V's
# CLIP vision image embedder. (Fun InP has the I2V layout: 36 channels.)
FUN_CONTROL_CHANNELS = 48
# Wan 2.2 Fun Control A14B (its experts; ComfyUI loads them as WAN21_T2V): 52 input channels, the noisy latent then
# the control video's 16, a mask on 4 and the start video's 16 (Wan22FunControlToVideo: concat_mask_index 16), and
# a reference image: `ref_conv`, a 2x2 patch convolution whose tokens (one latent frame's worth) go in front of
# the video tokens, at the RoPE positions of a frame before the first (ComfyUI's WanModel; diffusers has none).
FUN_CONTROL_A14B_CHANNELS = 52
REFERENCE_KEY = "ref_channels"  # the config entry of ref_conv's input channels (not a diffusers argument)

# Wan 2.1 latent normalisation (ComfyUI latent_format.Wan21, diffusers AutoencoderKLWan config).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]

def infer_wan_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers config of a Wan single file: from our metadata, else matched by shapes."""
    shapes = unprefixed(shapes)
    keys = set(shapes)
    if "head.modulation" not in keys or "patch_embedding.weight" not in keys:
        from .. import describe_keys

        family = describe_keys(shapes)
        raise CheckpointError(f"{path.name} is not a Wan 2.1 diffusion model ({family}); "
                              "pick a Wan 2.1 T2V file such as wan2.1_t2v_1.3B_fp16.safetensors")
    if "img_emb.emb_pos" in keys:
        raise CheckpointError(f"{path.name} is Wan 2.1 FLF2V (first and last frame, two CLIP vision images), which is "
                              "not supported yet; Wan 2.1 I2V and Wan 2.2 I2V A14B are (a last frame too, for the latter)")
    if "face_adapter.fuser_blocks.0.k_norm.weight" in keys or any(k.startswith("motion_encoder.") for k in keys):
        raise CheckpointError(f"{path.name} is Wan 2.2 Animate (face adapter, motion encoder): load it as a Wan 2.2 "
                              "Animate model (the USP loader detects it; family wan2.2-animate)")
    if "control_adapter.conv.weight" in keys:
        raise CheckpointError(f"{path.name} is a Wan Fun camera-control model (its control_adapter), which is not "
                              "supported yet; Wan 2.1 / 2.2 Fun Control and Fun InP are")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY)
    if config is not None:
        return _with_reference(config, shapes)
    hidden, channels = shapes["patch_embedding.weight"][0][:2]
    layers = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    for variant in WAN_VARIANTS.values():
        if (variant["num_attention_heads"] * 128, variant["num_layers"]) == (hidden, layers):
            # the input channels tell T2V (16) from I2V (36) of one size; the families check them
            # the input channels tell T2V (16) from I2V (36) and Fun Control (48) of one size, the head's output
            # channels a TI2V-5B file (48 out) from Wan 2.1 Fun Control (16 out); the families check them
            out_channels = shapes["head.head.weight"][0][0] // 4 if "head.head.weight" in shapes else variant["out_channels"]
            config = dict(variant, in_channels=channels, out_channels=out_channels)
            if "img_emb.proj.0.weight" in keys:  # Wan 2.1 I2V: the CLIP vision image embedder
                config.update(image_dim=shapes["img_emb.proj.0.weight"][0][0], added_kv_proj_dim=hidden)
            return _with_reference(config, shapes)
    raise CheckpointError(f"{path.name}: a Wan DiT with hidden size {hidden}, {layers} layers and {channels} input "
                          f"channels matches no known variant ({', '.join(WAN_VARIANTS)})")


def _with_reference(config: dict, shapes: dict) -> dict:
    """The config with ref_conv's input channels where the file has a reference-image convolution."""
    shape = (shapes.get("ref_conv.weight") or [[]])[0]
    return dict(config, **{REFERENCE_KEY: shape[1]}) if len(shape) == 4 else config


def build_wan(config: dict):
    """diffusers' WanTransformer3DModel of a config (infer_wan_config's), with ComfyUI's reference-image
    convolution `ref_conv` beside it where the config has one (Wan 2.2 Fun Control); `reference_input` is what
    the next forward takes as the reference latent ([B, C, H, W], the model's space; None: no reference tokens)."""
    from diffusers import WanTransformer3DModel

    config = dict(config)
    ref_channels = config.pop(REFERENCE_KEY, None)
    model = WanTransformer3DModel(**config)
    if ref_channels:
        patch = tuple(config["patch_size"][1:])
        model.ref_conv = torch.nn.Conv2d(ref_channels, config["num_attention_heads"] * config["attention_head_dim"],
                                         kernel_size=patch, stride=patch)
        model.reference_input = None
    return model


def check_input_channels(name: str, config: dict, expected: int | tuple[int, ...], label: str) -> None:
    """CheckpointError when a Wan DiT's input channels are not (one of) those of the family loading it."""
    channels = config.get("in_channels", 16)
    if channels in (expected if isinstance(expected, tuple) else (expected,)):
        return
    kinds = {16: "a Wan 2.1 / Wan 2.2 A14B text-to-video model (16 input channels)",
             36: "a Wan image-to-video or Fun InP model (36 input channels: latent, mask and image)",
             48: ("Wan 2.2 TI2V-5B (48 input channels, the Wan 2.2 VAE's latent)" if config.get("out_channels") == 48
                  else "Wan 2.1 Fun Control (48 input channels: latent, control video and start video)"),
             52: "a Wan 2.2 Fun Control A14B expert (52 input channels: latent, control video, mask, start video)"}
    raise CheckpointError(f"{name} is {kinds.get(channels, f'a Wan DiT with {channels} input channels')}, not {label}")


def load_wan_transformer(path: str | Path, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", keep_fp8: bool = True, shard=None):
    """Load a Wan DiT from a ComfyUI/original single .safetensors file or a diffusers folder.
    A single file is read tensor by tensor into a model built on the meta device (formats/streamed.py);
    with shard(model) (FSDP2 over the ranks), each rank reads only its shards. The Linear weights of an
    fp8 file stay in fp8 (formats/fp8.py) unless keep_fp8 is False."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    if path.is_dir():
        return from_folder(WanTransformer3DModel, path, dtype, device,
                           "a diffusers WanTransformer3DModel folder (the 'transformer' subfolder of a Wan pipeline)",
                           shard)

    shapes, metadata = read_header(path)
    config = infer_wan_config(path, shapes, metadata)
    model = streamed.load(lambda: build_wan(config), path, convert_wan_transformer_to_diffusers,
                          dtype, device, "the Wan architecture", keep_within=("blocks.",) if keep_fp8 else (),
                          shard=shard, ignore_unexpected=("norm_added_q",), comfy_dit=True)
    # The RoPE tables are non-persistent buffers, not in the file: build them for real.
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size,
                                  model.config.rope_max_seq_len).to(device)
    return model


# TeaCache's published rescaling polynomials for Wan 2.1 T2V, highest degree first (ali-vilab/TeaCache,
# TeaCache4Wan2.1/teacache_generate.py, use_ret_steps=True: measured on e0, the timestep projection).
TEACACHE_WAN21_1_3B = [-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02]
TEACACHE_WAN21_14B = [-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01]


# MagCache's published magnitude ratios for Wan 2.1 T2V at 50 steps, the conditional and unconditional passes
# interleaved, after a padding of two 1.0 (Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py).
MAGCACHE_WAN21_1_3B = [1.0] * 2 + [
    1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586, 0.99416,
    0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539,
    0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419,
    0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927, 0.9927, 0.99228, 0.99226,
    0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003, 0.98944, 0.98942, 0.98849, 0.98849, 0.98758,
    0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718,
    0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402,
    0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939]
MAGCACHE_WAN21_14B = [1.0] * 2 + [
    1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476, 0.99467,
    0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517,
    0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418,
    0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163, 0.99161,
    0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573,
    0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543,
    0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511,
    0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as diffusers' WanAttnProcessor (interleaved real/imaginary pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _ShardState:
    """What the attention processors need to know about the current forward."""

    valid_len: int = 0
    layout: KeyLayout | None = None  # which keys are real, computed once per forward
    entered: torch.Tensor | None = None  # tokens already sharded before the first block (by a step cache)
    image_len: int = 0  # image-to-video: the CLIP vision tokens in front of the text (the image embedder's output)


class UspWanAttnProcessor:
    """WanAttention processor: USP attention for self-attention, local attention for text (and, in Wan 2.1
    I2V, for the CLIP vision tokens, which every rank holds whole like the text). The image tokens are split
    from the text by their count (state.image_len), as ComfyUI's WanModel does, not by assuming 512 text
    tokens as diffusers' own processor does (a longer prompt would shift its split)."""

    def __init__(self, sp: SequenceParallel, backend: str, state: _ShardState):
        self.sp, self.backend, self.state = sp, backend, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        image = None
        if attn.add_k_proj is not None:
            # Without CLIP vision tokens (Fun Control, whose clip_vision_output is optional) ComfyUI's
            # WanI2VCrossAttention slices context[:, :None]: the text tokens go through the image keys too.
            image = encoder_hidden_states[:, :self.state.image_len] if self.state.image_len else encoder_hidden_states
            encoder_hidden_states = encoder_hidden_states[:, self.state.image_len:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        # (B, S, H*D) -> (B, S, H, D)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _apply_rotary_emb(query, *rotary_emb), _apply_rotary_emb(key, *rotary_emb)
        if encoder_hidden_states is None:
            out = usp_attention(query, key, value, self.sp, self.state.layout, self.backend)
        else:
            out = attention(query, key, value, self.backend)
        out = out.flatten(2, 3).type_as(query)
        if image is not None:  # the image's own keys and values, attended by the same queries, added
            key_image, value_image = _get_added_kv_projections(attn, image)
            key_image = attn.norm_added_k(key_image)
            key_image, value_image = (t.unflatten(2, (attn.heads, -1)) for t in (key_image, value_image))
            out = out + attention(query, key_image, value_image, self.backend).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def parallelize_wan(model, sp: SequenceParallel, backend: str = "sdpa") -> SequenceHooks:
    """Apply sequence parallelism to a WanTransformer3DModel in place (see module docstring); the module comes
    back in the SequenceHooks, with the state its hooks share with the step caches."""
    state = _ShardState()
    processor = UspWanAttnProcessor(sp, backend, state)
    for block in model.blocks:
        block.attn1.set_processor(processor)
        block.attn2.set_processor(processor)

    def shard_rope(module, args, output):
        return tuple(shard_sequence(t, 1, sp) for t in output)  # (1, S, 1, D) -> (1, S/N, 1, D)

    def shard_tokens(module, args):
        hidden_states, *rest = args  # (B, S, C) patch tokens
        if hidden_states is state.entered:  # sharded already, by enter_blocks
            state.entered = None
            return None
        state.valid_len = hidden_states.shape[1]
        local = shard_sequence(hidden_states, 1, sp)
        state.layout = KeyLayout.tail_padded(state.valid_len, local.shape[1], sp)
        return (local, *rest)

    def enter_blocks(args):
        """The first block's arguments with the tokens sharded (what its pre-hook does), for a step cache
        that may skip the block; the hook then leaves these tokens as they are."""
        args = shard_tokens(None, args)
        state.entered = args[0]
        return args

    def gather_tokens(module, args, output):
        return gather_sequence(output, 1, sp, state.valid_len)  # (B, S/N, C') -> (B, S, C')

    def shard_timesteps(module, args, kwargs):
        """Per-token timesteps (Wan 2.2 TI2V-5B under a noise mask: [B*S], timestep_seq_len S) are sharded as the
        tokens are, padding included, before they are embedded: each rank embeds its own tokens' (the blocks'
        timestep_proj and the output norm's temb then match the token shard)."""
        seq_len = kwargs.get("timestep_seq_len")
        if seq_len is None:  # one timestep per sample
            return None
        timestep, *rest = args
        local = shard_sequence(timestep.unflatten(0, (-1, seq_len)), 1, sp)  # (B, S) -> (B, S/N)
        return (local.flatten(), *rest), {**kwargs, "timestep_seq_len": local.shape[1]}

    def image_tokens(module, args, output):
        image = output[3]  # (temb, timestep_proj, text, image): the image embedder's tokens, or None
        state.image_len = 0 if image is None else image.shape[1]

    model.condition_embedder.register_forward_pre_hook(shard_timesteps, with_kwargs=True)
    model.condition_embedder.register_forward_hook(image_tokens)
    model.rope.register_forward_hook(shard_rope)
    model.blocks[0].register_forward_pre_hook(shard_tokens)
    model.proj_out.register_forward_hook(gather_tokens)
    if getattr(model, "ref_conv", None) is not None:
        _reference_tokens(model, state)
    return SequenceHooks(model, state, enter_blocks)


def _reference_tokens(model, state: _ShardState) -> None:
    """Wan 2.2 Fun Control's reference image, as ComfyUI's WanModel takes it: ref_conv's tokens (one frame's
    worth) in front of the video tokens, the RoPE tables made for one frame more (the reference at the first
    frame's positions, the video after it), the reference's outputs dropped after the head. These hooks run before
    the sharding ones (the reference tokens are sharded with the video's, padding and layout as for any token
    count) and after the final gather."""

    def longer_rope(module, args, output):
        if model.reference_input is None:
            return None
        b, _, t, h, w = args[0].shape
        return type(module).forward(module, args[0].new_empty(b, 0, t + module.patch_size[0], h, w))

    def prepend(module, args):
        if model.reference_input is None:
            return None
        hidden, *rest = args
        tokens = model.ref_conv(model.reference_input.to(hidden.dtype)).flatten(2).transpose(1, 2)
        state.reference_len = tokens.shape[1]
        return (torch.cat([tokens, hidden], dim=1), *rest)

    def drop(module, args, output):
        return None if model.reference_input is None else output[:, state.reference_len:]

    model.rope.register_forward_hook(longer_rope, prepend=True)
    model.blocks[0].register_forward_pre_hook(prepend, prepend=True)
    model.proj_out.register_forward_hook(drop)

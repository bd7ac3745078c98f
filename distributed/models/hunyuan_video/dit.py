"""HunyuanVideo text-to-video DiT: loading (ComfyUI single files, diffusers folders) and USP.

The model definition is diffusers' HunyuanVideoTransformer3DModel, unchanged. Its attention mixes
video and text tokens (20 double-stream blocks with joint attention, then 40 single-stream blocks
on the concatenated sequence). `parallelize_hunyuan` applies sequence parallelism from outside:
  - the RoPE tables and the patch tokens are padded and sliced per rank (RoPE is video-only);
  - the text tokens (after the token refiner, which runs whole on every rank) are sharded with
    the video tokens when their count divides the SP degree; otherwise every rank keeps the
    whole text, which joins the attention of every rank exactly once (usp_attention's `joint`);
  - padded text tokens are cropped off before the blocks (`crop_text`), padded video tokens are
    left out of every attention (KeyLayout), so the result equals one process;
  - the output of proj_out is all-gathered and unpadded before unpatchify.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...parallel.mesh import SequenceParallel
from ...parallel.sharding import gather_sequence, shard_sequence
from ...parallel.usp_attention import KeyLayout, tail_padding_mask, usp_attention
from ...formats import streamed
from ..family import SequenceHooks
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed

CONFIG_METADATA_KEY = "usp_video.hunyuan_config"

# The config of the released checkpoint (tencent/HunyuanVideo, ComfyUI's
# hunyuan_video_t2v_720p_bf16.safetensors), carried so that nothing is fetched at run time.
HUNYUAN_VARIANTS = {
    "hunyuan-video-t2v-720p": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                   num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                   patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                   text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                   rope_axes_dim=[16, 56, 56]),
}

# ComfyUI latent_formats.HunyuanVideo: the DiT works on latent * 0.476986 (no shift).
LATENT_SCALE = 0.476986

def is_hunyuan_keys(keys: set[str]) -> bool:
    return "img_in.proj.weight" in keys and any(k.startswith("txt_in.individual_token_refiner.") for k in keys)


def infer_hunyuan_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers config of a HunyuanVideo single file: from our metadata, else from shapes."""
    from .. import describe_keys

    shapes = unprefixed(shapes)
    keys = set(shapes)
    if not is_hunyuan_keys(keys):
        raise CheckpointError(f"{path.name} is not a HunyuanVideo diffusion model ({describe_keys(keys)}); pick "
                              "a HunyuanVideo T2V file such as hunyuan_video_t2v_720p_bf16.safetensors")
    in_channels = shapes["img_in.proj.weight"][0][1]
    if in_channels != 16 or any(k.startswith(("byt5_in.", "time_r_in.")) for k in keys):
        raise CheckpointError(f"{path.name} is a HunyuanVideo variant with {in_channels} input channels "
                              "(image-to-video, SkyReels or HunyuanVideo 1.5); only the text-to-video model is "
                              "supported")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY)
    if config is not None:
        return config
    hidden = shapes["img_in.proj.weight"][0][0]
    double = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("double_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("single_blocks."))
    for variant in HUNYUAN_VARIANTS.values():
        if (variant["num_attention_heads"] * variant["attention_head_dim"] == hidden
                and (variant["num_layers"], variant["num_single_layers"]) == (double, single)):
            return dict(variant, guidance_embeds="guidance_in.mlp.0.weight" in keys)
    raise CheckpointError(f"{path.name}: a HunyuanVideo DiT with hidden size {hidden}, {double} double and {single} "
                          f"single blocks matches no known variant ({', '.join(HUNYUAN_VARIANTS)})")


def _split_single_linear1(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """single_blocks.N.linear1 = [q; k; v; mlp] -> diffusers' names. diffusers' own converter
    assumes the 13B model's hidden size (3072); this works for every size."""
    out = {}
    for key, value in state.items():
        m = re.match(r"single_blocks\.(\d+)\.linear1\.(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        q, k, v, mlp = torch.split(value, [hidden, hidden, hidden, value.shape[0] - 3 * hidden], dim=0)
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            out[f"single_blocks.{m[1]}.{name}.{m[2]}"] = part
    return out


def convert_to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Original HunyuanVideo / ComfyUI tensor names -> diffusers HunyuanVideoTransformer3DModel names."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    return convert_hunyuan_video_transformer_to_diffusers(_split_single_linear1(state, hidden))


# The repeated blocks, whose Linear layers keep an fp8 file's fp8 weights: as the model names them, and
# as the file does (the load's memory prediction reads the file's names).
FP8_WITHIN = ("transformer_blocks.", "single_transformer_blocks.", "context_embedder.token_refiner.")
FP8_WITHIN_FILE = ("double_blocks.", "single_blocks.", "txt_in.individual_token_refiner.")


def load_hunyuan_transformer(path: str | Path, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu", keep_fp8: bool = True, shard=None):
    """Load a HunyuanVideo T2V DiT from a ComfyUI/original single .safetensors file or a diffusers folder.
    A single file is read tensor by tensor into a model built on the meta device (formats/streamed.py):
    its key conversion splits the fused q/k/v (and q/k/v/mlp) tensors and swaps the halves of the final
    modulation table, all row selections, so each model tensor is read as rows of the file's. With
    shard(model) (FSDP2 over the ranks), each rank reads only its shards' rows. The Linear weights of an
    fp8 file stay in fp8 (formats/fp8.py) unless keep_fp8 is False. A folder loads whole through diffusers
    (from_pretrained), then is sharded."""
    from diffusers import HunyuanVideoTransformer3DModel

    path = Path(path)
    if path.is_dir():
        model = from_folder(HunyuanVideoTransformer3DModel, path, dtype, device,
                            "a diffusers HunyuanVideoTransformer3DModel folder (the 'transformer' subfolder)")
        if shard is not None:
            shard(model)
        return model

    shapes, metadata = read_header(path)
    config = infer_hunyuan_config(path, shapes, metadata)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return streamed.load(lambda: HunyuanVideoTransformer3DModel(**config), path,
                         lambda state: convert_to_diffusers(state, hidden), dtype, device,
                         "the HunyuanVideo architecture", keep_within=FP8_WITHIN if keep_fp8 else (), shard=shard,
                         comfy_dit=True)


def crop_text(encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None):
    """Drop the padding of the text tokens: (states, mask) with an all-ones mask.

    Padded text tokens are masked out of every attention in the model, so dropping them changes
    no output. Every batch entry must have the same count of real tokens, at the front; batch
    entries of different lengths run as separate forwards (the engine does that)."""
    if encoder_attention_mask is None:
        mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool, device=encoder_hidden_states.device)
        return encoder_hidden_states, mask
    mask = encoder_attention_mask.bool()
    counts = mask.sum(dim=1)
    count = int(counts[0])
    if count == 0 or not bool((counts == count).all()) or not bool(mask[:, :count].all()):
        raise ValueError("encoder_attention_mask: every batch entry needs the same number of real text tokens, "
                         f"at the front (got {counts.tolist()}); run prompts of different lengths separately")
    return encoder_hidden_states[:, :count], mask[:, :count]


class _ShardState:
    """What the attention processors need to know about the current forward."""

    video_len: int = 0     # real video tokens (the whole sequence)
    text_len: int = 0      # real text tokens
    shard_text: bool = True
    layout: KeyLayout | None = None


class UspHunyuanAttnProcessor:
    """Joint video+text attention of both block types, sequence parallel (see module docstring)."""

    def __init__(self, sp: SequenceParallel, backend: str, state: _ShardState):
        self.sp, self.backend, self.state = sp, backend, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        video_len = hidden_states.shape[1]
        if attn.add_q_proj is None:  # single-stream block: one projection over [video; text]
            joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
            q, k, v = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            (q, tq), (k, tk), (v, tv) = ((t[:, :video_len], t[:, video_len:]) for t in (q, k, v))
        else:  # double-stream block: separate projections for video and text
            q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            tq, tk, tv = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        if image_rotary_emb is not None:  # RoPE on the video tokens only
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        if self.state.shard_text:  # text shards ride along with the video shards
            out = usp_attention(torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1), self.sp,
                                self.state.layout, self.backend)
            out, text_out = out[:, :video_len], out[:, video_len:]
        else:  # every rank holds the whole text
            out, text_out = usp_attention(q, k, v, self.sp, self.state.layout, self.backend, joint=(tq, tk, tv))
        out, text_out = out.flatten(2, 3).to(q.dtype), text_out.flatten(2, 3).to(q.dtype)

        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


# TeaCache's published rescaling polynomial for HunyuanVideo, highest degree first (ali-vilab/TeaCache,
# TeaCache4HunyuanVideo/teacache_sample_video.py).
TEACACHE_HUNYUAN = [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02]


# MagCache's published magnitude ratios for HunyuanVideo T2V at 50 steps (cfg 1: one pass), after a padding of
# one 1.0, for 720p and 544p (Zehong-Ma/MagCache, MagCache4HunyuanVideo/magcache_sample_video.py).
MAGCACHE_HUNYUAN_720P = [1.0] + [
    1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101, 1.00679, 1.02556, 1.00908,
    1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161, 1.02968, 1.00544, 1.02822, 1.00689,
    1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687,
    0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703, 0.75456]
MAGCACHE_HUNYUAN_544P = [1.0] + [
    1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974, 1.00984, 1.03028, 1.00681,
    1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093,
    1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711,
    0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592]


def parallelize_hunyuan(model, sp: SequenceParallel, backend: str = "sdpa") -> SequenceHooks:
    """Apply sequence parallelism to a HunyuanVideoTransformer3DModel in place (see module docstring); the
    module comes back in the SequenceHooks, with the state its hooks share with the step caches."""
    if model.config.image_condition_type is not None:
        raise CheckpointError("HunyuanVideo image-to-video models are not supported; use the T2V model")
    state = _ShardState()
    processor = UspHunyuanAttnProcessor(sp, backend, state)
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.attn.set_processor(processor)

    def crop(module, args, kwargs):
        names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                 "pooled_projections", "guidance", "attention_kwargs", "return_dict")
        values = dict(zip(names, args), **kwargs)
        values["encoder_hidden_states"], values["encoder_attention_mask"] = crop_text(
            values["encoder_hidden_states"], values.get("encoder_attention_mask"))
        return (), values

    def shard_rope(module, args, output):
        return tuple(shard_sequence(t, 0, sp) for t in output)  # (S, D) -> (S/N, D)

    def shard_video(module, args, output):
        state.video_len = output.shape[1]  # (B, S, C) patch tokens
        return shard_sequence(output, 1, sp)

    def place_text(module, args, output):
        state.text_len = output.shape[1]  # (B, T, C) refined text tokens
        state.shard_text = state.text_len % sp.degree == 0
        local = -(-state.video_len // sp.degree)
        video_mask = tail_padding_mask(state.video_len, local, sp.degree)
        if state.shard_text:
            text_mask = torch.ones(sp.degree, state.text_len // sp.degree, dtype=torch.bool)
            state.layout = KeyLayout(torch.cat([video_mask, text_mask], dim=1), sp)
            return shard_sequence(output, 1, sp)
        state.layout = KeyLayout(video_mask, sp)
        return output

    def gather_video(module, args, output):
        return gather_sequence(output, 1, sp, state.video_len)  # (B, S/N, C') -> (B, S, C')

    model.register_forward_pre_hook(crop, with_kwargs=True)
    model.rope.register_forward_hook(shard_rope)
    model.x_embedder.register_forward_hook(shard_video)
    model.context_embedder.register_forward_hook(place_text)
    model.proj_out.register_forward_hook(gather_video)
    return SequenceHooks(model, state)


# diffusers -> original names, for hunyuan_to_original_keys: renamed layers inside each kind of block, and the
# layers of the top level (by prefix)
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
    "attn.norm_q": "img_attn_q_norm", "attn.norm_k": "img_attn_k_norm", "attn.to_out.0": "img_attn_proj",
    "attn.norm_added_q": "txt_attn_q_norm", "attn.norm_added_k": "txt_attn_k_norm",
    "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2", "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2",
}
_SINGLE_RENAMES = {"proj_out": "linear2", "attn.norm_q": "q_norm", "attn.norm_k": "k_norm",
                   "norm.linear": "modulation.linear"}
_REFINER_RENAMES = {"attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
                    "norm_out.linear": "adaLN_modulation.1"}
# (diffusers block key, original block prefix, [(diffusers layers fused into one, the fused layer)], renames)
_BLOCK_KINDS = [
    (r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", "double_blocks.{}",
     [(r"attn\.to_([qkv])", "img_attn_qkv"), (r"attn\.add_([qkv])_proj", "txt_attn_qkv")], _DOUBLE_RENAMES),
    (r"single_transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", "single_blocks.{}",
     [(r"attn\.to_([qkv])|proj_mlp", "linear1")], _SINGLE_RENAMES),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)\.(weight|bias)$",
     "txt_in.individual_token_refiner.blocks.{}", [(r"attn\.to_([qkv])", "self_attn_qkv")], _REFINER_RENAMES),
]
_TOP_RENAMES = {
    "x_embedder.": "img_in.", "time_text_embed.timestep_embedder.linear_1.": "time_in.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.mlp.2.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.mlp.0.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "proj_out.": "final_layer.linear.",
    "context_embedder.proj_in.": "txt_in.input_embedder.",
    "context_embedder.time_text_embed.timestep_embedder.linear_1.": "txt_in.t_embedder.mlp.0.",
    "context_embedder.time_text_embed.timestep_embedder.linear_2.": "txt_in.t_embedder.mlp.2.",
    "context_embedder.time_text_embed.text_embedder.linear_1.": "txt_in.c_embedder.linear_1.",
    "context_embedder.time_text_embed.text_embedder.linear_2.": "txt_in.c_embedder.linear_2.",
}
_FUSED_ORDER = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}


def _original_block_key(key: str) -> tuple[str, str | None] | None:
    """A block tensor's original name, with the part ("q", "k", "v", "mlp") it is of a fused tensor (None:
    not fused); None for a tensor outside the blocks."""
    for pattern, prefix, fused, renames in _BLOCK_KINDS:
        if m := re.match(pattern, key):
            i, name, kind = m.groups()
            for fused_pattern, layer in fused:
                if q := re.fullmatch(fused_pattern, name):
                    return f"{prefix.format(i)}.{layer}.{kind}", q[1] or "mlp"
            return f"{prefix.format(i)}.{renames.get(name, name)}.{kind}", None
    return None


def hunyuan_to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers HunyuanVideoTransformer3DModel names -> the original HunyuanVideo / ComfyUI names
    (the inverse of convert_to_diffusers; used by the tiny-model generator)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if (block := _original_block_key(key)) is not None:
            name, part = block
            if part is None:
                out[name] = value
            else:
                fused.setdefault(name, {})[part] = value
        elif key.startswith("norm_out.linear."):  # diffusers keeps [scale; shift], the original [shift; scale]
            scale, shift = value.chunk(2, dim=0)
            out[key.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = torch.cat([shift, scale])
        else:
            prefix = next((p for p in sorted(_TOP_RENAMES, key=len, reverse=True) if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"no original name known for {key}")
            out[_TOP_RENAMES[prefix] + key[len(prefix):]] = value
    for key, parts in fused.items():
        order = _FUSED_ORDER["linear1" if ".linear1." in key else "qkv"]
        out[key] = torch.cat([parts[p] for p in order], dim=0)
    return out

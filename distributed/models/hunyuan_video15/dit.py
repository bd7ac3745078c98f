"""HunyuanVideo 1.5 DiT: loading (Comfy-Org's single files, diffusers folders) and USP, applied from outside.

The model is diffusers' HunyuanVideo15Transformer3DModel, unchanged: 54 double-stream blocks whose joint
attention takes the video tokens and, after them, the text tokens, which its forward puts together as
[image (SigLIP) | ByT5 glyph | Qwen] with the real tokens first and the padding after. `parallelize` shards
the video tokens only:
  - the RoPE tables (video only) and the patch tokens are padded and sliced per rank;
  - every rank holds the whole text (the three kinds of tokens, small beside the video): each block's attention
    takes it as usp_attention's `joint` tokens (HunyuanVideo's own processor, hunyuan_video/dit.py), attended
    once whatever the degrees; its padding, after the real tokens in every batch entry, is cropped off before
    each block (masked out of every attention, it changes no real token), padded video tokens are left out of
    every attention (KeyLayout);
  - the output of proj_out is all-gathered and unpadded before unpatchify.
16 heads: Ulysses degrees 1, 2, 4, 8, 16, ring for the rest (parallel/mesh.py picks them).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed
from ...parallel.mesh import SequenceParallel
from ...parallel.sharding import gather_sequence, shard_sequence
from ...parallel.usp_attention import KeyLayout, tail_padding_mask
from ..family import SequenceHooks
from ..hunyuan_video.dit import UspHunyuanAttnProcessor
from . import keys

CONFIG_METADATA_KEY = "usp_video.hunyuan_video15_config"

# The released DiT (diffusers 0.42.1's defaults, tencent/HunyuanVideo-1.5): 480p and 720p, T2V and I2V, their
# cfg-distilled and step-distilled versions share it; the checkpoints differ in weights only.
HV15_CONFIG = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                   num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                   text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                   rope_axes_dim=(16, 56, 56), use_meanflow=False)
BYT5_HIDDEN = 2048  # diffusers' HunyuanVideo15ByT5TextProjection: 1472 -> 2048 -> 2048 -> hidden, fixed

# The repeated blocks, whose Linear layers keep an fp8 file's fp8 weights: as the model and the file name them.
FP8_WITHIN = ("transformer_blocks.", "context_embedder.token_refiner.")
FP8_WITHIN_FILE = ("double_blocks.", "txt_in.individual_token_refiner.")


def is_hv15_keys(keys_: set[str]) -> bool:
    """ComfyUI tells 1.5 from 1.0 by the SigLIP projection and the condition-type table (1.0 has neither)."""
    return "img_in.proj.weight" in keys_ and "vision_in.proj.0.weight" in keys_ and "cond_type_embedding.weight" in keys_


def _count(keys_: set[str], prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in keys_ if k.startswith(prefix)), default=-1)


def infer_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers config of a HunyuanVideo 1.5 single file: from our metadata (the tiny set), else from the
    tensor shapes; CheckpointError for a file it cannot run."""
    from .. import describe_keys

    shapes = unprefixed(shapes)
    names = set(shapes)
    if not is_hv15_keys(names):
        raise CheckpointError(f"{path.name} is not a HunyuanVideo 1.5 diffusion model ({describe_keys(names)}); pick "
                              "a file such as hunyuanvideo1.5_480p_t2v_fp16.safetensors")
    if any(k.startswith("time_r_in.") for k in names):
        raise CheckpointError(f"{path.name} is a mean-flow HunyuanVideo 1.5 model (time_r_in: the 1080p "
                              "super-resolution stage); it is not supported yet: use the 480p / 720p T2V or I2V models")
    if any(k.startswith("single_blocks.") for k in names):
        raise CheckpointError(f"{path.name} has single-stream blocks: HunyuanVideo 1.5 has double-stream blocks only "
                              "(is it a HunyuanImage file?)")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY)
    if config is not None:
        return config
    hidden, in_channels, *patch = shapes["img_in.proj.weight"][0]
    if hidden % 128:
        raise CheckpointError(f"{path.name}: hidden size {hidden} is not a whole number of 128-wide heads")
    return dict(HV15_CONFIG, in_channels=in_channels,
                out_channels=shapes["final_layer.linear.weight"][0][0] // math.prod(patch),
                num_attention_heads=hidden // 128, num_layers=_count(names, "double_blocks."),
                num_refiner_layers=_count(names, "txt_in.individual_token_refiner.blocks."),
                patch_size=patch[-1], patch_size_t=patch[0], text_embed_dim=shapes["txt_in.input_embedder.weight"][0][1],
                text_embed_2_dim=shapes["byt5_in.fc1.weight"][0][1], image_embed_dim=shapes["vision_in.proj.0.weight"][0][0])


def check_folder_config(path: Path, config: dict) -> None:
    if config.get("use_meanflow"):
        raise CheckpointError(f"{path}: a mean-flow HunyuanVideo 1.5 model (the 1080p super-resolution stage); it is "
                              "not supported yet")


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         keep_fp8: bool = True, shard=None):
    """The DiT from a single file (streamed tensor by tensor into a meta-built model, each rank reading only its
    shards with shard(model); fp8 Linear weights kept in fp8 unless keep_fp8 is False) or a diffusers folder
    (loaded whole, then sharded)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    path = Path(path)
    if path.is_dir():
        model = from_folder(HunyuanVideo15Transformer3DModel, path, dtype, device,
                            "a diffusers HunyuanVideo15Transformer3DModel folder (the 'transformer' subfolder)", shard)
        check_folder_config(path, dict(model.config))
        return model
    shapes, metadata = read_header(path)
    config = infer_config(path, shapes, metadata)
    return streamed.load(lambda: HunyuanVideo15Transformer3DModel(**config), path, keys.to_diffusers, dtype, device,
                         "the HunyuanVideo 1.5 architecture", keep_within=FP8_WITHIN if keep_fp8 else (), shard=shard,
                         comfy_dit=True)


class _ShardState:
    """What the hooks of one forward share."""

    video_len: int = 0            # real video tokens (the whole sequence)
    text_len: int | None = None   # real text tokens of every batch entry (None until the first block)
    shard_text: bool = False      # the text is never sharded: every rank holds it whole (joint attention)
    layout: KeyLayout | None = None


def real_text_tokens(mask: torch.Tensor) -> int:
    """How many text tokens are real in every batch entry of the blocks' mask (B, T) (the forward puts the real
    ones first); ValueError when the entries differ (the engine runs conditionings of different lengths apart)."""
    mask = mask.bool()
    counts = mask.sum(dim=1)
    count = int(counts[0])
    if not bool((counts == count).all()) or not bool(mask[:, :count].all()):
        raise ValueError(f"the text tokens of a batch must be as many in every entry, at the front (got "
                         f"{counts.tolist()}); run conditionings of different lengths separately")
    return count


def parallelize(model, sp: SequenceParallel, backend: str = "sdpa") -> SequenceHooks:
    """Sequence parallelism on a HunyuanVideo15Transformer3DModel, in place (see the module docstring)."""
    state = _ShardState()
    processor = UspHunyuanAttnProcessor(sp, backend, state)
    for block in model.transformer_blocks:
        block.attn.set_processor(processor)

    def start(module, args):
        state.text_len = None

    def shard_rope(module, args, output):
        return tuple(shard_sequence(t, 0, sp) for t in output)  # (S, D) -> (S/N, D)

    def shard_video(module, args, output):
        state.video_len = output.shape[1]  # (B, S, C) patch tokens
        local = -(-state.video_len // sp.degree)
        state.layout = KeyLayout(tail_padding_mask(state.video_len, local, sp.degree), sp)
        return shard_sequence(output, 1, sp)

    def crop_text(module, args):
        # block(hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis): the text's padding off
        if state.text_len is None:
            state.text_len = real_text_tokens(args[3])
        return (args[0], args[1][:, :state.text_len], *args[2:])

    def gather_video(module, args, output):
        return gather_sequence(output, 1, sp, state.video_len)  # (B, S/N, C') -> (B, S, C')

    model.register_forward_pre_hook(start)
    model.rope.register_forward_hook(shard_rope)
    model.x_embedder.register_forward_hook(shard_video)
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(crop_text)
    model.proj_out.register_forward_hook(gather_video)
    return SequenceHooks(model, state)

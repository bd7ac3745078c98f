"""LTX-2 audio-video DiT: loading (Lightricks' all-in-one single files) and the tiny debug config.

The model definition is diffusers' LTX2VideoTransformer3DModel, unchanged: a video stream and an audio stream
of the same depth, joined in every block by audio-to-video (queries: video, keys/values: audio) and
video-to-audio (queries: audio, keys/values: video) cross-attention; its sequence parallelism is in usp.py.

Lightricks' checkpoints (ltx-2-19b-dev, ltx-2.3-22b-dev / distilled) are one file holding the transformer under
`model.diffusion_model.` (beside its text connectors), the video VAE (`vae.`), the audio VAE (`audio_vae.`),
the vocoder (`vocoder.`) and, in LTX-2.3, the text projection (`text_embedding_projection.`). The transformer's
names differ from diffusers' by renames only (patchify_proj -> proj_in, adaln_single -> time_embed, q_norm ->
norm_q, ...), so every model tensor is one file tensor and a rank can read only its shards (formats/streamed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed

CONFIG_METADATA_KEY = "usp_video.ltx2_config"

# The released LTX-2 19B (diffusers 0.42's defaults; Lightricks' files use rope "split", diffusers' default is
# "interleaved"). Heads are not in a file's shapes: 128-wide video heads and 64-wide audio heads, as released.
# perturbed_attn (no weights of its own) lets the forward take spatio-temporal guidance's perturbation mask.
LTX2_VARIANTS = {
    "ltx-2-19b": dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128,
                      cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128,
                      audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                      num_layers=48, caption_channels=3840, rope_type="split", perturbed_attn=True),
}
VIDEO_HEAD_DIM, AUDIO_HEAD_DIM = 128, 64

# The tiny debug config (tests, demo): 12 video heads, so that every Ulysses degree 1-4 divides them, and as many
# audio heads (the cross-modal RoPE of the "split" kind lays its table out over the video heads); the latent
# channels of the released model (128 video, 8 x 16 = 128 audio).
TINY_LTX2_CONFIG = dict(LTX2_VARIANTS["ltx-2-19b"], num_attention_heads=12, attention_head_dim=8,
                        cross_attention_dim=96, audio_num_attention_heads=12, audio_attention_head_dim=4,
                        audio_cross_attention_dim=48, num_layers=2, caption_channels=32)

# file (original) name -> diffusers name, applied in this order (the longer names first: `audio_patchify_proj`
# holds `patchify_proj`, `audio_adaln_single` and the av_ca ones hold `adaln_single`)
_RENAMES = [
    ("audio_patchify_proj.", "audio_proj_in."), ("patchify_proj.", "proj_in."),
    ("av_ca_video_scale_shift_adaln_single.", "av_cross_attn_video_scale_shift."),
    ("av_ca_a2v_gate_adaln_single.", "av_cross_attn_video_a2v_gate."),
    ("av_ca_audio_scale_shift_adaln_single.", "av_cross_attn_audio_scale_shift."),
    ("av_ca_v2a_gate_adaln_single.", "av_cross_attn_audio_v2a_gate."),
    ("audio_prompt_adaln_single.", "audio_prompt_adaln."), ("prompt_adaln_single.", "prompt_adaln."),
    ("audio_adaln_single.", "audio_time_embed."), ("adaln_single.", "time_embed."),
    ("scale_shift_table_a2v_ca_video", "video_a2v_cross_attn_scale_shift_table"),
    ("scale_shift_table_a2v_ca_audio", "audio_a2v_cross_attn_scale_shift_table"),
    (".q_norm.", ".norm_q."), (".k_norm.", ".norm_k."),
]
# what else an all-in-one file holds: the text connectors (diffusers' LTX2TextConnectors), the VAEs, the vocoder
# and LTX-2.3's text projection; the transformer's loader leaves them unread
NOT_DIT = ("video_embeddings_connector.", "audio_embeddings_connector.", "vae.", "audio_vae.", "vocoder.",
           "text_embedding_projection.")


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if old.endswith(".") and not old.startswith("."):  # a top-level module: only at the start
            if key.startswith(old):
                return new + key[len(old):]
        else:
            key = key.replace(old, new)
    return key


def convert_to_diffusers(state: dict) -> dict:
    """Lightricks / ComfyUI transformer names (container prefix removed) -> diffusers LTX2VideoTransformer3DModel
    names; the file's other parts (NOT_DIT) are left out."""
    return {_rename(k, _RENAMES): v for k, v in state.items() if not k.startswith(NOT_DIT)}


def ltx2_to_original_keys(state: dict) -> dict:
    """diffusers names -> the names of Lightricks' files (the inverse of convert_to_diffusers; the tiny set)."""
    inverse = [(new, old) for old, new in _RENAMES]
    inverse.sort(key=lambda pair: -len(pair[0]))  # audio_time_embed. before time_embed., ...
    return {_rename(k, inverse): v for k, v in state.items()}


def is_ltx2_keys(keys: set[str]) -> bool:
    """A transformer of LTX-2's audio-video kind (keys without container prefix); LTX-Video (no audio) is not."""
    return "adaln_single.emb.timestep_embedder.linear_1.bias" in keys and "audio_adaln_single.linear.weight" in keys


def infer_ltx2_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers config of an LTX-2 single file: from our metadata, else from its shapes (released heads)."""
    shapes = unprefixed(shapes)
    keys = set(shapes)
    if not is_ltx2_keys(keys):
        raise CheckpointError(f"{path.name} is not an LTX-2 audio-video model (no audio_adaln_single); pick an "
                              "all-in-one LTX-2 checkpoint such as ltx-2-19b-dev.safetensors or "
                              "ltx-2.3-22b-distilled.safetensors")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY)
    if config is not None:
        return config
    inner, in_channels = shapes["patchify_proj.weight"][0]
    audio_inner, audio_in = shapes["audio_patchify_proj.weight"][0]
    block = "transformer_blocks.0."
    if inner % VIDEO_HEAD_DIM or audio_inner % AUDIO_HEAD_DIM:
        raise CheckpointError(f"{path.name}: video width {inner} / audio width {audio_inner} are not multiples of "
                              f"the released head widths ({VIDEO_HEAD_DIM} / {AUDIO_HEAD_DIM})")
    config = dict(LTX2_VARIANTS["ltx-2-19b"], in_channels=in_channels, out_channels=shapes["proj_out.weight"][0][0],
                  num_attention_heads=inner // VIDEO_HEAD_DIM, audio_num_attention_heads=audio_inner // AUDIO_HEAD_DIM,
                  audio_in_channels=audio_in, audio_out_channels=shapes["audio_proj_out.weight"][0][0],
                  cross_attention_dim=shapes[block + "attn2.to_k.weight"][0][1],
                  audio_cross_attention_dim=shapes[block + "audio_attn2.to_k.weight"][0][1],
                  num_layers=1 + max(int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks.")),
                  gated_attn=block + "attn1.to_gate_logits.weight" in keys,
                  audio_gated_attn=block + "audio_attn1.to_gate_logits.weight" in keys,
                  cross_attn_mod=shapes[block + "scale_shift_table"][0][0] == 9,
                  audio_cross_attn_mod=shapes[block + "audio_scale_shift_table"][0][0] == 9,
                  use_prompt_embeddings="caption_projection.linear_1.weight" in keys,
                  use_prompt_adaln_single="prompt_adaln_single.linear.weight" in keys,
                  ff_bias=block + "ff.net.0.proj.bias" in keys, audio_ff_bias=block + "audio_ff.net.0.proj.bias" in keys)
    if config["use_prompt_embeddings"]:
        config["caption_channels"] = shapes["caption_projection.linear_1.weight"][0][1]
    file_config = _lightricks_config(metadata)
    if file_config.get("rope_type") in ("split", "interleaved"):
        config["rope_type"] = file_config["rope_type"]
    return config


def _lightricks_config(metadata: dict) -> dict:
    """The transformer part of the config JSON Lightricks' files carry in their metadata ("config"), if any."""
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    return config.get("transformer", {}) if isinstance(config, dict) else {}


# the repeated blocks, whose Linear layers keep an fp8 file's fp8 weights (ltx-2-19b-dev-fp8)
FP8_WITHIN = ("transformer_blocks.",)


def load_ltx2_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          shard=None, keep_fp8: bool = True):
    """An LTX-2 DiT from an all-in-one single file (the transformer's tensors only, read tensor by tensor into
    a model built on the meta device; with shard(model), each rank reads only its shards) or a diffusers
    folder (the pipeline's 'transformer' subfolder). The blocks' Linear weights of an fp8 file stay in fp8
    (formats/fp8.py) unless keep_fp8 is False."""
    from diffusers import LTX2VideoTransformer3DModel

    path = Path(path)
    if path.is_dir():
        return from_folder(LTX2VideoTransformer3DModel, path, dtype, device,
                           "a diffusers LTX2VideoTransformer3DModel folder (the 'transformer' subfolder)", shard)
    shapes, metadata = read_header(path)
    config = infer_ltx2_config(path, shapes, metadata)
    return streamed.load(lambda: LTX2VideoTransformer3DModel(**config), path, convert_to_diffusers, dtype, device,
                         "the LTX-2 architecture", keep_within=FP8_WITHIN if keep_fp8 else (), shard=shard,
                         comfy_dit=True)

"""HunyuanVideo 1.5 DiT tensor names: the original / ComfyUI layout (Comfy-Org's repackaged single files,
hunyuanvideo1.5_*_fp16.safetensors) <-> diffusers' HunyuanVideo15Transformer3DModel.

The original layout: double_blocks.N (img_/txt_ streams; the attention's q/k/v fused in img_attn_qkv and
txt_attn_qkv as Comfy-Org's files and the GGUF conversions of them hold them, or split in img_attn_q/_k/_v as
tencent's own release does: both are read), txt_in (the Qwen token refiner), byt5_in (the ByT5 glyph
projection), vision_in (the SigLIP projection), cond_type_embedding, time_in / time_r_in (mean-flow
checkpoints), final_layer (its modulation stores [shift; scale], diffusers [scale; shift]). Every conversion is a
rename or a selection of rows (split, halves swapped), so a single file streams in rank by rank.
"""

from __future__ import annotations

import re

import torch

# top-level layers, by prefix (original -> diffusers)
TOP = {
    "img_in.": "x_embedder.",
    "time_in.mlp.0.": "time_embed.timestep_embedder.linear_1.",
    "time_in.mlp.2.": "time_embed.timestep_embedder.linear_2.",
    "time_r_in.mlp.0.": "time_embed.timestep_embedder_r.linear_1.",
    "time_r_in.mlp.2.": "time_embed.timestep_embedder_r.linear_2.",
    "txt_in.input_embedder.": "context_embedder.proj_in.",
    "txt_in.t_embedder.mlp.0.": "context_embedder.time_text_embed.timestep_embedder.linear_1.",
    "txt_in.t_embedder.mlp.2.": "context_embedder.time_text_embed.timestep_embedder.linear_2.",
    "txt_in.c_embedder.linear_1.": "context_embedder.time_text_embed.text_embedder.linear_1.",
    "txt_in.c_embedder.linear_2.": "context_embedder.time_text_embed.text_embedder.linear_2.",
    "byt5_in.layernorm.": "context_embedder_2.norm.",
    "byt5_in.fc1.": "context_embedder_2.linear_1.",
    "byt5_in.fc2.": "context_embedder_2.linear_2.",
    "byt5_in.fc3.": "context_embedder_2.linear_3.",
    "vision_in.proj.0.": "image_embedder.norm_in.",
    "vision_in.proj.1.": "image_embedder.linear_1.",
    "vision_in.proj.3.": "image_embedder.linear_2.",
    "vision_in.proj.4.": "image_embedder.norm_out.",
    "cond_type_embedding.": "cond_type_embed.",
    "final_layer.linear.": "proj_out.",
}
SWAPPED = ("final_layer.adaLN_modulation.1.", "norm_out.linear.")  # halves swapped
DOUBLE = {
    "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
    "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
    "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k",
    "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2",
    "img_attn_q": "attn.to_q", "img_attn_k": "attn.to_k", "img_attn_v": "attn.to_v",
    "txt_attn_q": "attn.add_q_proj", "txt_attn_k": "attn.add_k_proj", "txt_attn_v": "attn.add_v_proj",
}
REFINER = {"norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
           "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}
# fused q/k/v layers: original -> the diffusers layers it holds, in order
FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
BLOCKS = ((r"double_blocks\.(\d+)\.(.+)\.(weight|bias)$", "transformer_blocks.{}.", DOUBLE),
          (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)\.(weight|bias)$",
           "context_embedder.token_refiner.refiner_blocks.{}.", REFINER))


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original / ComfyUI names (container prefixes removed) -> diffusers names; KeyError names a tensor that
    has no place in the model."""
    out = {}
    for key, value in state.items():
        for pattern, prefix, renames in BLOCKS:
            if m := re.match(pattern, key):
                i, name, kind = m.groups()
                if name in FUSED:
                    for part, layer in zip(value.chunk(3, dim=0), FUSED[name]):
                        out[f"{prefix.format(i)}{layer}.{kind}"] = part
                elif name in renames:
                    out[f"{prefix.format(i)}{renames[name]}.{kind}"] = value
                else:
                    raise KeyError(f"unknown HunyuanVideo 1.5 block tensor {key}")
                break
        else:
            if key.startswith(SWAPPED[0]):
                shift, scale = value.chunk(2, dim=0)
                out[SWAPPED[1] + key[len(SWAPPED[0]):]] = torch.cat([scale, shift])
                continue
            prefix = next((p for p in TOP if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"unknown HunyuanVideo 1.5 tensor {key}")
            out[TOP[prefix] + key[len(prefix):]] = value
    return out


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> Comfy-Org's layout (q/k/v fused), the inverse of to_diffusers (the tiny-model writer)."""
    top = {v: k for k, v in TOP.items()}
    out, fused = {}, {}
    for key, value in state.items():
        for pattern, prefix, renames in BLOCKS:
            head = prefix.split("{}")[0]
            if key.startswith(head):
                i, rest = key[len(head):].split(".", 1)
                name, kind = rest.rsplit(".", 1)
                original = pattern.split(r"\.(\d+)")[0].replace("\\", "") + f".{i}."
                layer = next((f for f, parts in FUSED.items() if name in parts
                              and (f != "self_attn_qkv") == head.startswith("transformer_blocks")), None)
                if layer is not None:
                    fused.setdefault(f"{original}{layer}.{kind}", {})[FUSED[layer].index(name)] = value
                else:
                    out[f"{original}{next(k for k, v in renames.items() if v == name)}.{kind}"] = value
                break
        else:
            if key.startswith(SWAPPED[1]):
                scale, shift = value.chunk(2, dim=0)
                out[SWAPPED[0] + key[len(SWAPPED[1]):]] = torch.cat([shift, scale])
                continue
            prefix = next(p for p in sorted(top, key=len, reverse=True) if key.startswith(p))
            out[top[prefix] + key[len(prefix):]] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in range(3)])
    return out

"""Wan 2.2 Animate's DiT: diffusers' WanAnimateTransformer3DModel (its modules, its state dict) with ComfyUI 0.3.64's
forward (comfy/ldm/wan/model_animate.py AnimateWanModel), and USP applied from outside as for Wan 2.1.

Why a forward of our own (AnimateDiT.forward): diffusers' needs both the pose and the face input (it fails
without them) and a face video whose encoded frames divide the token count; ComfyUI's runs without either, adds
the pose latents to the frames after the reference frame as far as both reach (a shorter or longer pose video
is cut or left short), and pads or cuts the face tokens to the latent's frames. The arithmetic of each module
(patch embeddings, motion encoder, face encoder, blocks, face adapter) is diffusers' own; only that glue is
ComfyUI's. diffusers' stock class stays the second reference (tests/test_wan_animate.py), on inputs where the two
agree.

The face adapter (after blocks 0, 5, 10, ...): each video token attends to the 5 face tokens of its own latent
frame (4 from the face encoder + a learned padding token). Under USP each rank holds a contiguous run of tokens,
which may start or end inside a frame; FrameFaceAttention reads which frame each of its tokens is in from its
place in the whole sequence (the rank's offset) and leaves the tail padding out (zero).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header, unprefixed
from ..family import SequenceHooks
from ..wan21 import dit as wan

CONFIG_METADATA_KEY = wan.CONFIG_METADATA_KEY
FACE_ADAPTER_KEY = "face_adapter.fuser_blocks.0.k_norm.weight"  # what ComfyUI's detection looks for (model_detection)

# Wan 2.2 Animate 14B (Comfy-Org's wan2.2_animate_14B_bf16): Wan 2.1 I2V 14B's DiT (36 input channels, CLIP
# vision image embedder) with the pose patch embedding, the motion and face encoders and 8 face adapter blocks.
ANIMATE_14B = dict(wan.WAN_VARIANTS["wan2.1-t2v-14b"], in_channels=36, latent_channels=16, image_dim=1280,
                   added_kv_proj_dim=5120)


def is_animate(keys) -> bool:
    """Do these tensor names (container prefixes removed) hold Wan 2.2 Animate's face adapter or motion encoder?"""
    return FACE_ADAPTER_KEY in keys or any(k.startswith(("motion_encoder.", "face_adapter.")) for k in keys)


def infer_animate_config(path: Path, shapes: dict, metadata: dict) -> dict:
    """The diffusers config of a Wan 2.2 Animate single file (ComfyUI's names): our metadata's, else read from the
    shapes (the 14B's layout; the encoders' sizes from their tensors)."""
    shapes = unprefixed(shapes)
    keys = set(shapes)
    if not is_animate(keys) or "patch_embedding.weight" not in keys:
        raise CheckpointError(f"{path.name} is not a Wan 2.2 Animate diffusion model (no face adapter / motion "
                              "encoder); pick wan2.2_animate_14B_bf16.safetensors or load it as its own family")
    if "pose_patch_embedding.weight" not in keys or "img_emb.proj.0.weight" not in keys:
        raise CheckpointError(f"{path.name} has a face adapter but no pose patch embedding or CLIP vision image "
                              "embedder: not a Wan 2.2 Animate file this loader knows (Wan-Animate-2 is not supported)")
    config = config_from_metadata(metadata, CONFIG_METADATA_KEY)
    if config is not None:
        return config
    hidden, channels = shapes["patch_embedding.weight"][0][:2]
    heads = hidden // 128
    if heads * 128 != hidden or not heads:
        raise CheckpointError(f"{path.name}: a Wan 2.2 Animate DiT {hidden} wide carries no config and is not made of "
                              "128-wide heads as the released model is")
    res_blocks = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith("motion_encoder.enc.net_app.convs.")) - 2
    size = 2 ** (res_blocks + 2)
    sizes = {str(size): shapes["motion_encoder.enc.net_app.convs.0.0.weight"][0][0]}
    for i in range(res_blocks):
        sizes[str(size // 2 ** (i + 1))] = shapes[f"motion_encoder.enc.net_app.convs.{i + 1}.conv2.1.weight"][0][0]
    face_hidden = shapes["face_encoder.conv2.conv.weight"][0][0]
    return dict(ANIMATE_14B, num_attention_heads=heads, in_channels=channels,
                num_layers=1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks.")),
                ffn_dim=shapes["blocks.0.ffn.0.weight"][0][0], text_dim=shapes["text_embedding.0.weight"][0][1],
                freq_dim=shapes["time_embedding.0.weight"][0][1], image_dim=shapes["img_emb.proj.0.weight"][0][0],
                added_kv_proj_dim=hidden, motion_encoder_size=size, motion_encoder_channel_sizes=sizes,
                motion_style_dim=shapes["motion_encoder.enc.fc.0.weight"][0][0],
                motion_dim=shapes["motion_encoder.dec.direction.weight"][0][1],
                motion_encoder_dim=shapes["motion_encoder.dec.direction.weight"][0][0],
                face_encoder_hidden_dim=face_hidden,
                face_encoder_num_heads=shapes["face_encoder.conv1_local.conv.weight"][0][0] // face_hidden)


def _animate_class():
    """AnimateDiT, made on first use (diffusers is imported lazily, as everywhere in the engine)."""
    global AnimateDiT
    if AnimateDiT is not None:
        return AnimateDiT
    from diffusers import WanAnimateTransformer3DModel

    class _AnimateDiT(WanAnimateTransformer3DModel):
        """diffusers' modules (its __init__ and config, so that from_pretrained reads a folder's), ComfyUI's forward
        (module docstring); the loader gives the face adapter FrameFaceAttention."""

        face_tokens = _face_tokens
        forward = _forward

    AnimateDiT = _AnimateDiT
    return AnimateDiT


def _face_tokens(self, face_pixel_values: torch.Tensor) -> torch.Tensor:
    """Face video [B, 3, F, size, size] in -1..1 -> face tokens [B, F', heads + 1, dim] (ComfyUI's
    after_patch_embedding before the zero frame; 8 frames a batch through the motion encoder). The same tensor in
    the next step gives the same tokens: computed once per sampler call."""
    cached = getattr(self, "_face_cache", None)  # (pixels, their version, their tokens): a sampler call's steps share them
    if cached is not None and cached[0] is face_pixel_values and cached[1] == face_pixel_values._version:
        return cached[2]
    b, c, frames, h, w = face_pixel_values.shape
    pixels = face_pixel_values.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)  # (b t) c h w
    motion = torch.cat([self.motion_encoder(chunk) for chunk in pixels.split(self.config.motion_encoder_batch_size)])
    tokens = self.face_encoder(motion.view(b, frames, -1))
    self._face_cache = (face_pixel_values, face_pixel_values._version, tokens)
    return tokens


def _motion(self, face_pixel_values: torch.Tensor | None, frames: int) -> torch.Tensor | None:
    """The face tokens of each latent frame [B, T', heads + 1, dim]: a zero frame for the reference, then the face
    video's, padded with zeros or cut to the latent's frames (ComfyUI)."""
    if face_pixel_values is None:
        return None
    motion = self.face_tokens(face_pixel_values)
    motion = torch.cat([torch.zeros_like(motion[:, :1]), motion], dim=1)[:, :frames]
    if motion.shape[1] < frames:
        motion = torch.cat([motion, motion.new_zeros(motion.shape[0], frames - motion.shape[1], *motion.shape[2:])], 1)
    return motion


def _forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
             pose_latents=None, face_pixel_values=None, return_dict=True, attention_kwargs=None):
    """hidden_states [B, 36, T, H, W] (noise, mask, reference and video latents; frame 0 the reference);
    pose_latents [B, 16, P, H, W] in the model's latent space (added from frame 1 on); face_pixel_values
    [B, 3, F, size, size]. Either may be None (ComfyUI's behaviour)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.config.patch_size
    rotary_emb = self.rope(hidden_states)
    x = self.patch_embedding(hidden_states)  # [B, D, T', H', W']
    if pose_latents is not None:  # ComfyUI: x[:, :, 1:P + 1] += pose[:, :, :T' - 1]
        pose = self.pose_patch_embedding(pose_latents)
        n = min(pose.shape[2], x.shape[2] - 1)
        x = torch.cat([x[:, :, :1], x[:, :, 1:n + 1] + pose[:, :, :n], x[:, :, n + 1:]], dim=2)
    motion = _motion(self, face_pixel_values, x.shape[2])
    x = x.flatten(2).transpose(1, 2)  # [B, S, D], frame after frame
    temb, timestep_proj, text, image = self.condition_embedder(timestep, encoder_hidden_states,
                                                               encoder_hidden_states_image, timestep_seq_len=None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if image is not None:
        text = torch.cat([image, text], dim=1)
    every = self.config.inject_face_latents_blocks
    for i, block in enumerate(self.blocks):
        x = block(x, text, timestep_proj, rotary_emb)
        if motion is not None and i % every == 0:
            x = x + self.face_adapter[i // every](x, motion)
    shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (self.norm_out(x.float()) * (1 + scale) + shift).to(x.dtype)
    x = self.proj_out(x).reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


AnimateDiT = None


class FrameFaceAttention:
    """The face adapter's attention (ComfyUI's FaceBlock, diffusers' WanAnimateFaceBlockAttnProcessor): each video
    token's query attends to the face tokens of its latent frame. `where(local_len) -> (offset, valid)`: where this
    run of tokens starts in the whole sequence and how many tokens the whole sequence has (the rest is padding);
    one process: (0, local_len)."""

    def __init__(self, where=None):
        self.where = where or (lambda local_len: (0, local_len))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        x = attn.pre_norm_q(hidden_states)
        motion = attn.pre_norm_kv(encoder_hidden_states)
        batch, frames, per_frame, _ = motion.shape  # [B, T, heads + 1, D]
        query = attn.norm_q(attn.to_q(x).unflatten(2, (attn.heads, -1)))  # [B, s, H, d]
        key = attn.norm_k(attn.to_k(motion.flatten(1, 2)).view(batch, frames, per_frame, attn.heads, -1))
        value = attn.to_v(motion.flatten(1, 2)).view(batch, frames, per_frame, attn.heads, -1)
        local_len = x.shape[1]
        offset, valid = self.where(local_len)
        if valid % frames:
            raise ValueError(f"the face adapter got {valid} video tokens for {frames} latent frames")
        frame_len = valid // frames
        out = query.new_zeros(query.shape)
        end = min(offset + local_len, valid)  # tokens past `valid` are padding: left zero
        for frame in range(offset // frame_len, -(-end // frame_len) if end > offset else 0):
            a, b = max(frame * frame_len, offset) - offset, min((frame + 1) * frame_len, end) - offset
            # (B, s_f, H, d) x (B, heads + 1, H, d) -> (B, s_f, H, d)
            out[:, a:b] = F.scaled_dot_product_attention(query[:, a:b].transpose(1, 2), key[:, frame].transpose(1, 2),
                                                         value[:, frame].transpose(1, 2)).transpose(1, 2)
        out = attn.to_out(out.flatten(2, 3).type_as(query))
        if end - offset < local_len:
            out[:, max(end - offset, 0):] = 0.0
        return out


# -- the file's names ------------------------------------------------------------------------------------------

class _ChannelBias(torch.nn.Module):
    """diffusers' FusedLeakyReLU with its bias held as ComfyUI's file holds it, [1, C, 1, 1] (ComfyUI's
    FusedLeakyReLU): the same arithmetic, x + bias then a scaled leaky ReLU, and the file's tensor read as it is
    (the streamed loader reads rows; a [C] bias is C rows, the file's one row of C)."""

    def __init__(self, fused):
        super().__init__()
        self.negative_slope, self.scale = fused.negative_slope, fused.scale
        self.bias = torch.nn.Parameter(fused.bias.data.view(1, -1, 1, 1))

    def forward(self, x, channel_dim=1):
        return F.leaky_relu(x + self.bias, self.negative_slope) * self.scale


def comfy_layout(model) -> None:
    """The motion encoder's conv biases as [1, C, 1, 1] (_ChannelBias), for a model that loads a ComfyUI file."""
    from diffusers.models.transformers.transformer_wan_animate import FusedLeakyReLU

    for name, module in list(model.motion_encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FusedLeakyReLU) and child.bias is not None and hasattr(module, "weight") \
                    and module.weight.dim() == 4:
                setattr(module, child_name, _ChannelBias(child))


def convert(state: dict) -> dict:
    """ComfyUI's names -> ours: diffusers' single-file conversion for the DiT, the face encoder and the face adapter
    (the fused face k/v split); the motion encoder renamed here for any size (diffusers' conversion knows the 512
    one only), its conv biases kept [1, C, 1, 1] (comfy_layout); ComfyUI's blur kernel buffers not read."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    motion = {k: v for k, v in state.items() if k.startswith("motion_encoder.")}
    out = convert_wan_transformer_to_diffusers({k: v for k, v in state.items() if k not in motion})
    res_blocks = sum(1 for k in motion if re.fullmatch(r"motion_encoder\.enc\.net_app\.convs\.\d+\.conv1\.0\.weight", k))
    for key, value in motion.items():
        if not key.endswith(".kernel"):
            out[_diffusers_motion_key(key, res_blocks)] = value
    return out


_RES_PARTS = {"conv1.weight": "conv1.0.weight", "conv1.act_fn.bias": "conv1.1.bias", "conv2.weight": "conv2.1.weight",
              "conv2.act_fn.bias": "conv2.2.bias", "conv_skip.weight": "skip.1.weight"}
_MOTION_FIXED = {"motion_synthesis_weight": "dec.direction.weight", "conv_in.weight": "enc.net_app.convs.0.0.weight",
                 "conv_in.act_fn.bias": "enc.net_app.convs.0.1.bias"}


def _comfy_motion_key(key: str, res_blocks: int) -> str:
    """diffusers' motion encoder name -> ComfyUI's (conv_in, the res blocks, conv_out are its convs 0..n+1)."""
    rest = key[len("motion_encoder."):]
    if rest in _MOTION_FIXED:
        return "motion_encoder." + _MOTION_FIXED[rest]
    if rest == "conv_out.weight":
        return f"motion_encoder.enc.net_app.convs.{res_blocks + 1}.weight"
    if m := re.fullmatch(r"motion_network\.(\d+)\.(.+)", rest):
        return f"motion_encoder.enc.fc.{m[1]}.{m[2]}"
    m = re.fullmatch(r"res_blocks\.(\d+)\.(.+)", rest)
    return f"motion_encoder.enc.net_app.convs.{int(m[1]) + 1}.{_RES_PARTS[m[2]]}"


def _diffusers_motion_key(key: str, res_blocks: int) -> str:
    """ComfyUI's motion encoder name -> diffusers' (the inverse of _comfy_motion_key)."""
    rest = key[len("motion_encoder."):]
    fixed = {v: k for k, v in _MOTION_FIXED.items()}
    if rest in fixed:
        return "motion_encoder." + fixed[rest]
    if rest == f"enc.net_app.convs.{res_blocks + 1}.weight":
        return "motion_encoder.conv_out.weight"
    if m := re.fullmatch(r"enc\.fc\.(\d+)\.(.+)", rest):
        return f"motion_encoder.motion_network.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"enc\.net_app\.convs\.(\d+)\.(.+)", rest):
        parts = {v: k for k, v in _RES_PARTS.items()}
        if m[2] in parts:
            return f"motion_encoder.res_blocks.{int(m[1]) - 1}.{parts[m[2]]}"
    return key  # unknown: left as it is (the loader names it as unexpected)


def to_comfy_keys(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers WanAnimateTransformer3DModel names -> ComfyUI's (the tiny files): the inverse of `convert`, with
    the blur kernels ComfyUI's motion encoder keeps as buffers."""
    from ..wan21.tiny import wan_to_original_keys

    out, rest = {}, {}
    res_blocks = int(math.log2(config.get("motion_encoder_size", 512))) - 2
    face = {"to_q.": "linear1_q.", "to_out.": "linear2.", "norm_q.": "q_norm.", "norm_k.": "k_norm."}
    for key, value in state.items():
        if m := re.match(r"face_adapter\.(\d+)\.(.+)", key):
            index, name = m[1], m[2]
            if name.startswith("to_k."):
                out[f"face_adapter.fuser_blocks.{index}.linear1_kv.{name[5:]}"] = torch.cat(
                    [value, state[f"face_adapter.{index}.to_v.{name[5:]}"]])
            elif not name.startswith("to_v."):
                prefix = next(p for p in face if name.startswith(p))
                out[f"face_adapter.fuser_blocks.{index}.{face[prefix]}{name[len(prefix):]}"] = value
        elif m := re.match(r"face_encoder\.(conv1_local|conv2|conv3)\.(.+)", key):
            out[f"face_encoder.{m[1]}.conv.{m[2]}"] = value
        elif key.startswith("motion_encoder."):
            out[_comfy_motion_key(key, res_blocks)] = value.view(1, -1, 1, 1) if key.endswith("act_fn.bias") else value
        else:
            rest[key] = value
    out.update(wan_to_original_keys(rest))
    blur = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = blur[None, :] * blur[:, None]
    blur = blur / blur.sum()
    for i in range(res_blocks):
        for part in ("conv2", "skip"):
            out[f"motion_encoder.enc.net_app.convs.{i + 1}.{part}.0.kernel"] = blur.clone()
    return out


def load_animate_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                             keep_fp8: bool = True, shard=None):
    """A Wan 2.2 Animate DiT (AnimateDiT) from a ComfyUI single file (streamed, as Wan 2.1's) or a diffusers
    WanAnimateTransformer3DModel folder."""
    cls = _animate_class()
    path = Path(path)
    if path.is_dir():
        model = from_folder(cls, path, dtype, device, "a diffusers WanAnimateTransformer3DModel folder (the "
                                                      "'transformer' subfolder of a Wan Animate pipeline)")
        if shard is not None:
            shard(model)
        return _attend_by_frame(model)
    shapes, metadata = read_header(path)
    config = infer_animate_config(path, shapes, metadata)

    def make():
        model = cls(**config)
        comfy_layout(model)
        return model

    model = streamed.load(make, path, convert, dtype, device, "the Wan 2.2 Animate architecture",
                          keep_within=("blocks.",) if keep_fp8 else (), shard=shard,
                          ignore_unexpected=("norm_added_q",), comfy_dit=True)
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size,
                                  model.config.rope_max_seq_len).to(device)
    for module in model.modules():  # the blur kernels are non-persistent buffers: built for real
        if getattr(module, "blur", False):
            kernel = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
            kernel = kernel[None, :] * kernel[:, None]
            module.blur_kernel = kernel / kernel.sum()
    return _attend_by_frame(model)


def _attend_by_frame(model):
    """The face adapter's attention by frame (FrameFaceAttention; one process until parallelize_animate)."""
    for block in model.face_adapter:
        block.set_processor(FrameFaceAttention())
    return model


def parallelize_animate(model, sp, backend: str = "sdpa") -> SequenceHooks:
    """Wan 2.1's USP (self-attention over the sharded tokens, text and image local, tokens sharded entering the
    first block and gathered after the head); the pose latents are added before the first block, so they are
    sharded with the tokens; the face adapter attends by frame from the rank's offset in the sequence."""
    hooks = wan.parallelize_wan(model, sp, backend)
    state = hooks.state

    def where(local_len: int) -> tuple[int, int]:
        return sp.rank * local_len, state.valid_len

    for block in model.face_adapter:
        block.set_processor(FrameFaceAttention(where))
    return hooks

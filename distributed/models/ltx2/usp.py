"""Sequence parallelism for diffusers' LTX2VideoTransformer3DModel, applied from outside the model.

The video tokens are split over the SP ranks as for every family (tail-padded, KeyLayout); the audio tokens are
held whole on every rank. LTX-2's audio is about 25 tokens a second against thousands of video tokens a frame
(121 frames at 768x512: 6,144 video and 126 audio tokens), so the whole audio stream costs each rank little
compute, and it needs no collective of its own. Per block:

  video self-attention   USP (Ulysses all-to-all x Ring) over the video shards, padded keys left out;
  video/audio x text     local (the text is whole on every rank);
  audio self-attention   local (the audio is whole);
  audio-to-video         local: the queries are this rank's video tokens, the keys/values the whole audio;
  video-to-audio         the audio queries attend to this rank's video keys only, giving a partial result and
                         its log-sum-exp; an all-reduce of the log-sum-exps' maximum (B x La x Ha floats) and one
                         of the rescaled partials (B x La x Ha x (Da + 1)) give the exact attention on every rank.
                         The video keys and values never leave their rank.

Before the blocks, a forward pre-hook shards the video tokens, their coordinates (the RoPE of every attention is
made from them, per token) and a per-token timestep; after proj_out the video output is all-gathered and
unpadded. Every rank thus returns the whole video and audio outputs, equal to one process up to rounding.
"""

from __future__ import annotations

import inspect

import torch

from ...parallel.mesh import SequenceParallel
from ...parallel.sharding import gather_sequence, shard_sequence
from ...parallel.usp_attention import KeyLayout, attention_with_lse, usp_attention
from ..family import SequenceHooks


class _ShardState:
    """What the processors need to know about the current forward."""

    video_len: int = 0   # real video tokens (the whole sequence)
    local_len: int = 0   # video tokens per rank, padding included
    layout: KeyLayout | None = None

    def valid_on(self, rank: int) -> int:
        """Real video tokens held by SP rank `rank`."""
        return max(0, min(self.local_len, self.video_len - rank * self.local_len))


def _project(attn, hidden_states, context, query_rope, key_rope):
    """q (from hidden_states), k, v (from context) as (B, L, H, D) with LTX-2's norms and RoPE."""
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    q, k = attn.norm_q(q), attn.norm_k(k)
    if query_rope is not None:
        rotate = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
        q, k = rotate(q, query_rope), rotate(k, key_rope if key_rope is not None else query_rope)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))


def _finish(attn, hidden_states, out):
    """The per-head gates (LTX-2.3) and the output projection; out: (B, L, H, D)."""
    if attn.to_gate_logits is not None:
        out = out * (2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))).unsqueeze(-1)
    out = out.flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](out))


class UspVideoSelfAttention:
    """attn1 of every block: self-attention over the sharded video tokens (USP)."""

    def __init__(self, sp: SequenceParallel, backend: str, state: _ShardState):
        self.sp, self.backend, self.state = sp, backend, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        if all_perturbed is None:
            all_perturbed = bool(torch.all(perturbation_mask == 0)) if perturbation_mask is not None else False
        if all_perturbed:  # spatio-temporal guidance: the values stand for the attention
            out = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
            return _finish(attn, hidden_states, out)
        q, k, v = _project(attn, hidden_states, hidden_states, query_rotary_emb, key_rotary_emb)
        out = usp_attention(q, k, v, self.sp, self.state.layout, self.backend).to(q.dtype)  # (B, S/N, H, D)
        if perturbation_mask is not None:
            out = torch.lerp(v, out, perturbation_mask.unsqueeze(-1))
        return _finish(attn, hidden_states, out)


class VideoToAudioAttention:
    """video_to_audio_attn of every block: the whole audio attends to the sharded video, merged exactly by the
    log-sum-exp of each rank's partial attention (no video key or value leaves its rank)."""

    def __init__(self, sp: SequenceParallel, backend: str, state: _ShardState):
        self.sp, self.backend, self.state = sp, backend, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states, query_rotary_emb, key_rotary_emb)
        mine = self.state.valid_on(self.sp.rank)
        out = merge_partials(q, k[:, :mine], v[:, :mine], self.sp, self.backend)
        return _finish(attn, hidden_states, out.to(q.dtype))


def merge_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel, backend: str) -> torch.Tensor:
    """Attention of the queries q (B, Lq, H, D), the same on every rank, over the keys/values k, v (B, Lk, H, D)
    of all SP ranks together, each rank holding its own (Lk may be 0). Each rank computes its partial attention
    and log-sum-exp; an all-reduce (max) of the log-sum-exps, then one (sum) of the partials weighted by
    exp(lse - max) beside the weights, (B, Lq, H, D + 1) floats, give softmax over all keys exactly: what each
    rank sends does not grow with the ranks (an all-gather of the partials would send N - 1 copies)."""
    if sp.degree == 1:
        return attention_with_lse(q, k, v, backend)[0]
    import torch.distributed as dist

    if k.shape[1] > 0:
        out, lse = attention_with_lse(q, k, v, backend)  # (B, Lq, H, D), (B, H, Lq) float32
        out, lse = out.float(), lse.transpose(1, 2).unsqueeze(-1)  # lse: (B, Lq, H, 1)
    else:  # a rank with no video tokens (a short video on many ranks): weight 0
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = torch.full((*q.shape[:-1], 1), -torch.inf, dtype=torch.float32, device=q.device)
    top = lse.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=sp.group)
    weight = torch.exp(lse - top)
    packed = torch.cat([out * weight, weight], dim=-1)
    dist.all_reduce(packed, group=sp.group)
    return packed[..., :-1] / packed[..., -1:]


def _bound(model, args, kwargs) -> dict:
    """The forward's arguments by name (the stock forward takes most of them positionally or by keyword)."""
    signature = inspect.signature(type(model).forward)
    bound = signature.bind(model, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments


def parallelize_ltx2(model, sp: SequenceParallel, backend: str = "sdpa") -> SequenceHooks:
    """Apply sequence parallelism to an LTX2VideoTransformer3DModel in place (see the module docstring); the
    module comes back in the SequenceHooks with the state its hooks share."""
    state = _ShardState()
    video_self = UspVideoSelfAttention(sp, backend, state)
    video_to_audio = VideoToAudioAttention(sp, backend, state)
    for block in model.transformer_blocks:
        block.attn1.set_processor(video_self)
        block.video_to_audio_attn.set_processor(video_to_audio)

    def shard_inputs(module, args, kwargs):
        values = _bound(module, args, kwargs)
        hidden = values["hidden_states"]  # (B, S, C) video tokens
        batch, video_len = hidden.shape[:2]
        if values.get("video_self_attention_mask") is not None:  # the stock forward passes no other mask
            raise ValueError("video_self_attention_mask (IC-LoRA's reference tokens) is not supported by usp-video's "
                             "LTX-2 yet; run without IC-LoRA conditioning")
        if values.get("video_coords") is None:  # as the stock forward makes them
            values["video_coords"] = module.rope.prepare_video_coords(
                batch, values["num_frames"], values["height"], values["width"], hidden.device,
                fps=values.get("fps", 24.0))
        timestep = values["timestep"]
        if values.get("audio_timestep") is None:
            values["audio_timestep"] = timestep  # the stock default, before the video's is sharded
        state.video_len = video_len
        state.local_len = -(-video_len // sp.degree)
        state.layout = KeyLayout.tail_padded(video_len, state.local_len, sp)
        values["hidden_states"] = shard_sequence(hidden, 1, sp)
        values["video_coords"] = shard_sequence(values["video_coords"], 2, sp)  # (B, 3, S, 2)
        if timestep.ndim == 2 and timestep.shape[1] == video_len:  # a timestep per video token
            values["timestep"] = shard_sequence(timestep, 1, sp)
        if values.get("video_keyframes_mask") is not None:
            values["video_keyframes_mask"] = shard_sequence(values["video_keyframes_mask"], 1, sp)
        return (), values

    def gather_video(module, args, output):
        return gather_sequence(output, 1, sp, state.video_len)  # (B, S/N, C) -> (B, S, C)

    model.register_forward_pre_hook(shard_inputs, with_kwargs=True)
    model.proj_out.register_forward_hook(gather_video)
    return SequenceHooks(model, state)

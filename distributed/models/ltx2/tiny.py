"""The tiny LTX-2 DiT, in the layout of Lightricks' all-in-one checkpoints (for the tests and the demo).

`make_tiny_ltx2(root)` writes models/checkpoints/tiny_ltx2_<rope>.safetensors: the transformer under
`model.diffusion_model.`, the video and audio VAEs under `vae.` / `audio_vae.` and the vocoder under `vocoder.`,
with the original names, their configs in the safetensors metadata (tiny shapes match no released variant).
`tiny_inputs(...)` gives one forward's inputs: packed video and audio tokens, text for each stream, the timesteps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from . import dit as ltx2, vae as ltx2_vae, vocoder as ltx2_vocoder

FILES = {"split": "checkpoints/tiny_ltx2_split.safetensors",
         "interleaved": "checkpoints/tiny_ltx2_interleaved.safetensors"}
_VERSION = "1"


def tiny_config(rope_type: str = "split", **changes) -> dict:
    return dict(ltx2.TINY_LTX2_CONFIG, rope_type=rope_type, **changes)


def tiny_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The stock class's random weights for config (diffusers names), every parameter away from its
    initial zeros and ones so that no path is silently inert."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTX2VideoTransformer3DModel(**config)
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def vocoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed + 30)
    return LTX2Vocoder(**ltx2_vocoder.TINY_VOCODER).state_dict()


def vae_states(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tiny video and audio VAEs' weights (diffusers names), statistics away from 0 and 1."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    states = []
    for i, (cls, config) in enumerate(((AutoencoderKLLTX2Video, ltx2_vae.TINY_VIDEO_VAE),
                                       (AutoencoderKLLTX2Audio, ltx2_vae.TINY_AUDIO_VAE))):
        torch.manual_seed(seed + 10 + i)
        state = cls(**config).state_dict()
        g = torch.Generator().manual_seed(seed + 20 + i)
        state["latents_mean"] = 0.1 * torch.randn(state["latents_mean"].shape, generator=g)
        state["latents_std"] = 1.0 + 0.1 * torch.rand(state["latents_std"].shape, generator=g)
        states.append(state)
    return states[0], states[1]


def write_checkpoint(path: str | Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                     vaes: bool = False) -> Path:
    """An all-in-one file of the stock classes' weights, with the original names: the transformer for config,
    and with vaes the tiny video and audio VAEs and the vocoder."""
    state = {f"model.diffusion_model.{k}": v for k, v in ltx2.ltx2_to_original_keys(tiny_state(config, seed)).items()}
    metadata = {ltx2.CONFIG_METADATA_KEY: json.dumps(config)}
    if vaes:
        video, audio = vae_states(seed)
        state.update(ltx2_vae.video_vae_to_original(video))
        state.update(ltx2_vae.audio_vae_to_original(audio))
        state.update(ltx2_vocoder.vocoder_to_original(vocoder_state(seed)))
        metadata.update(ltx2_vae.vae_metadata())
        metadata[ltx2_vocoder.CONFIG_KEY] = json.dumps(ltx2_vocoder.TINY_VOCODER)
    path = Path(path)
    save_safetensors({k: v.to(dtype) for k, v in state.items()}, path, metadata)
    return path


def make_tiny_ltx2(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny LTX-2 checkpoints (rope "split" as released, and "interleaved") under root."""
    root = Path(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-ltx2"
    if stamp.is_file() and stamp.read_text() == _VERSION and all(p.exists() for p in paths.values()):
        return paths
    for rope_type, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(path, tiny_config(rope_type), seed, vaes=True)
    stamp.write_text(_VERSION)
    return paths


def tiny_inputs(shape, audio_frames: int, config: dict | None = None, text_len: int = 7, seed: int = 1,
                batch: int = 1, per_token_timestep: bool = False, use_cross_timestep: bool = False,
                stg_mask: list[float] | None = None) -> dict:
    """One forward's keyword inputs for a video latent of shape (frames, rows, columns) and audio_frames audio
    latents: packed tokens (patch 1), text for each stream (a padded tail masked out), timestep 700 (or one per
    video token, the first latent frame kept at 0 as image-to-video conditioning does)."""
    config = config or ltx2.TINY_LTX2_CONFIG
    g = torch.Generator().manual_seed(seed)
    frames, rows, cols = shape
    video_tokens = frames * rows * cols
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    audio_inner = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    text_dim = config["caption_channels"] if config.get("use_prompt_embeddings", True) else inner
    audio_text_dim = config["caption_channels"] if config.get("use_prompt_embeddings", True) else audio_inner
    mask = torch.ones(batch, text_len)
    mask[:, text_len - 2:] = 0  # two padded text tokens
    timestep = torch.full((batch,), 700.0)
    video_timestep = timestep
    if per_token_timestep:
        video_timestep = timestep[:, None].expand(batch, video_tokens).clone()
        video_timestep[:, :rows * cols] = 0.0
    return dict(
        hidden_states=torch.randn(batch, video_tokens, config["in_channels"], generator=g),
        audio_hidden_states=torch.randn(batch, audio_frames, config["audio_in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, text_dim, generator=g),
        audio_encoder_hidden_states=torch.randn(batch, text_len, audio_text_dim, generator=g),
        timestep=video_timestep, audio_timestep=timestep, sigma=timestep / 1000.0,
        encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
        num_frames=frames, height=rows, width=cols, fps=24.0, audio_num_frames=audio_frames,
        use_cross_timestep=use_cross_timestep,
        **({} if stg_mask is None else dict(spatio_temporal_guidance_blocks=[0], perturbation_mask=torch.tensor(stg_mask))))

"""The tiny Wan 2.1 VACE set, in ComfyUI's on-disk layout (original key names), beside the tiny Wan-VAE it shares
with Wan 2.1:

    diffusion_models/tiny_wan2.1_vace.safetensors   the DiT: 4 heads x 128 (512 wide), text_dim 4096, freq_dim 256,
                                                    4 layers, VACE blocks after layers 0 and 2 (ComfyUI's own
                                                    detection reads this config from the file: UNETLoader loads it)
    text_encoders/tiny_umt5_4096.safetensors        a UMT5 of 2 layers but the DiT's 4096-wide output
    input/tiny_vace_control.png                     a control image made in code (the demo's start image)

Also the tiny debug config for the tests (tests/parity_targets.py): tiny_inputs, tiny_request, tiny_vace_conditioning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats.checkpoint import save_safetensors
from ..wan21 import dit as wan
from ..wan21 import tiny as wan21_tiny
from . import dit

TINY_VACE_CONFIG = dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], num_attention_heads=4, ffn_dim=256, num_layers=4,
                        vace_layers=[0, 2], vace_in_channels=dit.FRAME_CHANNELS + dit.MASK_CHANNELS)
TINY_UMT5_4096 = dict(wan21_tiny.TINY_UMT5, d_model=TINY_VACE_CONFIG["text_dim"])
FILES = {"dit": "diffusion_models/tiny_wan2.1_vace.safetensors",
         "text_encoder": "text_encoders/tiny_umt5_4096.safetensors", "image": "input/tiny_vace_control.png"}
_VERSION = "2"


def vace_to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanVACETransformer3DModel names -> the original / ComfyUI names (Wan 2.1's, and the VACE blocks'
    before_proj / after_proj)."""
    import re

    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^vace_blocks\.(\d+)\.proj_in\.", r"vace_blocks.\1.before_proj.", key)
        key = re.sub(r"^vace_blocks\.(\d+)\.proj_out\.", r"vace_blocks.\1.after_proj.", key)
        renamed[key] = value
    out = wan21_tiny.wan_to_original_keys(renamed)
    return {re.sub(r"^vace_blocks\.(\d+)\.scale_shift_table$", r"vace_blocks.\1.modulation", k): v
            for k, v in out.items()}


def make_tiny_models(root: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write the set under root (skipped where already written): {"dit", "vae", "text_encoder"}."""
    from diffusers import WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(root)
    shared = wan21_tiny.make_tiny_models(root)
    paths = {name: root / rel for name, rel in FILES.items()}
    stamp = root / ".usp-video-tiny-wan2.1-vace"
    if not (stamp.is_file() and stamp.read_text() == _VERSION and all(p.is_file() for p in paths.values())):
        torch.manual_seed(61)
        model = WanVACETransformer3DModel(**TINY_VACE_CONFIG)
        save_safetensors({k: v.to(dtype) for k, v in vace_to_original_keys(model.state_dict()).items()}, paths["dit"],
                         {wan.CONFIG_METADATA_KEY: json.dumps(TINY_VACE_CONFIG)})
        spiece = wan21_tiny.train_tiny_spiece()
        import sentencepiece

        vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", **TINY_UMT5_4096))
        state = {k: v.to(dtype) for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
        state["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
        save_safetensors(state, paths["text_encoder"], {})
        synthetic_control(paths["image"])
        stamp.write_text(_VERSION)
    return {**paths, "vae": shared["vae"]}


def synthetic_control(path: Path, width: int = 64, height: int = 48) -> None:
    """A control image made in code (what `usp-video demo --model wan-vace` starts from: WanVaceToVideo's control
    video holding it, then gray): a bright disc on a diagonal gradient, as an edge or depth map might look."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disc = (((x - 0.6) * width) ** 2 + ((y - 0.45) * height) ** 2 < (0.3 * height) ** 2).float()
    rgb = torch.stack([0.3 * (x + y) + 0.6 * disc, 0.5 * x + 0.4 * disc, 0.5 * y + 0.2 * disc], dim=-1).clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(path)


# -- the tiny debug config (tests/parity_targets.py) ------------------------------------------------------------

TEXT_DIM = TINY_VACE_CONFIG["text_dim"]


def tiny_inputs(shape: tuple[int, int, int], seed: int = 1, text_len: int = 20) -> tuple[torch.Tensor, ...]:
    """One forward's positional inputs of diffusers' own forward (a batch of two): (latent [2, 16, T, H, W],
    timesteps, text [2, L, 4096], no image, one control context [2, 96, T, H, W], a scale per VACE layer)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, *shape, generator=g)
    context = torch.randn(2, text_len, TEXT_DIM, generator=g)
    control = torch.randn(2, TINY_VACE_CONFIG["vace_in_channels"], *shape, generator=g)
    scale = torch.tensor([0.7, 1.3])[:len(TINY_VACE_CONFIG["vace_layers"])]
    return x, torch.tensor([900.0, 250.0]), context, None, control, scale


def tiny_vace_conditioning(shape: tuple[int, int, int], contexts: int = 1, reference: bool = False,
                           strengths: tuple[float, ...] = (1.0, 0.6), seed: int = 4) -> dict[str, torch.Tensor]:
    """A side's conditioning as WanVaceToVideo nodes make it (stacked), for a latent of shape (T, H, W) (a
    reference image's frame included): raw latents (inactive | reactive; with reference, the first frame is the
    reference latent with Wan 2.1's process_out(0) as its reactive half), a 0..1 mask on 64 channels (0 on the
    reference frame), one strength per context."""
    from ..wan21 import FAMILY as WAN21

    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(1, contexts, dit.FRAME_CHANNELS, *shape, generator=g)
    mask = (torch.rand(1, contexts, dit.MASK_CHANNELS, *shape, generator=g) > 0.5).float()
    if reference:
        frames[:, :, 16:, :1] = WAN21.process_out(torch.zeros(1, 16, 1, *shape[1:])).unsqueeze(1)
        mask[:, :, :, :1] = 0.0
    return {"tokens": torch.randn(1, 24, TEXT_DIM, generator=g), "vace_frames": frames, "vace_mask": mask,
            "vace_strength": torch.tensor([list(strengths[:contexts])])}


def tiny_request(family, experts: list[str], shape: tuple[int, int, int], steps: int = 3, sampler: str = "euler",
                 seed: int = 7, cfg: float = 5.0, contexts: int = 1, reference: bool = False,
                 vace: bool = True) -> dict:
    """The fields of a SampleRequest for the tiny VACE DiT: the same control on both sides (as WanVaceToVideo sets
    it), other texts; vace False: text only (zeros frames, a mask of ones, as ComfyUI runs a VACE model then)."""
    positive = tiny_vace_conditioning(shape, contexts, reference)
    negative = dict(positive, tokens=torch.randn(1, 17, TEXT_DIM, generator=torch.Generator().manual_seed(9)))
    if not vace:
        positive, negative = {"tokens": positive["tokens"]}, {"tokens": negative["tokens"]}
    return dict(experts=list(experts), positive=positive, negative=negative,
                latent=torch.zeros(1, family.latent_channels, *shape), seed=seed, steps=steps, cfg=cfg, shift=5.0,
                sampler=sampler)

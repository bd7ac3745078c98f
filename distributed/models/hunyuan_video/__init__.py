"""HunyuanVideo text-to-video: diffusers' HunyuanVideoTransformer3DModel with USP for its joint
video+text attention (dit.py), the LLaVA-Llama-3 + CLIP-L text encoders (text.py), its VAE with the
tiles of its tiled decode shared out (vae.py), and the tiny set (tiny.py). FAMILY is what the rest of
the pack sees (models/family.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..family import Defaults, ModelFamily, Option, PlanVariant, TextPart
from ...parallel.vae_split import VaeSplit
from ...formats import streamed
from ...formats.checkpoint import read_header
from . import dit, lora_names, text, vae


def _plan_variant(label: str, variant: str, params: float) -> PlanVariant:
    """A released HunyuanVideo DiT (dit.HUNYUAN_VARIANTS) as the planner costs it; params: its published size.
    Its FFN is counted as step_sequence counts it (the single blocks' MLP, 1.5x)."""
    config = dit.HUNYUAN_VARIANTS[variant]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return PlanVariant(label, heads=config["num_attention_heads"], hidden=hidden,
                       attention_layers=config["num_layers"] + config["num_single_layers"], params=params,
                       ffn=int(1.5 * config["mlp_ratio"] * hidden),
                       patch=(config["patch_size_t"], config["patch_size"], config["patch_size"]),
                       text_tokens=text.MAX_TOKENS, joint_text=True)


class HunyuanVideo(ModelFamily):
    name, label, short_name = "hunyuan-video", "HunyuanVideo", "hunyuan"
    order = 20
    dit_class, vae_class = "HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo"
    latent_format = "HunyuanVideo"
    comfy_model_configs = ("HunyuanVideo",)
    defaults = Defaults(sampler="euler", shift=7.0, cfg=1.0)
    text_parts = (
        TextPart("llama", "llava_llama3 .safetensors file or diffusers text_encoder folder",
                 load=lambda path, dtype, device, shard: text.load_llama(path, dtype, device, shard=shard),
                 shard_units=lambda llama: llama.layers),
        TextPart("clip", "clip_l .safetensors file or diffusers text_encoder_2 folder",
                 load=lambda path, dtype, device, shard: text.load_clip_l(path, dtype, device)),
        TextPart("tokenizers", "folder with the Llama 3 and CLIP tokenizers (llama/ and clip/, a diffusers "
                 "HunyuanVideo folder, or a ComfyUI checkout)",
                 load=lambda path, dtype, device, shard: text.load_tokenizers(path), tokenizers=True),
    )
    text_encoder_hint = "HunyuanVideo uses the llava-llama-3 text encoder with CLIP-L"
    options = {"guidance": Option(default=6.0, low=0.0, high=100.0, help="HunyuanVideo's embedded guidance")}
    cond_keys = ("tokens", "pooled_output")  # ComfyUI's name for CLIP-L's pooled text, end to end
    plan_variants = {"hunyuan": _plan_variant("HunyuanVideo T2V", "hunyuan-video-t2v-720p", 12.8e9)}
    # HunyuanVideo, 1280x720, 129 frames, 50 steps, Ulysses on H100 (xDiT's HunyuanVideo results)
    reference_times = {("hunyuan", "1280x720x129"): {1: 1904, 2: 925, 4: 514, 8: 338}}

    def is_dit(self, keys: set[str]) -> bool:
        return dit.is_hunyuan_keys(keys)

    def is_vae(self, keys: set[str]) -> bool:
        return vae.is_hunyuan_vae_keys({k.removeprefix("vae.") for k in keys})

    def describe(self, shapes: dict) -> str | None:
        keys = set(shapes)
        if any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys) and any("txt_in" in k for k in keys):
            return "looks like a HunyuanVideo DiT"
        return None

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        return dit.infer_hunyuan_config(path, shapes, metadata)

    def load_dit(self, path, dtype, device, shard=None):
        return dit.load_hunyuan_transformer(path, dtype, device, shard=shard)

    def dit_load_bytes(self, path, dtype, shares):
        if Path(path).is_dir():
            return super().dit_load_bytes(path, dtype, shares)
        return streamed.load_peak_bytes(path, dtype, shares, keep_within=dit.FP8_WITHIN_FILE)

    def dit_source_map(self, path):
        if Path(path).is_dir():
            return super().dit_source_map(path)
        shapes, metadata = read_header(path)
        config = dit.infer_hunyuan_config(Path(path), shapes, metadata)
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        return streamed.file_source_map(path, lambda state: dit.convert_to_diffusers(state, hidden))

    def lora_aliases(self, stem):
        return lora_names.lora_aliases(stem)

    def parallelize(self, model, sp, backend):
        return dit.parallelize_hunyuan(model, sp, backend)

    def blocks(self, model):
        return [*model.context_embedder.token_refiner.refiner_blocks, *model.transformer_blocks,
                *model.single_transformer_blocks]

    def describe_dit(self, model) -> dict:
        config = model.config
        return {"heads": config.num_attention_heads, "layers": config.num_layers + config.num_single_layers,
                "hidden": config.num_attention_heads * config.attention_head_dim, "text_dim": config.text_embed_dim}

    def step_sequence(self, model, latent_shape, text_tokens):
        # the text tokens join the video tokens in every block's attention; the single blocks hold the
        # MLP's input and activation (mlp_ratio x hidden each) and then the attention output and the MLP's
        # output concatenated ((1 + mlp_ratio) x hidden): counted as an FFN 1.5x as wide
        config = model.config
        t, h, w = latent_shape[-3:]
        video = -(-t // config.patch_size_t) * -(-h // config.patch_size) * -(-w // config.patch_size)
        hidden = config.num_attention_heads * config.attention_head_dim
        return {"tokens": video + text_tokens, "hidden": hidden, "ffn": int(1.5 * config.mlp_ratio * hidden)}

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * dit.LATENT_SCALE  # ComfyUI's latent_format.HunyuanVideo

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / dit.LATENT_SCALE

    def velocity(self, model, x, t, cond, options):
        pooled = cond.get("pooled_output")
        if pooled is None:
            raise ValueError("HunyuanVideo needs the pooled CLIP-L output with the conditioning "
                             "(ComfyUI's DualCLIPLoader type hunyuan_video, or our HunyuanVideo text encoder)")
        g = None
        if model.config.guidance_embeds:  # embedded guidance: the distilled CFG scale, times 1000
            g = torch.full((x.shape[0],), options["guidance"] * 1000.0, device=x.device, dtype=x.dtype)
        return model(x, t, cond["tokens"], None, pooled.to(x.device, x.dtype), g, return_dict=False)[0]

    def step_cache_spec(self, model, latent_shape):
        from ...sampling.step_cache import StepCacheSpec, nearest_interp

        # MagCache's curves were calibrated at 720p and 544p: the nearer one by the video's height
        tall = latent_shape[-2] * 8 >= 632
        curve = dit.MAGCACHE_HUNYUAN_720P if tall else dit.MAGCACHE_HUNYUAN_544P

        first = model.transformer_blocks[0]

        def modulated_input(args):
            # TeaCache4HunyuanVideo's measure: the first block's timestep-modulated, normalised image tokens
            # (norm1(hidden, temb)[0], per token). With sharded weights the block's parameters are gathered
            # for it, as its own forward would.
            sharded = hasattr(first, "unshard")
            if sharded:
                first.unshard()
            try:
                return first.norm1(args[0], emb=args[2])[0], 1
            finally:
                if sharded:
                    first.reshard()

        # the double blocks, then the single blocks; both take and return (image tokens, text tokens)
        return StepCacheSpec(block_lists=[model.transformer_blocks, model.single_transformer_blocks],
                             block_output=lambda args, hidden: (hidden, args[1]), teacache_input=modulated_input,
                             teacache_coefficients=dit.TEACACHE_HUNYUAN, teacache_warmup=1, teacache_last=True,
                             teacache_note="TeaCache's HunyuanVideo coefficients",
                             magcache_ratios=lambda side, steps: nearest_interp(curve, steps), magcache_k=6,
                             magcache_note=f"MagCache's HunyuanVideo {'720p' if tall else '544p'} ratios")

    def check_conditioning(self, cond: dict, name: str) -> None:
        pooled = cond.get("pooled_output")
        if pooled is None:
            raise ValueError(f"{name}: HunyuanVideo needs the pooled CLIP-L output with the conditioning "
                             "(ComfyUI's DualCLIPLoader type hunyuan_video, or our HunyuanVideo text encoder)")
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or not pooled.is_floating_point():
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"{name}_pooled must be the pooled CLIP-L output [batch, 768], got {shape}")
        tokens = cond["tokens"]
        if pooled.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"{name}_pooled has batch {pooled.shape[0]} for conditioning of batch {tokens.shape[0]}")
        if not torch.isfinite(pooled).all():
            raise ValueError(f"{name}_pooled contains NaN or infinite values")

    def takes_text_files(self, headers: list[dict]) -> bool:
        return "text_model.embeddings.token_embedding.weight" in headers[1]  # CLIP-L beside the Llama

    def make_text_encoder(self, parts: dict):
        return _Encoder(text.HunyuanTextEncoder(parts["llama"], parts["clip"], *parts["tokenizers"]))

    def load_vae(self, path, dtype, device):
        return vae.load_hunyuan_vae(path, dtype, device)

    def decode(self, loaded_vae, latent: torch.Tensor, split: VaeSplit | None):
        return vae.decode(loaded_vae, latent, split)

    def decoder_calls(self, loaded_vae, latent: torch.Tensor) -> int:
        return vae.tile_count(loaded_vae, latent)

    def make_tiny(self, root):
        from .tiny import make_tiny_hunyuan_models

        return make_tiny_hunyuan_models(root)


class _Encoder:
    """Llama + CLIP-L as a family text encoder: prompt -> {"tokens": [1, n, 4096], "pooled_output": [1, 768]}."""

    def __init__(self, encoder: text.HunyuanTextEncoder):
        self.encoder = encoder

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        tokens, pooled = self.encoder.encode(prompt)
        return {"tokens": tokens, "pooled_output": pooled}


FAMILY = HunyuanVideo()

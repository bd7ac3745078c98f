"""The engine: loaded models and the requests they serve, in one process or on one rank.

Every rank of the group holds an Engine. `sample` runs on all ranks (the DiT is sequence
parallel); `encode` and `decode` run on rank 0 only. With world size 1 and no process group
the same code serves the CLI and the tests.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from . import planner
from .models import families, fp8, hunyuan_text, hunyuan_vae, umt5, wan_vae
from .models.checkpoint import CheckpointError
from .models.families import TextCond
from .parallel import fsdp
from .parallel.mesh import SequenceParallel, build_sequence_parallel, resolve_degrees
from .parallel.vae_split import decode_split
from .parallel.usp_attention import resolve_backend
from .sampling.samplers import get_sampler
from .sampling.schedules import sampling_sigmas, timestep
from .validation import check_latent



class SamplingInterrupted(Exception):
    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


@dataclass(kw_only=True)
class SampleRequest:
    """One sampler call. Conditioning is [B or 1, L, D] (HunyuanVideo: plus pooled [B or 1, 768]);
    latent is raw VAE space [B, 16, T, H, W]; guidance is HunyuanVideo's embedded guidance."""

    dit: str
    positive: torch.Tensor
    negative: torch.Tensor | None
    latent: torch.Tensor
    seed: int
    steps: int
    cfg: float
    shift: float
    sampler: str = "unipc"
    denoise: float = 1.0
    positive_pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    guidance: float = 6.0


def _file_key(path: str) -> tuple:
    """Identifies a model file's contents: a changed file is a different model."""
    p = Path(path).resolve()
    if not p.exists():
        raise CheckpointError(f"model file not found on rank: {p}")
    stat = p.stat()
    return str(p), stat.st_mtime_ns, stat.st_size


def make_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise exactly as ComfyUI's comfy.sample.prepare_noise makes it: one CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def _free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA), or available system memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: never shard automatically


def _weight_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes a model file's weights take at the compute dtype (from its header alone)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*.safetensors"))
    from .models.checkpoint import read_header

    shapes, _ = read_header(p)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(int(torch.tensor(shape).prod()) * size for shape, _ in shapes.values())


def _exchange(mine: torch.Tensor, group, device: torch.device) -> list[torch.Tensor]:
    """All-gather one tensor across the CFG pair: [conditional half's, unconditional half's]
    (on the compute device, which NCCL needs; returned on the CPU)."""
    import torch.distributed as dist

    mine = mine.to(device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine, group=group)
    return [p.cpu() for p in parts]


class Engine:
    def __init__(self, *, world_size: int = 1, rank: int = 0, ulysses: int | str = "auto",
                 ring: int | str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str = "sdpa", timeout: timedelta | None = None, cfg_degree: int = 1,
                 shard_weights: str = "off", vae_split: bool = True):
        if cfg_degree not in (1, 2) or world_size % cfg_degree:
            raise ValueError(f"cfg_parallel degree must be 1 or 2 and divide the {world_size} ranks, got {cfg_degree}")
        self.world_size, self.rank, self.timeout = world_size, rank, timeout
        self.cfg_degree = cfg_degree
        if shard_weights not in ("off", "on", "auto"):
            raise ValueError(f"shard_weights must be 'off', 'on' or 'auto', got {shard_weights!r}")
        self.shard_weights = shard_weights if world_size > 1 else "off"
        self.vae_split = vae_split and world_size > 1
        self.sharded: dict[str, bool] = {}  # slot -> were its weights sharded
        self._shard_decisions: dict[tuple, bool] = {}
        self.sp_size = world_size // cfg_degree  # ranks per sequence-parallel group
        self.requested_degrees = (ulysses, ring)
        self.device, self.dtype = torch.device(device), dtype
        self.backend = resolve_backend(backend, self.device)
        self.load_counts: Counter[str] = Counter()
        self._loaded: dict[str, tuple[tuple, object]] = {}  # slot -> (file key, model)
        self._meshes: dict[tuple[int, int], SequenceParallel] = {}
        self.sp = SequenceParallel()

    def _mesh(self, model, family: families.Family) -> SequenceParallel:
        """The SP groups for this model: the planner's choice for "auto" (USP_VIDEO_LINK names the
        link, nvlink by default), else the user's degrees, validated against the heads."""
        config = model.config
        if self.requested_degrees == ("auto", "auto"):
            params = sum(p.numel() for p in model.parameters())
            degrees = planner.auto_degrees(self.sp_size, config.num_attention_heads,
                                           config.num_attention_heads * config.attention_head_dim,
                                           family.layers(config), params,
                                           link=os.environ.get("USP_VIDEO_LINK", "nvlink"))
        else:
            degrees = resolve_degrees(self.sp_size, config.num_attention_heads, *self.requested_degrees)
        if degrees not in self._meshes:
            self._meshes[degrees] = (
                build_sequence_parallel(*degrees, timeout=self.timeout, cfg_degree=self.cfg_degree)
                if self.world_size > 1 else SequenceParallel())
        return self._meshes[degrees]

    def _cached(self, slot: str, path: str, load: Callable[[str], object]):
        """The model in slot, loaded from path unless that very file is loaded already."""
        key = _file_key(path)
        held = self._loaded.get(slot)
        if held is None or held[0] != key:
            self._loaded.pop(slot, None)  # free the old model before loading the new one
            self._loaded[slot] = (key, load(path))
            self.load_counts[slot] += 1
        return self._loaded[slot][1]

    def should_shard(self, slot: str, path: str) -> bool:
        """Shard this model's weights? "on"; for "auto", when they would take more than 80% of one
        device's free memory. Collective: every rank calls it, and the ranks agree on the maximum."""
        if self.shard_weights == "off":
            return False
        key = (slot, _file_key(path))
        if key not in self._shard_decisions:
            want = 1.0
            if self.shard_weights == "auto":
                want = float(_weight_bytes(path, self.dtype) > 0.8 * _free_memory(self.device))
            flag = torch.tensor([want], device=self.device)
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._shard_decisions[key] = bool(flag.item())
        self.sharded[slot] = self._shard_decisions[key]
        return self.sharded[slot]

    def _load_dit(self, path: str):
        family = families.detect(path)
        model = family.load(path, self.dtype, self.device)
        self.sp = self._mesh(model, family)
        model = family.parallelize(model, self.sp, self.backend)
        if self.should_shard("dit", path):
            fsdp.shard_model(model, family.blocks(model), self.device)
        model.usp_family = family
        return model

    def dit(self, path: str):
        return self._cached("dit", path, self._load_dit)

    def dit_info(self, path: str) -> dict:
        model = self.dit(path)
        family = model.usp_family
        return {"family": family.name, "model": family.label, "heads": model.config.num_attention_heads,
                "layers": family.layers(model.config),
                "hidden": model.config.num_attention_heads * model.config.attention_head_dim,
                "text_dim": family.text_dim(model.config), "ulysses": self.sp.ulysses_degree,
                "ring": self.sp.ring_degree, "cfg_parallel": self.cfg_degree,
                "parameters": sum(p.numel() for p in model.parameters()),
                "sharded": self.sharded.get("dit", False), "parameter_bytes": fsdp.parameter_bytes(model),
                "fp8_layers": fp8.count_fp8_layers(model),
                "free_bytes": _free_memory(self.device)}

    def encode_on_all_ranks(self, path: str) -> bool:
        """The UMT5 encoder runs on rank 0 alone, unless its weights are sharded across the ranks
        (then every rank holds a shard and takes part). Collective."""
        return self.should_shard("text_encoder", path)

    def _load_umt5(self, path: str) -> umt5.Umt5TextEncoder:
        encoder = umt5.load_umt5(path, self.dtype, self.device)
        if self.sharded.get("text_encoder"):
            fsdp.shard_model(encoder.model, encoder.model.encoder.block, self.device)
        return encoder

    def text_encoder(self, path: str) -> umt5.Umt5TextEncoder:
        return self._cached("text_encoder", path, self._load_umt5)

    def _load_vae(self, path: str):
        if families.detect_vae(path) == families.HUNYUAN:
            return hunyuan_vae.load_hunyuan_vae(path, self.dtype, self.device)
        return wan_vae.load_wan_vae(path, self.dtype, self.device)

    def vae(self, path: str):
        return self._cached("vae", path, self._load_vae)

    def encode(self, path: str, prompt: str) -> torch.Tensor:
        return self.text_encoder(path).encode(prompt)

    def _load_llama(self, path: str):
        model = hunyuan_text.load_llama(path, self.dtype, self.device)
        if self.sharded.get("llama"):
            fsdp.shard_model(model, model.layers, self.device)
        return model

    def hunyuan_encode_on_all_ranks(self, llama: str) -> bool:
        """The Llama runs on rank 0 alone, unless its weights are sharded across the ranks. Collective."""
        return self.should_shard("llama", llama)

    def hunyuan_text_encoder(self, llama: str, clip: str, tokenizers: str) -> hunyuan_text.HunyuanTextEncoder:
        llama_model = self._cached("llama", llama, self._load_llama)
        clip_model = self._cached("clip", clip, lambda p: hunyuan_text.load_clip_l(p, self.dtype, self.device))
        toks = self._cached("tokenizers", tokenizers, hunyuan_text.load_tokenizers)
        return hunyuan_text.HunyuanTextEncoder(llama_model, clip_model, *toks)

    def encode_hunyuan(self, llama: str, clip: str, tokenizers: str, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hunyuan_text_encoder(llama, clip, tokenizers).encode(prompt)

    @torch.no_grad()
    def decode(self, path: str, latent: torch.Tensor) -> torch.Tensor | None:
        """Frames on rank 0 (None on the others). With vae_split the ranks share the decode
        (parallel.vae_split: Wan-VAE rows, HunyuanVideo tiles; exact); otherwise rank 0 decodes alone."""
        vae = self.vae(path)
        if not self.vae_split:
            return wan_vae.decode_video(vae, latent) if self.rank == 0 else None
        return decode_split(vae, wan_vae.decode_video, latent, self.rank, self.world_size, self.device)

    @torch.no_grad()
    def sample(self, req: SampleRequest,
               on_step: Callable[[int, int, torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Run the sampler; returns the raw-space latent (float32, CPU).

        on_step(i, total, denoised) runs after each step on every rank, with the current x0
        estimate in the model's (normalised) latent space, and returns True to stop; it must
        return the same value on every rank (the worker makes it collective).
        """
        model = self.dit(req.dit)
        family = model.usp_family
        check_latent(req.latent, "latent_image")
        sigmas = sampling_sigmas(req.steps, req.shift, req.denoise)
        noise = make_noise(tuple(req.latent.shape), req.seed)
        latent_in = family.process_in(req.latent.float())
        x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent_in
        batch = x.shape[0]

        def expand(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(self.device, self.dtype)
            return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t

        positive = TextCond(expand(req.positive), expand(req.positive_pooled))
        negative = (TextCond(expand(req.negative), expand(req.negative_pooled))
                    if req.negative is not None and req.cfg != 1.0 else None)

        def velocity(x_in: torch.Tensor, sigma: torch.Tensor, cond: TextCond) -> torch.Tensor:
            t = torch.full((x_in.shape[0],), float(timestep(sigma)), device=self.device)
            out = family.velocity(model, x_in.to(self.device, self.dtype), t, cond, req.guidance)
            return out.float().cpu()

        def both(a: TextCond, b: TextCond) -> TextCond:
            pooled = None if a.pooled is None or b.pooled is None else torch.cat([a.pooled, b.pooled])
            return TextCond(torch.cat([a.tokens, b.tokens]), pooled)

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if negative is None:  # with CFG-parallel both halves run this one pass
                v = velocity(x_t, sigma, positive)
            elif self.sp.cfg_degree == 2:  # each half runs one pass; the pair swaps results
                mine = velocity(x_t, sigma, positive if self.sp.cfg_rank == 0 else negative)
                v_pos, v_neg = _exchange(mine, self.sp.cfg_group, self.device)
                v = v_neg + req.cfg * (v_pos - v_neg)
            elif positive.tokens.shape == negative.tokens.shape:  # one batched forward for both passes
                v_pos, v_neg = velocity(torch.cat([x_t, x_t]), sigma, both(positive, negative)).chunk(2)
                v = v_neg + req.cfg * (v_pos - v_neg)
            else:
                v_pos, v_neg = velocity(x_t, sigma, positive), velocity(x_t, sigma, negative)
                v = v_neg + req.cfg * (v_pos - v_neg)
            return x_t - sigma * v

        def callback(i: int, x_t: torch.Tensor, denoised: torch.Tensor) -> None:
            if on_step is not None and on_step(i, req.steps, denoised):
                raise SamplingInterrupted(i)

        x = get_sampler(req.sampler)(denoise, x, sigmas, callback)
        return family.process_out(x)

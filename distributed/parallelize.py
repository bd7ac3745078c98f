"""Loading a DiT and parallelizing it: a short list of apply steps over the family's stock model.

In the manner of torchtitan's parallelize functions, each step takes what it needs and does one thing;
`load_dit` runs them in order and returns the `LoadedDiT` record (residency.py) that holds what they
decided. The order matters: the weights are sharded while the file is read (the loader calls the
FSDP callback on the meta model), the memory pre-flight runs before the load, the sequence-parallel
groups are chosen from the loaded model's heads, and compile wraps blocks that USP and FSDP already hold.
No step names a family: the family's hooks (load_dit, blocks, parallelize, describe_dit) do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch

from . import planner
from .config import GroupConfig
from .formats import fp8
from .models.family import ModelFamily
from .parallel import fsdp
from .parallel.compile import compile_blocks
from .parallel.mesh import SequenceParallel, build_sequence_parallel, resolve_degrees
from .parallel.usp_attention import resolve_backend
from .preflight import Preflight
from .residency import HOST, LoadedDiT


@dataclass
class DitLoading:
    """What every DiT load of one rank shares: the group's config, the device and dtype, the pre-flight,
    and the sequence-parallel groups built so far (one per pair of degrees, reused across models)."""

    config: GroupConfig
    world_size: int
    device: torch.device
    dtype: torch.dtype
    preflight: Preflight
    meshes: dict[tuple[int, int], SequenceParallel] = field(default_factory=dict)

    @property
    def dit_offload(self) -> bool:
        return self.config.dit_offload


def apply_weight_sharding(ctx: DitLoading, path: str, family: ModelFamily) -> Callable | None:
    """The loader's FSDP callback when this DiT's weights are sharded (decided before the load, collectively:
    the loader shards as it reads), else None."""
    if not ctx.preflight.should_shard("dit", path):
        return None

    def shard(model):
        return fsdp.shard_model(model, family.blocks(model), ctx.device, offload=ctx.dit_offload)

    return shard


def apply_mesh(ctx: DitLoading, model: torch.nn.Module, family: ModelFamily) -> SequenceParallel:
    """The SP groups for this model: the planner's choice for "auto" (USP_VIDEO_LINK names the link,
    nvlink by default), else the user's degrees, validated against the heads."""
    facts = family.describe_dit(model)
    sp_size, requested = ctx.config.sp_ranks, (ctx.config.ulysses, ctx.config.ring)
    if requested == ("auto", "auto"):
        params = sum(p.numel() for p in model.parameters())
        degrees = planner.auto_degrees(sp_size, facts["heads"], facts["hidden"], facts["layers"], params,
                                       link=os.environ.get("USP_VIDEO_LINK", "nvlink"))
    else:
        degrees = resolve_degrees(sp_size, facts["heads"], *requested)
    if degrees not in ctx.meshes:
        ctx.meshes[degrees] = (
            build_sequence_parallel(*degrees, timeout=timedelta(seconds=ctx.config.timeout),
                                    cfg_degree=ctx.config.cfg_parallel)
            if ctx.world_size > 1 else SequenceParallel())
    return ctx.meshes[degrees]


def apply_fp8_compute(ctx: DitLoading, model: torch.nn.Module) -> int:
    """fp8 matmuls for the fp8 layers (fp8_compute on): how many layers use them."""
    return fp8.use_scaled_mm(model) if ctx.config.fp8_compute else 0


def load_dit(ctx: DitLoading, path: str, family: ModelFamily, device: torch.device) -> LoadedDiT:
    """Load the DiT in path as `family` onto `device` (HOST for an idle expert) and parallelize it:
    shard -> pre-flight -> load -> buffers -> mesh -> backend -> USP -> fp8 -> compile."""
    shard = apply_weight_sharding(ctx, path, family)
    if ctx.dit_offload:  # the shards are loaded into host memory (as FSDP's offload wants them) ...
        device = HOST
    ctx.preflight.check_memory(path, family, shard is not None, device, offload=ctx.dit_offload,
                               idle=device == HOST and ctx.device != HOST and not ctx.dit_offload)
    model = family.load_dit(path, ctx.dtype, device, shard=shard)
    if ctx.dit_offload:  # ... and what FSDP does not manage (Wan's RoPE tables) runs on the device
        fsdp.buffers_to(model, ctx.device)
    sp = apply_mesh(ctx, model, family)
    backend = resolve_backend(ctx.config.attention, ctx.device, ctx.dtype, sp.ring_degree)
    hooks = family.parallelize(model, sp, backend)
    fp8_layers = apply_fp8_compute(ctx, model)
    compiled = compile_blocks(family.blocks(model), ctx.config.compile)  # after USP and FSDP
    return LoadedDiT(model, family, sp, backend, hooks, compiled_blocks=compiled, fp8_compute_layers=fp8_layers)

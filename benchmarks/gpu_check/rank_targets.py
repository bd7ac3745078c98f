"""What each rank of section 8 runs (distributed.testing.spawn loads this file by path, so it imports nothing
relative): a Wan DiT forward with sequence parallelism over a gloo group whose ranks all sit on one device."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the gpu_check package

from gpu_check.common import KERNEL_LAYERS, synchronizer, wan_setup  # noqa: E402


def vae_setup(small: bool, device: torch.device):
    """The section's Wan VAE (fp32; the released Wan 2.1 VAE's shape, tiny with small) and a raw latent to decode
    (5 latent frames = 17 frames at 480p; tiny with small)."""
    from diffusers import AutoencoderKLWan

    from usp_video.distributed.models.wan21.tiny import TINY_VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(TINY_VAE_CONFIG if small else {})).eval().to(device)
    g = torch.Generator().manual_seed(2)
    return vae, torch.randn(1, 16, *((2, 4, 6) if small else (5, 60, 104)), generator=g)


def split_vae_decode(rank, world_size, device, small) -> dict:
    """The section's latent decoded with its rows shared out among the ranks (the split VAE, halo rows swapped with
    the neighbours); the frames on rank 0."""
    from usp_video.distributed.models.wan21.vae import decode
    from usp_video.distributed.parallel.vae_split import VaeSplit

    vae, latent = vae_setup(small, torch.device(device))
    with torch.no_grad():
        frames = decode(vae, latent, VaeSplit(rank, world_size, torch.device(device)))
    return {} if frames is None else {"frames": frames}


def shared_device_forward(rank, world_size, device, small, ulysses, ring, backend, fsdp, repeats, vae=False):
    """One forward of the section's DiT (the same seed as the one-process references) on this rank's share of the
    tokens; every rank on `device` (NCCL refuses two ranks on one GPU: the collectives go through gloo). fsdp: the
    weights FSDP2-sharded over the ranks too. vae: then the split VAE decode too (split_vae_decode). Returns the
    gathered output and the median forward time (and the frames, on rank 0)."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel import fsdp as fsdp_mod
    from usp_video.distributed.parallel.mesh import build_sequence_parallel

    device = torch.device(device)
    config, dtype, inputs = wan_setup(small, device)
    if not small:
        config["num_layers"] = KERNEL_LAYERS
    torch.manual_seed(0)
    model = cast_model(WanTransformer3DModel(**config), dtype).eval()
    sp = build_sequence_parallel(ulysses, ring)
    model = parallelize_wan(model.to(device), sp, backend).module
    if fsdp:
        model = fsdp_mod.shard_model(model, model.blocks, device)
    sync, times = synchronizer(device), []
    with torch.no_grad():
        out = model(*inputs, return_dict=False)[0]
        for _ in range(repeats):
            dist.barrier()
            sync()
            start = time.perf_counter()
            model(*inputs, return_dict=False)
            sync()
            times.append(time.perf_counter() - start)
    result = {"out": out.float().cpu(), "seconds": torch.tensor([statistics.median(times)], dtype=torch.float64)}
    del model
    if vae:
        result.update(split_vae_decode(rank, world_size, str(device), small))
    return result

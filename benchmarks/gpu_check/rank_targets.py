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

from gpu_check.common import synchronizer, wan_setup  # noqa: E402


def shared_device_forward(rank, world_size, device, small, ulysses, ring, backend, fsdp, repeats):
    """One forward of the section's DiT (the same seed as the one-process references) on this rank's share of the
    tokens; every rank on `device` (NCCL refuses two ranks on one GPU: the collectives go through gloo). fsdp: the
    weights FSDP2-sharded over the ranks too. Returns the gathered output and the median forward time."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel import fsdp as fsdp_mod
    from usp_video.distributed.parallel.mesh import build_sequence_parallel

    device = torch.device(device)
    config, dtype, inputs = wan_setup(small, device)
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
    return {"out": out.float().cpu(), "seconds": torch.tensor([statistics.median(times)], dtype=torch.float64)}

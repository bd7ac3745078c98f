"""Weight sharding with FSDP2 (torch.distributed.fsdp.fully_shard), for inference.

Every rank keeps 1/N of each sharded module's parameters. Before a block runs, FSDP all-gathers
its parameters; after it, the gathered copy is freed (reshard_after_forward). All ranks run the
same blocks in the same order (sequence parallelism only splits the tokens), so the all-gathers
line up; the results are those of the unsharded model.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def shard_model(model: torch.nn.Module, blocks: Iterable[torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """fully_shard each block, then the rest of the model, over all ranks of the default group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Inference only. Without gradients FSDP also accepts blocks that mix dtypes (diffusers keeps
    # norms and modulation tables in float32 beside bf16 weights; fp8 weights beside both).
    model.requires_grad_(False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards, for sharded parameters)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())

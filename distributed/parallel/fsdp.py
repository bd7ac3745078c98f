"""Weight sharding with FSDP2 (torch.distributed.fsdp.fully_shard), for inference.

Every rank keeps 1/N of each sharded module's parameters. Before a block runs, FSDP all-gathers
its parameters; after it, the gathered copy is freed (reshard_after_forward). All ranks run the
same blocks in the same order (sequence parallelism only splits the tokens), so the all-gathers
line up; the results are those of the unsharded model.

With offload (the group's dit_offload), each rank's shards wait in host memory and FSDP copies a
block's shards to the device just before its all-gather (FSDP2's CPUOffloadPolicy): the device then
holds about two gathered blocks, not the rank's share of the model. We use torch's own policy rather
than a hand-written block swap because torch maintains it, it is the same sharding with the same
prefetching (the next block's copy and all-gather overlap the running block), and one code path
serves both.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def shard_model(model: torch.nn.Module, blocks: Iterable[torch.nn.Module], device: torch.device,
                offload: bool = False) -> torch.nn.Module:
    """fully_shard each block, then the rest of the model, over all ranks of the default group (one rank
    too: with offload, a single GPU then runs a model larger than its memory).

    offload: the shards wait in host memory (CPUOffloadPolicy). The model must then be materialised on the
    CPU (FSDP refuses offloaded shards found elsewhere on the first forward); on CUDA FSDP pins them as it
    takes them (reset_sharded_param), so that the copies to the device are asynchronous. Buffers are not
    FSDP's: the caller puts them on the device (buffers_to)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # pinning needs CUDA (a CPU-only build has no pinned memory), and on CPU ranks the host is the device
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    # Inference only. Without gradients FSDP also accepts blocks that mix dtypes (diffusers keeps
    # norms and modulation tables in float32 beside bf16 weights; fp8 weights beside both).
    model.requires_grad_(False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    return model


def buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model's buffers (Wan's RoPE tables) to device, leaving its parameters where they are: an
    offloaded model's shards stay in host memory while what FSDP does not manage goes to the device."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def is_offloaded(model: torch.nn.Module) -> bool:
    """Do the model's FSDP modules keep their shards in host memory (shard_model's offload)?"""
    from torch.distributed.fsdp import CPUOffloadPolicy

    policies = offload_policies(model)
    return bool(policies) and all(isinstance(policy, CPUOffloadPolicy) for policy in policies)


def offload_policies(model: torch.nn.Module) -> list:
    """The offload policy of each FSDP module's parameter group, in module order ([] when not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [group.offload_policy for module in model.modules() if isinstance(module, FSDPModule)
            for group in module._get_fsdp_state()._fsdp_param_groups]


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


def reshard_after_interrupt(model: torch.nn.Module) -> None:
    """Free the gathered weights that a forward stopped in its middle (a Cancel between blocks) left behind: the
    root's post-forward, which reshards it, never ran. The next forward gathers them again as usual."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

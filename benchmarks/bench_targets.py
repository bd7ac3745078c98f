"""Rank functions for benchmarks/cpu_bench.py (run by usp_video.distributed.testing.spawn)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def build_model(config: dict, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


def inputs(shape, text_len, text_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, *shape, generator=g), torch.tensor([500.0]),
            torch.randn(1, text_len, text_dim, generator=g))


def timed_forwards(model, x, t, ctx, repeats: int, barrier=None) -> tuple[torch.Tensor, list[float]]:
    times = []
    with torch.no_grad():
        out = model(x, t, ctx, return_dict=False)[0]  # warm-up
        for _ in range(repeats):
            if barrier:
                barrier()
            start = time.perf_counter()
            out = model(x, t, ctx, return_dict=False)[0]
            if barrier:
                barrier()
            times.append(time.perf_counter() - start)
    return out, times


def forward_rank(rank, world_size, config, shape, text_len, ulysses, ring, repeats):
    """Time one DiT forward on this rank's mesh; returns the output and the times."""
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel, build_sequence_parallel

    sp = build_sequence_parallel(ulysses, ring) if world_size > 1 else SequenceParallel()
    model = parallelize_wan(build_model(config), sp).module
    x, t, ctx = inputs(shape, text_len, config["text_dim"])
    barrier = dist.barrier if world_size > 1 else None
    out, times = timed_forwards(model, x, t, ctx, repeats, barrier)
    return {"out": out, "times": torch.tensor(times, dtype=torch.float64)}


class ByteCounter:
    """Counts the bytes this rank sends at the collectives USP uses, by wrapping them."""

    def __init__(self):
        self.bytes = {"all_to_all": 0, "ring_p2p": 0, "all_gather": 0}
        self._saved = {}

    def __enter__(self):
        counter = self

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            counter.bytes["all_to_all"] += input.numel() * input.element_size() * (n - 1) // n
            return counter._saved["all_to_all_single"](output, input, *args, group=group, **kwargs)

        def batch_isend_irecv(p2p_op_list):
            for op in p2p_op_list:
                if getattr(op.op, "__name__", "") == "isend":
                    counter.bytes["ring_p2p"] += op.tensor.numel() * op.tensor.element_size()
            return counter._saved["batch_isend_irecv"](p2p_op_list)

        def all_gather(tensor_list, tensor, group=None, *args, **kwargs):
            n = dist.get_world_size(group)
            counter.bytes["all_gather"] += tensor.numel() * tensor.element_size() * (n - 1)
            return counter._saved["all_gather"](tensor_list, tensor, group, *args, **kwargs)

        for name, fn in (("all_to_all_single", all_to_all_single), ("batch_isend_irecv", batch_isend_irecv),
                         ("all_gather", all_gather)):
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def bytes_rank(rank, world_size, config, shape, text_len, ulysses, ring):
    """Bytes this rank sends during one DiT forward, by collective."""
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import build_sequence_parallel

    sp = build_sequence_parallel(ulysses, ring)
    model = parallelize_wan(build_model(config), sp).module
    x, t, ctx = inputs(shape, text_len, config["text_dim"])
    with torch.no_grad(), ByteCounter() as counter:
        model(x, t, ctx, return_dict=False)
    return {k: torch.tensor([v], dtype=torch.float64) for k, v in counter.bytes.items()}

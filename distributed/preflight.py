"""The pre-flights: will a DiT load, or a sampling step, fit in each rank's free memory? Will a step end in
reasonable time?

Each check runs before anything is allocated and, when the answer is no, raises a ValueError that says
what to change. The checks are collective: the ranks agree on the largest need and the smallest free
memory, so that every rank decides alike. The formulas live in memory.py (activations) and in each
family (dit_load_bytes); the free memory comes from a probe handed in (`free_memory` by default), so
that tests can say how much memory a device has. Whether to shard a model's weights (shard_weights
"auto") is decided here too, from the same probe.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import memory
from .formats.checkpoint import CheckpointError, read_header
from .models.family import ModelFamily
from .parallel import fsdp
from .residency import LoadedDiT, file_key

FreeMemoryProbe = Callable[[torch.device], int]


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA), or available system memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62  # unknown: never shard automatically


def weight_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes a model file's weights take at the compute dtype (from its header alone)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*.safetensors"))
    shapes, _ = read_header(p)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(int(torch.tensor(shape).prod()) * size for shape, _ in shapes.values())


class Preflight:
    """The pre-flights of one rank. world_size, device, dtype: the group's; shard_weights: "on", "off" or
    "auto"; dit_offload: the DiT's weight shards wait in host memory; probe(device) -> free bytes."""

    def __init__(self, world_size: int, device: torch.device, dtype: torch.dtype, *, shard_weights: str = "off",
                 dit_offload: bool = False, probe: FreeMemoryProbe = free_memory):
        self.world_size, self.device, self.dtype = world_size, device, dtype
        self.shard_weights, self.dit_offload, self.probe = shard_weights, dit_offload, probe
        self.sharded: dict[str, bool] = {}  # role ("dit", a text input) -> were its weights sharded
        self._shard_decisions: dict[tuple, bool] = {}
        self._rates: dict[tuple, float] = {}  # kernel -> floating-point operations per second (_rate)
        self._slowdown = 1.0  # the last long step's actual time / its estimate (observe_step)

    @property
    def world_group(self):
        """Every rank of the group: the group of the collectives that involve them all."""
        return dist.group.WORLD

    def should_shard(self, role: str, path: str) -> bool:
        """Shard this model's weights? "on"; for "auto", when they would take more than 80% of one
        device's free memory; the DiT always with dit_offload (its host-memory shards are FSDP's, on one
        rank too). Collective: every rank calls it, and the ranks agree on the maximum."""
        if role == "dit" and self.dit_offload:  # the same config on every rank: no need to agree
            self.sharded[role] = True
            return True
        if self.shard_weights == "off":
            return False
        key = (role, file_key(path))
        if key not in self._shard_decisions:
            want = 1.0
            if self.shard_weights == "auto":
                want = float(weight_bytes(path, self.dtype) > 0.8 * self.rank_free_memory())
            flag = torch.tensor([want], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world_group)
            self._shard_decisions[key] = bool(flag.item())
        self.sharded[role] = self._shard_decisions[key]
        return self.sharded[role]

    def rank_free_memory(self, device: torch.device | None = None) -> int:
        """The memory this rank may use on its device (or on `device`: the host, for a model that waits
        there): its GPU's free memory, after handing back what freed models left in the caching
        allocator; on the CPU, the host's available memory shared by the ranks on it."""
        device = device or self.device
        gc.collect()  # freed models can sit in reference cycles (the fp8 layers' patched forwards)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            return self.probe(device)
        return self.probe(device) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    def worst_need_and_free(self, need: float, device: torch.device | None = None) -> tuple[float, float]:
        """(the largest need, the smallest free memory on `device`) over the ranks, so that every rank of a
        pre-flight decides alike. Collective."""
        worst = torch.tensor([float(need), -float(self.rank_free_memory(device))], dtype=torch.float64,
                             device=self.device)
        if self.world_size > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.world_group)
        return float(worst[0]), -float(worst[1])

    def free_memory_per_rank(self, failed: bool = False) -> dict:
        """{"free_bytes": this rank's free memory (rank_free_memory: its GPU's, or its share of the host's),
        "free_bytes_per_rank": every rank's}. Collective; a rank that failed takes part with -1."""
        mine = torch.tensor([-1 if failed else self.rank_free_memory()], dtype=torch.int64, device=self.device)
        every = [mine]
        if self.world_size > 1:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine, group=self.world_group)
        return {"free_bytes": int(mine), "free_bytes_per_rank": [int(t) for t in every]}

    # -- a DiT load -------------------------------------------------------------------------------

    def check_memory(self, path: str, family: ModelFamily, sharded: bool, device: torch.device | None = None,
                     offload: bool = False, idle: bool = False) -> None:
        """The memory pre-flight of a DiT load: what the load will add to a rank at its peak (the family
        predicts it from the file's header) against the rank's free memory; a ValueError saying what to
        change, before anything is allocated, when it will not fit. Collective: the ranks agree on the
        largest need and the smallest free memory. On the CPU the ranks of one host share its memory.
        offload (dit_offload): the shares are loaded into host memory, so the host's memory is checked;
        the device then holds about two gathered blocks, which the activations pre-flight counts.
        idle: an idle expert loaded into host memory (placement offload); at the expert switch the running
        expert joins it there before it leaves, so the host must hold two of them for a moment."""
        error, need = None, float("inf")
        try:
            need = family.dit_load_bytes(path, self.dtype, self.world_size if sharded else 1) * (2 if idle else 1)
        except (CheckpointError, OSError) as exc:  # told to every rank below, so that none waits alone
            error = exc
        need, free = self.worst_need_and_free(need, device)
        if error is not None:
            raise CheckpointError(f"{Path(path).name} cannot be read: {error}") from None
        if need == float("inf"):
            raise CheckpointError(f"{Path(path).name} cannot be read on another rank of the group")
        if need <= free:
            return
        if idle:
            raise ValueError(self._idle_expert_message(path, sharded, need, free))
        if offload:
            who = "a rank" if self.world_size > 1 else "the host"
            raise ValueError(f"{Path(path).name} needs about {need / 2**30:.1f} GiB of host memory on each rank to "
                             f"load (dit_offload keeps its weight shards there), but {who} has {free / 2**30:.1f} GiB "
                             "free: use more hosts (each rank then holds 1/N of the weights); or load the model's "
                             "fp8 file (about half the bytes of bf16); or free host memory")
        raise ValueError(self._load_message(path, family, sharded, need, free))

    def _where(self, sharded: bool) -> str:
        return "its weights sharded over the ranks" if sharded else "a whole copy on every rank"

    def _idle_expert_message(self, path: str, sharded: bool, need: float, free: float) -> str:
        fixes = ([f"turn shard_weights on (each rank then parks 1/{self.world_size} of each expert)"]
                 if not sharded and self.world_size > 1 else [])
        fixes += ["set the group's placement to keep (both experts stay on the GPUs, which then need room for both)",
                  "load the models' fp8 files (about half the bytes of bf16)", "free host memory"]
        return (f"{Path(path).name} waits in host memory while the other expert runs (placement offload), "
                f"and at the switch the two meet there: about {need / 2**30:.1f} GiB of host memory on "
                f"each rank ({self._where(sharded)}), but {'a rank' if self.world_size > 1 else 'the host'} has "
                f"{free / 2**30:.1f} GiB free: " + "; or ".join(fixes))

    def _load_message(self, path: str, family: ModelFamily, sharded: bool, need: float, free: float) -> str:
        fixes = []
        if not sharded and self.world_size > 1 and \
                family.dit_load_bytes(path, self.dtype, self.world_size) < 0.9 * need:
            fixes.append(f"turn shard_weights on (about 1/{self.world_size} of the weights on each rank)")
        fixes += ["use more GPUs" + (" with shard_weights on" if not sharded else "")]
        if self.device.type == "cuda":
            fixes.append("turn dit_offload on (the weight shards wait in host memory; each GPU holds about two "
                         "blocks at a time)")
        fixes += ["load the model's fp8 file (about half the bytes of bf16)",
                  "free memory (USP Free Group, other programs on the device)"]
        return (f"{Path(path).name} needs about {need / 2**30:.1f} GiB on each rank to load ({self._where(sharded)}), "
                f"but {'a rank' if self.world_size > 1 else 'the device'} has {free / 2**30:.1f} GiB free: "
                + "; or ".join(fixes))

    # -- a sampling step --------------------------------------------------------------------------

    def activation_bytes(self, experts: list[LoadedDiT], latent_shape: tuple[int, ...], text_tokens: int,
                         passes: int) -> int:
        """What a step adds to this rank's memory at its peak (memory.py), for the largest of the experts:
        the activations of its tokens (both passes at once when they are batched), and with sharded
        weights the blocks gathered around the one that runs."""
        need = 0
        for dit in experts:
            seq = dit.family.step_sequence(dit.module, latent_shape, text_tokens)
            sp = dit.sp
            batch = latent_shape[0] * passes
            bytes_ = memory.step_activation_bytes(seq["tokens"], seq["hidden"], seq["ffn"], batch, self.dtype.itemsize,
                                                  sp.ulysses_degree * sp.ring_degree, sp.ulysses_degree,
                                                  sp.ring_degree)
            if fsdp.is_sharded(dit.module):
                bytes_ += memory.gathered_block_bytes(dit.family.blocks(dit.module))
            need = max(need, bytes_)
        return need

    def check_activations(self, experts: list[LoadedDiT], latent_shape: tuple[int, ...], text_tokens: int,
                          passes: int) -> None:
        """The activations pre-flight of a sample: a ValueError saying what to change, before the first
        step, when a step will not fit in a rank's free memory (with the models loaded). Collective: the
        ranks agree on the largest need and the smallest free memory."""
        need, free = self.worst_need_and_free(self.activation_bytes(experts, latent_shape, text_tokens, passes))
        if need <= free:
            return
        t, h, w = latent_shape[-3:]
        first = experts[0]
        tokens = first.family.step_sequence(first.module, latent_shape, text_tokens)["tokens"]
        sp_ranks = first.sp.ulysses_degree * first.sp.ring_degree
        fixes = [f"a smaller video (fewer frames, or a smaller width x height: the latent {t}x{h}x{w} makes "
                 f"{tokens} tokens{f', {-(-tokens // sp_ranks)} per rank' if sp_ranks > 1 else ''})",
                 "more GPUs (each holds 1/N of the tokens)"]
        if passes == 2 and self.world_size % 2 == 0:
            fixes.append("cfg_parallel on (each half of the GPUs runs one of the two passes)")
        if not any(fsdp.is_sharded(d.module) for d in experts) and self.world_size > 1:
            fixes.append("shard_weights on (each rank then holds 1/N of the weights)")
        if not self.dit_offload and self.device.type == "cuda":
            fixes.append("dit_offload on (the weight shards wait in host memory, not on the GPU)")
        fixes.append("an fp8 model file (about half the weights' memory)")
        raise ValueError(f"a step on this latent needs about {need / 2**30:.2f} GiB of activations on each rank, "
                         f"but {'a rank' if self.world_size > 1 else 'the device'} has {free / 2**30:.2f} GiB free "
                         f"with the model loaded: use " + "; or ".join(fixes))

    # -- a step's time ----------------------------------------------------------------------------

    def step_seconds(self, experts: list[LoadedDiT], latent_shape: tuple[int, ...], text_tokens: int,
                     passes: int) -> float:
        """This rank's estimate of one step, for the slowest of the experts: the floating-point operations of its
        blocks (memory.step_flops: attention, and the linear layers) at the speeds this rank measured for each
        (an attention kernel at the model's head width, a matmul), times the ratio of the last long step's
        actual time to its estimate (observe_step), which counts what the kernels leave out (communication,
        the other layers, other programs on the device)."""
        most = 0.0
        for dit in experts:
            seq = dit.family.step_sequence(dit.module, latent_shape, text_tokens)
            info = dit.family.describe_dit(dit.module)
            sp = dit.sp
            attention, linear = memory.step_flops(seq["tokens"], seq["hidden"], seq["ffn"],
                                                  len(dit.family.blocks(dit.module)), latent_shape[0] * passes,
                                                  sp.ulysses_degree * sp.ring_degree)
            seconds = (attention / self._rate(("attention", seq["hidden"] // max(info["heads"], 1)))
                       + linear / self._rate(("matmul",)))
            most = max(most, seconds)
        return most * self._slowdown

    def _rate(self, kernel: tuple) -> float:
        """Floating-point operations per second of a kernel on this rank, measured once (~0.1 s)."""
        if kernel not in self._rates:
            self._rates[kernel] = (measure_attention_rate(self.device, self.dtype, kernel[1]) if kernel[0] == "attention"
                                   else measure_matmul_rate(self.device, self.dtype))
        return self._rates[kernel]

    def observe_step(self, estimate: float, seconds: float) -> None:
        """A sample ran: its steps took `seconds` each where step_seconds said `estimate` (before the correction).
        Only steps of a second or more count: shorter ones measure per-call overheads, not what decides a long
        step."""
        if estimate > 0 and seconds >= 1.0:
            self._slowdown = min(max(seconds / estimate, 0.25), 50.0)

    def check_step_time(self, experts: list[LoadedDiT], latent_shape: tuple[int, ...], text_tokens: int,
                        passes: int, max_step_s: float) -> float:
        """The step-time pre-flight: a ValueError naming the size and the estimate, before the first step, when one
        step is estimated (step_seconds, the slowest rank's) to take longer than max_step_s (0: no limit); a step
        that long could not be cancelled in reasonable time either. Collective when there is a limit (the ranks
        agree on the longest estimate). Returns this rank's uncorrected estimate (for observe_step)."""
        if max_step_s <= 0:
            return 0.0
        mine = self.step_seconds(experts, latent_shape, text_tokens, passes)
        seconds = torch.tensor([mine], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=self.world_group)
        estimate = float(seconds)
        if estimate <= max_step_s:
            return mine / self._slowdown
        t, h, w = latent_shape[-3:]
        first = experts[0]
        tokens = first.family.step_sequence(first.module, latent_shape, text_tokens)["tokens"]
        sp_ranks = first.sp.ulysses_degree * first.sp.ring_degree
        per_rank = f", {-(-tokens // sp_ranks)} per rank" if sp_ranks > 1 else ""
        batch = f", batch {latent_shape[0]}" if latent_shape[0] > 1 else ""
        raise ValueError(
            f"one step on this latent ({t}x{h}x{w}, {tokens} tokens{per_rank}{batch}) is estimated to take about "
            f"{_duration(estimate)} on these ranks, above the USP Group node's max_step_s of {max_step_s:g} s: use a "
            "smaller video (attention grows with the square of the tokens), more GPUs, or raise max_step_s (0: no "
            "limit) if you mean to wait that long")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _rate_of(run: Callable[[], object], flops: float, device: torch.device, seconds: float) -> float:
    """flops / the time of one run(), timed over about `seconds` after one warm-up."""
    run()
    runs, started = 0, time.perf_counter()
    while True:
        run()
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and runs >= 3:
            return flops * runs / elapsed


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.1) -> float:
    """Floating-point operations per second of square matmuls in `dtype` on `device`."""
    n = 2048 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return _rate_of(lambda: torch.mm(a, b), 2.0 * n ** 3, device, seconds)


def measure_attention_rate(device: torch.device, dtype: torch.dtype, head_dim: int, seconds: float = 0.1) -> float:
    """Floating-point operations per second of torch's attention kernel (scaled_dot_product_attention) at this
    head width, on 2048 tokens (8192 on a GPU): the kernel a long step spends most of its time in."""
    tokens = 8192 if device.type == "cuda" else 2048
    heads = max(1, 256 // max(head_dim, 1))
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device).to(dtype) for _ in range(3))
    return _rate_of(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                    4.0 * tokens * tokens * head_dim * heads, device, seconds)

"""The engine: loaded models and the requests they serve, in one process or on one rank.

Every rank of the group holds an Engine. `sample` runs on all ranks (the DiT is sequence
parallel); `encode` runs on rank 0, or on every rank when its weights are sharded; `decode` on
rank 0, or on every rank with vae_split. With world size 1 and no process group the same code
serves the CLI and the tests. The engine knows model families only through models/family.py.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from . import memory, models, planner
from .config import GroupConfig
from .formats import fp8, gguf as gguf_weights, lora
from .formats.checkpoint import CheckpointError
from .parallel import fsdp
from .parallel.compile import check_compile, compile_blocks
from .parallel.mesh import SequenceParallel, build_sequence_parallel, resolve_degrees
from .parallel.usp_attention import resolve_backend
from .parallel.vae_split import VaeSplit
from .placement import HOST, Placement
from .requests import Cond, EncodeRequest, SampleRequest
from .sampling.samplers import get_sampler
from .sampling.schedules import sampling_sigmas, step_range, timestep
from .sampling.step_cache import CacheSettings, StepCache
from .validation import check_latent, check_sample_request


class SamplingInterrupted(Exception):
    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


def _file_key(path: str, what: str = "model file") -> tuple:
    """Identifies a model file's contents: a changed file is a different model."""
    try:
        p = Path(path).resolve()
        if not p.exists():
            raise CheckpointError(f"{what} not found on rank: {p}")
        stat = p.stat()
    except OSError as exc:  # a path too long, a loop of links, no permission: a bad input, not a crash
        raise CheckpointError(f"{what} {path!r} cannot be read: {exc}") from None
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


def _has_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _batchable(positive: Cond, negative: Cond) -> bool:
    """Can the two CFG passes run as one batch? When the conditionings hold the same tensors of the same
    shapes (past the batch dimension, which both take from the latent)."""
    return set(positive) == set(negative) and all(positive[n].shape[1:] == negative[n].shape[1:] for n in positive)


def _weight_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes a model file's weights take at the compute dtype (from its header alone)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*.safetensors"))
    from .formats.checkpoint import read_header

    shapes, _ = read_header(p)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(int(torch.tensor(shape).prod()) * size for shape, _ in shapes.values())


@contextmanager
def _counting_calls(module: torch.nn.Module, total: int, on_progress: Callable[[int, int], None] | None):
    """on_progress(calls so far, total) after each call of module (capped at total: a split tiled
    decode calls the decoder again on rank 0 to blend the tiles the ranks decoded)."""
    if on_progress is None:
        yield
        return
    calls = 0

    def after_call(*_):
        nonlocal calls
        calls += 1
        if calls <= total:
            on_progress(calls, total)

    handle = module.register_forward_hook(after_call)
    try:
        yield
    finally:
        handle.remove()


def _exchange(mine: torch.Tensor, group, device: torch.device) -> list[torch.Tensor]:
    """All-gather one tensor across the CFG pair: [conditional half's, unconditional half's]
    (on the compute device, which NCCL needs; returned on the CPU)."""
    import torch.distributed as dist

    mine = mine.to(device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine, group=group)
    return [p.cpu() for p in parts]


class Engine:
    """The models of one rank (or of one process) and the requests they serve.

    config: the group's GroupConfig (its ranks are the world size); rank, local_rank: this rank's
    (local_rank picks the GPU on CUDA). With more than one rank the default process group must exist."""

    def __init__(self, config: GroupConfig | None = None, *, rank: int = 0, local_rank: int = 0):
        config = config or GroupConfig()
        self.config = config
        self.world_size, self.rank = config.ranks, rank
        self.timeout = timedelta(seconds=config.timeout)
        self.cfg_degree = config.cfg_parallel
        self.shard_weights = config.shard_weights if self.world_size > 1 else "off"
        self.dit_offload = config.dit_offload
        if self.dit_offload and self.world_size == 1 and not _has_process_group():
            raise ValueError("dit_offload shards the DiT with FSDP, which needs a process group even for one rank: "
                             "a group the pack launches (the USP Group node, the command line) has one; this "
                             "in-process engine has none, so turn dit_offload off here")
        self.vae_split = config.vae_split and self.world_size > 1
        self.sharded: dict[str, bool] = {}  # slot -> were its weights sharded
        self.step_cache: StepCache | None = None  # the last sample call's step cache (its skipped steps)
        self._shard_decisions: dict[tuple, bool] = {}
        self.sp_size = config.sp_ranks  # ranks per sequence-parallel group
        self.requested_degrees = (config.ulysses, config.ring)
        self.device = torch.device(f"cuda:{local_rank}" if config.device == "cuda" else "cpu")
        self.dtype = config.torch_dtype
        # checked before anything loads; the backend is resolved again for each DiT, once its ring degree is known
        self.backend = resolve_backend(config.attention, self.device, self.dtype,
                                       config.ring if isinstance(config.ring, int) else 1)
        check_compile(config.compile, self.device)
        if config.fp8_compute and (reason := fp8.fp8_compute_unavailable(self.device)):
            raise ValueError(f"{reason}: use fp8_compute 'off'")
        self.load_counts: Counter[str] = Counter()
        self.lora_warnings: list[str] = []  # the last sample's LoRAs that matched only part of the model
        self._loaded: dict[str, tuple[tuple, object]] = {}  # slot -> (file key, model)
        self._meshes: dict[tuple[int, int], SequenceParallel] = {}
        self.sp = SequenceParallel()
        self.placement = Placement(config.placement, self.device)

    @property
    def world_group(self):
        """Every rank of the group: the group of the collectives that involve them all."""
        import torch.distributed as dist

        return dist.group.WORLD

    def _mesh(self, model, family: models.ModelFamily) -> SequenceParallel:
        """The SP groups for this model: the planner's choice for "auto" (USP_VIDEO_LINK names the
        link, nvlink by default), else the user's degrees, validated against the heads."""
        facts = family.describe_dit(model)
        if self.requested_degrees == ("auto", "auto"):
            params = sum(p.numel() for p in model.parameters())
            degrees = planner.auto_degrees(self.sp_size, facts["heads"], facts["hidden"], facts["layers"], params,
                                           link=os.environ.get("USP_VIDEO_LINK", "nvlink"))
        else:
            degrees = resolve_degrees(self.sp_size, facts["heads"], *self.requested_degrees)
        if degrees not in self._meshes:
            self._meshes[degrees] = (
                build_sequence_parallel(*degrees, timeout=self.timeout, cfg_degree=self.cfg_degree)
                if self.world_size > 1 else SequenceParallel())
        return self._meshes[degrees]

    def _cached(self, slot: str, path: str, load: Callable[[str], object], role: str | None = None):
        """The model in slot, loaded from path unless that very file is loaded already (loads are
        counted per role: "dit", "vae", a text input)."""
        key = _file_key(path)
        held = self._loaded.get(slot)
        if held is None or held[0] != key:
            self._unload(slot)  # free the old model before loading the new one
            self._loaded[slot] = (key, load(path))
            self.load_counts[role or slot] += 1
        return self._loaded[slot][1]

    def _unload(self, slot: str) -> None:
        self._loaded.pop(slot, None)
        self.placement.forget(slot)

    def should_shard(self, slot: str, path: str) -> bool:
        """Shard this model's weights? "on"; for "auto", when they would take more than 80% of one
        device's free memory; the DiT always with dit_offload (its host-memory shards are FSDP's, on one
        rank too). Collective: every rank calls it, and the ranks agree on the maximum."""
        if slot == "dit" and self.dit_offload:  # the same config on every rank: no need to agree
            self.sharded[slot] = True
            return True
        if self.shard_weights == "off":
            return False
        key = (slot, _file_key(path))
        if key not in self._shard_decisions:
            want = 1.0
            if self.shard_weights == "auto":
                want = float(_weight_bytes(path, self.dtype) > 0.8 * self._rank_free_memory())
            flag = torch.tensor([want], device=self.device)
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world_group)
            self._shard_decisions[key] = bool(flag.item())
        self.sharded[slot] = self._shard_decisions[key]
        return self.sharded[slot]

    # -- the DiT ----------------------------------------------------------------------------------

    def _rank_free_memory(self, device: torch.device | None = None) -> int:
        """The memory this rank may use on its device (or on `device`: the host, for a model that waits
        there): its GPU's free memory, after handing back what freed models left in the caching
        allocator; on the CPU, the host's available memory shared by the ranks on it."""
        import gc

        device = device or self.device
        gc.collect()  # freed models can sit in reference cycles (the fp8 layers' patched forwards)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            return _free_memory(device)
        return _free_memory(device) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    def _worst_need_and_free(self, need: float, device: torch.device | None = None) -> tuple[float, float]:
        """(the largest need, the smallest free memory on `device`) over the ranks, so that every rank of a
        pre-flight decides alike. Collective."""
        worst = torch.tensor([float(need), -float(self._rank_free_memory(device))], dtype=torch.float64,
                             device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.world_group)
        return float(worst[0]), -float(worst[1])

    def check_memory(self, path: str, family: models.ModelFamily, sharded: bool, device: torch.device | None = None,
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
        need, free = self._worst_need_and_free(need, device)
        if error is not None:
            raise CheckpointError(f"{Path(path).name} cannot be read: {error}") from None
        if need == float("inf"):
            raise CheckpointError(f"{Path(path).name} cannot be read on another rank of the group")
        if need <= free:
            return
        where = "its weights sharded over the ranks" if sharded else "a whole copy on every rank"
        if idle:
            fixes = ([f"turn shard_weights on (each rank then parks 1/{self.world_size} of each expert)"]
                     if not sharded and self.world_size > 1 else [])
            fixes += ["set the group's placement to keep (both experts stay on the GPUs, which then need room for both)",
                      "load the models' fp8 files (about half the bytes of bf16)", "free host memory"]
            raise ValueError(f"{Path(path).name} waits in host memory while the other expert runs (placement offload), "
                             f"and at the switch the two meet there: about {need / 2**30:.1f} GiB of host memory on "
                             f"each rank ({where}), but {'a rank' if self.world_size > 1 else 'the host'} has "
                             f"{free / 2**30:.1f} GiB free: " + "; or ".join(fixes))
        if offload:
            who = "a rank" if self.world_size > 1 else "the host"
            raise ValueError(f"{Path(path).name} needs about {need / 2**30:.1f} GiB of host memory on each rank to "
                             f"load (dit_offload keeps its weight shards there), but {who} has {free / 2**30:.1f} GiB "
                             "free: use more hosts (each rank then holds 1/N of the weights); or load the model's "
                             "fp8 file (about half the bytes of bf16); or free host memory")
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
        raise ValueError(f"{Path(path).name} needs about {need / 2**30:.1f} GiB on each rank to load ({where}), but "
                         f"{'a rank' if self.world_size > 1 else 'the device'} has {free / 2**30:.1f} GiB free: "
                         + "; or ".join(fixes))

    def _load_dit(self, path: str, family: models.ModelFamily, device: torch.device):
        shard = None
        if self.should_shard("dit", path):  # decided before the load: the loader shards as it reads
            def shard(model):
                return fsdp.shard_model(model, family.blocks(model), self.device, offload=self.dit_offload)
        if self.dit_offload:  # the shards are loaded into host memory (as FSDP's offload wants them) ...
            device = HOST
        self.check_memory(path, family, shard is not None, device, offload=self.dit_offload,
                          idle=device == HOST and self.device != HOST and not self.dit_offload)
        model = family.load_dit(path, self.dtype, device, shard=shard)
        if self.dit_offload:  # ... and what FSDP does not manage (Wan's RoPE tables) runs on the device
            fsdp.buffers_to(model, self.device)
        self.sp = self._mesh(model, family)
        backend = resolve_backend(self.config.attention, self.device, self.dtype, self.sp.ring_degree)
        model = family.parallelize(model, self.sp, backend)
        model.usp_backend = backend
        model.usp_fp8_compute_layers = fp8.use_scaled_mm(model) if self.config.fp8_compute else 0
        model.usp_compiled_blocks = compile_blocks(family.blocks(model), self.config.compile)  # after USP and FSDP
        model.usp_family = family
        model.usp_sp = self.sp
        return model

    @staticmethod
    def _dit_slot(path: str, family: models.ModelFamily) -> str:
        return f"dit:{family.name}:{_file_key(path)[0]}"

    def dit(self, path: str, family: str | None = None, idle: bool = False):
        """The DiT in path, loaded once as `family` (None: detected from the file); each expert of a
        model keeps its own slot. idle: an expert that does not run next; with placement offload/cpu
        it waits in host memory (and is loaded there), else it is brought to the device."""
        found = models.detect_dit(path, family)
        slot = self._dit_slot(path, found)
        park = idle and self.placement.parks_idle_experts
        device = HOST if park else self.device

        def load(p):
            model = self._load_dit(p, found, device)
            # an offloaded DiT's shards are already in host memory: the placement leaves it alone. Others are
            # recorded on the device, so that park() below moves an idle expert to host memory even where the
            # loader put it on the device (a diffusers folder, which FSDP shards onto the device after loading)
            self.placement.loaded(slot, "offloaded" if fsdp.is_offloaded(model) else "device")
            return model

        model = self._cached(slot, path, load, role="dit")
        if park:
            self.placement.park(slot, model)
        else:
            self.placement.bring(slot, model)
        return model

    def _experts(self, paths: list[str], family: str | None, running: int) -> list:
        """The DiTs of these paths, paths[running] on the device and the others idle (as dit() says);
        the idle ones are loaded or parked first, so that they never meet the running one on the device."""
        order = sorted(range(len(paths)), key=lambda i: i == running)
        loaded = {i: self.dit(paths[i], family, idle=i != running) for i in order}
        return [loaded[i] for i in range(len(paths))]

    def _run_expert(self, model) -> None:
        """Before an expert runs: it goes to the device, every other loaded DiT (an idle expert) to
        host memory when the placement says so (parked first, so that the two never meet on the device)."""
        mine = next(slot for slot, (_, m) in self._loaded.items() if m is model)
        if self.placement.parks_idle_experts:
            for slot, (_, other) in self._loaded.items():
                if slot.startswith("dit:") and slot != mine:
                    self.placement.park(slot, other)
        self.placement.bring(mine, model)

    def _forget_other_dits(self, keep: list[str], family: str | None = None) -> None:
        """Free the DiTs that this request does not use (a new model replaces the old). The files
        are checked first: a request naming a missing file frees nothing."""
        kept = {self._dit_slot(path, models.detect_dit(path, family)) for path in keep}
        for slot in [s for s in self._loaded if s.startswith("dit:") and s not in kept]:
            self._unload(slot)

    def dit_info(self, paths: list[str], family: str | None = None) -> dict:
        """Load these DiTs (freeing any other) and describe the first. Collective (every rank's free memory
        is gathered at the end, also when this rank failed, so that no rank waits for it)."""
        try:
            info = self._dit_info(paths, family)
        except BaseException:
            self._free_memory_per_rank(failed=True)
            raise
        return {**info, **self._free_memory_per_rank()}

    def _dit_info(self, paths: list[str], family: str | None) -> dict:
        self._forget_other_dits(paths, family)
        models_ = self._experts(paths, family, running=0)
        if any(m.usp_family is not models_[0].usp_family for m in models_):
            raise ValueError("the DiTs of one model must be of one family, got "
                             + ", ".join(m.usp_family.label for m in models_))
        model = models_[0]
        family, self.sp = model.usp_family, model.usp_sp
        return {"family": family.name, "model": family.label, **family.describe_dit(model),
                "latent_format": family.latent_format, "ulysses": self.sp.ulysses_degree,
                "ring": self.sp.ring_degree, "cfg_parallel": self.cfg_degree,
                "parameters": sum(p.numel() for p in model.parameters()),
                "sharded": self.sharded.get("dit", False), "parameter_bytes": fsdp.parameter_bytes(model),
                "fp8_layers": fp8.count_fp8_layers(model), "quantized_layers": gguf_weights.quantized_layers(model),
                "placement": self.placement.mode,
                "attention": model.usp_backend, "compiled_blocks": model.usp_compiled_blocks,
                "compile": self.config.compile, "fp8_compute": self.config.fp8_compute,
                "fp8_compute_layers": model.usp_fp8_compute_layers,
                "dit_offload": self.dit_offload}

    def _apply_loras(self, experts: list, req: SampleRequest) -> list[str]:
        """Give each expert the LoRAs the request lists for it (req.loras), unless it has them already: the
        old ones removed, the new ones read (their files only: the base model stays as loaded) and applied
        unmerged (formats/lora.py). The same list twice changes nothing. Returns warnings for LoRAs that match
        only part of the model (applied to the layers they match), every time the LoRAs run, not only when read."""
        warnings = []
        for model, path, wanted in zip(experts, req.experts, req.loras or [[] for _ in experts]):
            key = tuple((_file_key(p, "LoRA file"), float(s)) for p, s in wanted)
            if getattr(model, "usp_lora_key", ()) == key:
                warnings += getattr(model, "usp_lora_warnings", [])
                continue
            lora.remove(model)
            model.usp_lora_key, model.usp_lora_warnings = (), []
            if wanted:
                family = model.usp_family
                source, shapes = family.dit_source_map(path)
                patches = []
                for lora_path, strength in wanted:
                    found, report = lora.read_lora(lora_path, float(strength), shapes, family.lora_aliases,
                                                   f"{family.label} ({Path(path).name})")
                    self.load_counts["lora"] += 1
                    patches += found
                    if report.warning():
                        model.usp_lora_warnings.append(report.warning())
                lora.apply(model, source, patches, self.dtype)
                warnings += model.usp_lora_warnings
            model.usp_lora_key = key
        return warnings

    def _free_memory_per_rank(self, failed: bool = False) -> dict:
        """{"free_bytes": this rank's free memory (_rank_free_memory: its GPU's, or its share of the host's),
        "free_bytes_per_rank": every rank's}. Collective; a rank that failed takes part with -1."""
        mine = torch.tensor([-1 if failed else self._rank_free_memory()], dtype=torch.int64, device=self.device)
        every = [mine]
        if self.world_size > 1:
            import torch.distributed as dist

            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine, group=self.world_group)
        return {"free_bytes": int(mine), "free_bytes_per_rank": [int(t) for t in every]}

    # -- text -------------------------------------------------------------------------------------

    def _text_inputs(self, request: EncodeRequest) -> tuple[models.ModelFamily, dict[str, str]]:
        family = models.get(request.family)
        missing = [part.input for part in family.text_parts if part.input not in request.files]
        if missing:
            raise ValueError(f"{family.label} text encoding needs the files {', '.join(missing)}")
        return family, {part.input: request.files[part.input] for part in family.text_parts}

    def encode_on_all_ranks(self, request: EncodeRequest) -> bool:
        """A text encoder runs on rank 0 alone, unless the weights of one of its parts are sharded
        across the ranks (then every rank holds a shard and takes part). Collective."""
        family, files = self._text_inputs(request)
        if self.placement.mode == "cpu":  # text encoders run on rank 0's CPU, whole
            return False
        shard = [self.should_shard(part.input, files[part.input])
                 for part in family.text_parts if part.shard_units is not None]
        return any(shard)

    def _load_text_part(self, part, path: str):
        shard = None
        if part.shard_units is not None and self.sharded.get(part.input):  # decided before the load
            def shard(model):  # called by the loader, on the meta device where it streams the file
                return fsdp.shard_model(model, part.shard_units(model), self.device)
        return part.load(path, self.dtype, self.placement.text_device, shard)

    def text_part(self, name: str):
        """The loaded text part of that input (a family TextPart's input name), or None."""
        held = self._loaded.get(f"text:{name}")
        return None if held is None else held[1]

    def encode(self, request: EncodeRequest) -> Cond:
        """The prompt's conditioning tensors ({"tokens": [1, L, D], ...}), float32 on the CPU."""
        family, files = self._text_inputs(request)
        parts = {}
        for part in family.text_parts:
            slot = f"text:{part.input}"

            def load(path, part=part, slot=slot):
                loaded = self._load_text_part(part, path)
                self.placement.loaded(slot, "cpu" if self.placement.mode == "cpu" else "device")
                return loaded

            parts[part.input] = self._cached(slot, files[part.input], load, role=part.input)
            self.placement.bring(slot, parts[part.input])
        threads = torch.get_num_threads()
        if self.placement.mode == "cpu" and self.device.type == "cuda":
            # rank 0 encodes alone on the CPU while the other ranks wait: it may use every core it is given
            # (torchrun starts each rank with one thread when there are several)
            torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        try:
            return family.make_text_encoder(parts).encode(request.prompt)
        finally:
            torch.set_num_threads(threads)
            if self.placement.parks_text:  # with placement offload, the encoders wait in host memory
                for part in family.text_parts:
                    self.placement.park(f"text:{part.input}", parts[part.input])

    # -- the VAE ----------------------------------------------------------------------------------

    def _load_vae(self, path: str):
        family = models.detect_vae(path)
        vae = family.load_vae(path, self.dtype, self.device)
        vae.usp_family = family
        return vae

    def vae(self, path: str):
        return self._cached("vae", path, self._load_vae)

    @torch.no_grad()
    def decode(self, path: str, latent: torch.Tensor,
               on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        """Frames on rank 0 (None on the others). With vae_split the ranks share the decode, as the
        VAE's family splits it (exact); otherwise rank 0 decodes alone. on_progress(done, total) runs on
        rank 0 after each call of the VAE's decoder (a latent frame, or a tile)."""
        vae = self.vae(path)
        family = vae.usp_family
        check_latent(latent, "latent", family, check_size=False)
        with _counting_calls(vae.decoder, family.decoder_calls(vae, latent), on_progress if self.rank == 0 else None):
            if not self.vae_split:
                return family.decode(vae, latent, None) if self.rank == 0 else None
            return family.decode(vae, latent, VaeSplit(self.rank, self.world_size, self.device, self.world_group))

    @torch.no_grad()
    def encode_video(self, path: str, frames: torch.Tensor,
                     on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        """The raw latent [1, C, T, H/s, W/s] of IMAGE frames [F, H, W, 3] (one video) on rank 0 (None on
        the others). With vae_split the ranks share the encode by rows, as the VAE's family splits it (exact);
        otherwise rank 0 encodes alone. on_progress(done, total) runs on rank 0 after each call of the VAE's
        encoder (a latent frame)."""
        from .validation import check_frames

        vae = self.vae(path)
        family = vae.usp_family
        if not family.vae_encodes:
            family.encode(vae, frames, None)  # its refusal, by name
        check_frames(frames, "pixels", family)
        with _counting_calls(vae.encoder, family.encoder_calls(vae, frames), on_progress if self.rank == 0 else None):
            if not self.vae_split:
                return family.encode(vae, frames, None) if self.rank == 0 else None
            return family.encode(vae, frames, VaeSplit(self.rank, self.world_size, self.device, self.world_group))

    # -- sampling ---------------------------------------------------------------------------------

    def activation_bytes(self, family: models.ModelFamily, experts: list, latent_shape: tuple[int, ...],
                         text_tokens: int, passes: int) -> int:
        """What a step adds to this rank's memory at its peak (memory.py), for the largest of the experts:
        the activations of its tokens (both passes at once when they are batched), and with sharded
        weights the blocks gathered around the one that runs."""
        need = 0
        for model in experts:
            seq = family.step_sequence(model, latent_shape, text_tokens)
            sp = model.usp_sp
            batch = latent_shape[0] * passes
            bytes_ = memory.step_activation_bytes(seq["tokens"], seq["hidden"], seq["ffn"], batch, self.dtype.itemsize,
                                                  sp.ulysses_degree * sp.ring_degree, sp.ulysses_degree,
                                                  sp.ring_degree)
            if fsdp.is_sharded(model):
                bytes_ += memory.gathered_block_bytes(family.blocks(model))
            need = max(need, bytes_)
        return need

    def check_activations(self, family: models.ModelFamily, experts: list, latent_shape: tuple[int, ...],
                          text_tokens: int, passes: int) -> None:
        """The activations pre-flight of a sample: a ValueError saying what to change, before the first
        step, when a step will not fit in a rank's free memory (with the models loaded). Collective: the
        ranks agree on the largest need and the smallest free memory."""
        need, free = self._worst_need_and_free(self.activation_bytes(family, experts, latent_shape, text_tokens,
                                                                     passes))
        if need <= free:
            return
        t, h, w = latent_shape[-3:]
        tokens = family.step_sequence(experts[0], latent_shape, text_tokens)["tokens"]
        sp_ranks = experts[0].usp_sp.ulysses_degree * experts[0].usp_sp.ring_degree
        fixes = [f"a smaller video (fewer frames, or a smaller width x height: the latent {t}x{h}x{w} makes "
                 f"{tokens} tokens{f', {-(-tokens // sp_ranks)} per rank' if sp_ranks > 1 else ''})",
                 "more GPUs (each holds 1/N of the tokens)"]
        if passes == 2 and self.world_size % 2 == 0:
            fixes.append("cfg_parallel on (each half of the GPUs runs one of the two passes)")
        if not any(fsdp.is_sharded(m) for m in experts) and self.world_size > 1:
            fixes.append("shard_weights on (each rank then holds 1/N of the weights)")
        if not self.dit_offload and self.device.type == "cuda":
            fixes.append("dit_offload on (the weight shards wait in host memory, not on the GPU)")
        fixes.append("an fp8 model file (about half the weights' memory)")
        raise ValueError(f"a step on this latent needs about {need / 2**30:.2f} GiB of activations on each rank, "
                         f"but {'a rank' if self.world_size > 1 else 'the device'} has {free / 2**30:.2f} GiB free "
                         f"with the model loaded: use " + "; or ".join(fixes))

    def _step_cache(self, settings: CacheSettings, family: models.ModelFamily, experts: list,
                    steps: int, latent_shape: tuple[int, ...], offset: int = 0) -> StepCache | None:
        """The step cache of a sample call (None when off); a method the model cannot use is refused
        before the first step. Its report (skipped steps) stays in self.step_cache."""
        self.step_cache = None
        if not settings.on:
            return None
        specs = {id(model): family.step_cache_spec(model, latent_shape) for model in experts}
        for spec in specs.values():
            if settings.method == "teacache" and spec.teacache_coefficients is None:
                raise ValueError(f"cache method teacache: {spec.teacache_note}")
            if settings.method == "magcache" and spec.magcache_ratios("positive", steps) is None:
                raise ValueError(f"cache method magcache: {spec.magcache_note}")
        self.step_cache = StepCache(settings, steps, lambda model: specs[id(model)], offset)
        return self.step_cache

    @torch.no_grad()
    def sample(self, req: SampleRequest, on_step: Callable[[int, int, torch.Tensor], bool] | None = None,
               on_start: Callable[[], None] | None = None) -> torch.Tensor:
        """Run the sampler; returns the raw-space latent (float32, CPU).

        With several experts, each step runs on the expert its sigma belongs to (req.boundaries); all
        stay loaded, so a switch costs nothing. on_step(i, total, denoised) runs after each step on
        every rank, with the current x0 estimate in the model's (normalised) latent space, and returns
        True to stop; it must return the same value on every rank (the worker makes it collective).
        on_start() runs once the models are loaded and the inputs checked, just before the first step
        (step times are counted from there, not from the request).
        """
        req.check_experts()
        self.step_cache = None
        # inputs that can be checked from the files' headers, before a model is freed or loaded
        check_sample_request(req, models.detect_dit(req.experts[0], req.family))
        self._forget_other_dits(req.experts + req.keep, req.family)
        sigmas = step_range(sampling_sigmas(req.steps, req.shift, req.denoise), req.start_step, req.end_step,
                            req.leftover_noise)
        # the other experts of the model (keep) stay loaded for the next sampler, idle; of this call's
        # experts, the one of the first step is on the device
        first = req.expert_at(float(sigmas[0])) if sigmas is not None else 0
        experts = self._experts(req.keep + req.experts, req.family, running=len(req.keep) + first)[len(req.keep):]
        family, self.sp = experts[0].usp_family, experts[0].usp_sp
        if any(m.usp_family is not family for m in experts):
            raise ValueError("the experts of one sampler call must be of one model family, got "
                             + ", ".join(m.usp_family.label for m in experts))
        self.lora_warnings = self._apply_loras(experts, req)
        options = check_sample_request(req, family, family.describe_dit(experts[0])["text_dim"])
        if sigmas is None:  # start_at_step is past the last step: nothing to do (as in ComfyUI)
            return req.latent.float().clone()
        # the whole schedule this run is part of (denoise < 1 keeps its tail; start_step skips its head)
        schedule = req.steps if req.denoise > 0.9999 else int(req.steps / req.denoise)
        cache = self._step_cache(CacheSettings.from_dict(req.cache), family, experts, schedule,
                                 tuple(req.latent.shape), offset=schedule - req.steps + req.start_step)
        # the activations of a step as denoise() below runs it: both passes in one batch when their
        # conditionings have the same shapes (and no cfg-parallel), else one pass at a time
        two_passes = req.negative is not None and any(req.cfg_for(i) != 1.0 for i in range(len(experts)))
        text_tokens = max(c["tokens"].shape[1] for c in ([req.positive, req.negative] if two_passes else [req.positive]))
        batched = two_passes and self.cfg_degree == 1 and _batchable(req.positive, req.negative)
        self.check_activations(family, experts, tuple(req.latent.shape), text_tokens, passes=2 if batched else 1)
        step = 0  # the step the next model call belongs to (each sampler calls the model once a step)
        noise = make_noise(tuple(req.latent.shape), req.seed) if req.add_noise else torch.zeros(req.latent.shape)
        # ComfyUI leaves an all-zero (empty) latent as it is rather than normalising it
        latent = req.latent.float()
        latent_in = family.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
        x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent_in
        batch = x.shape[0]
        # ComfyUI's denoise mask (prepare_mask): the LATENT's noise_mask at the latent's shape, 1 where it samples
        mask = None if req.noise_mask is None else torch.broadcast_to(req.noise_mask.float(), x.shape).contiguous()
        mask_on_device = None if mask is None else mask.to(self.device)  # the timesteps' copy, made once

        def expand(cond: Cond | None) -> Cond | None:
            if cond is None:
                return None
            out = {}
            for name, t in cond.items():
                t = t.to(self.device, self.dtype)
                out[name] = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
            return out

        shape = tuple(req.latent.shape)
        positive = expand(family.model_conditioning(experts[0], req.positive, shape, "positive"))
        uses_negative = req.negative is not None and any(req.cfg_for(i) != 1.0 for i in range(len(experts)))
        negative = expand(family.model_conditioning(experts[0], req.negative, shape, "negative")) if uses_negative \
            else None

        def velocity(model, x_in: torch.Tensor, sigma: torch.Tensor, cond: Cond, side: str) -> torch.Tensor:
            t = torch.full((x_in.shape[0],), float(timestep(sigma)), device=self.device)
            if mask is not None:  # a family may time the kept tokens apart (ComfyUI's process_timestep)
                t = family.masked_timestep(model, t, mask_on_device.repeat(x_in.shape[0] // batch, 1, 1, 1, 1))
            if cache is None:
                out = family.velocity(model, x_in.to(self.device, self.dtype), t, cond, options)
            else:  # side: which pass of the step (each keeps its own cache)
                with cache.forward(model, side, step, model.usp_sp):
                    out = family.velocity(model, x_in.to(self.device, self.dtype), t, cond, options)
            return out.float().cpu()

        def both(a: Cond, b: Cond) -> Cond:
            return {name: torch.cat([a[name], b[name]]) for name in a if name in b}

        running = experts[first]

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if mask is None:
                return denoise_whole(x_t, sigma)
            # ComfyUI's KSamplerX0Inpaint: where the mask is 0 the model sees the family's inpaint latent and
            # the estimate is the latent itself
            kept = 1.0 - mask
            x_t = x_t * mask + family.inpaint_latent(latent_in, noise, sigma) * kept
            return denoise_whole(x_t, sigma) * mask + latent_in * kept

        def denoise_whole(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            nonlocal running
            expert = req.expert_at(float(sigma))
            model, cfg = experts[expert], req.cfg_for(expert)
            if model is not running:  # the switch: the expert that ran waits in host memory (placement)
                self._run_expert(model)
                running = model
            sp = model.usp_sp
            if cache is not None:
                cache.start_expert(expert)
            if negative is None or cfg == 1.0:  # with CFG-parallel both halves run this one pass
                v = velocity(model, x_t, sigma, positive, "positive")
            elif sp.cfg_degree == 2:  # each half runs one pass; the pair swaps results
                side = "positive" if sp.cfg_rank == 0 else "negative"
                mine = velocity(model, x_t, sigma, positive if sp.cfg_rank == 0 else negative, side)
                v_pos, v_neg = _exchange(mine, sp.cfg_group, self.device)
                v = v_neg + cfg * (v_pos - v_neg)
            elif _batchable(positive, negative):
                v_pos, v_neg = velocity(model, torch.cat([x_t, x_t]), sigma, both(positive, negative),
                                        "both").chunk(2)
                v = v_neg + cfg * (v_pos - v_neg)  # one batched forward for both passes
            else:
                v_pos = velocity(model, x_t, sigma, positive, "positive")
                v_neg = velocity(model, x_t, sigma, negative, "negative")
                v = v_neg + cfg * (v_pos - v_neg)
            return x_t - sigma * v

        def callback(i: int, x_t: torch.Tensor, denoised: torch.Tensor) -> None:
            nonlocal step
            step = i + 1
            if on_step is not None and on_step(i, len(sigmas) - 1, denoised):
                raise SamplingInterrupted(i)

        if on_start is not None:
            on_start()
        x = get_sampler(req.sampler)(denoise, x, sigmas, callback)
        # ComfyUI's LATENT holds a partly denoised x as x / (1 - sigma): the next sampler's noise
        # scaling, (1 - sigma) * latent, gives x back (a no-op when the run ends at sigma 0).
        x = x / (1.0 - sigmas[-1])
        return family.process_out(x)

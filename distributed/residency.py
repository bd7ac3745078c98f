"""Model residency: which models a rank holds, keyed by typed slots, and where the idle ones wait.

The engine (engine.py) asks this module for a model by file; it loads the file once (a changed file
is a different model), counts the loads, and moves models between the device and host memory as the
group's placement says. A loaded DiT is held as a `LoadedDiT` record: the module together with what
loading it decided (family, sequence-parallel groups, attention backend, compiled blocks, fp8 layers,
applied LoRAs), so that no other layer reads facts back from attributes stamped on the nn.Module.

The group's `placement` option (GroupConfig.placement):
  keep     every model stays on the device once loaded (fastest; the most device memory).
  offload  a text encoder goes to host memory as soon as its prompt is encoded, and back to the
           device for the next prompt; an expert of a model made of several (Wan 2.2 A14B) waits in
           host memory while the other runs, and is loaded there when it is not the one to run
           first. The device memory they held is handed back (torch.cuda.empty_cache) at once.
  cpu      text encoders are loaded on the CPU and run there (they never take device memory, and
           are never sharded); the experts as with offload.

A move is torch's own `module.to(device)`: FSDP2-sharded modules support it (FSDPModule._apply
reshards, moves each rank's shards and re-registers them), so a rank only ever moves its shards.
On a CPU group the device is the host: the moves are no-ops, but the bookkeeping (`where`) is the
same, and the tests check it there.

A DiT loaded with the group's dit_offload is "offloaded": its FSDP shards always live in host memory
and FSDP copies each block's to the device as it runs, so it is never moved (moving it to the device
would undo the offload, and it takes no device memory while idle).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import PLACEMENTS
from .formats.checkpoint import CheckpointError
from .models.family import ModelFamily, SequenceHooks
from .parallel.fsdp import is_offloaded
from .parallel.mesh import SequenceParallel

HOST = torch.device("cpu")


def modules_of(loaded) -> list[torch.nn.Module]:
    """The torch modules of a loaded model: the object itself, or the modules it holds as attributes
    (a text encoder wrapping its transformers model), or none (a tokenizer)."""
    if isinstance(loaded, torch.nn.Module):
        return [loaded]
    if isinstance(loaded, (tuple, list)):
        return [m for item in loaded for m in modules_of(item)]
    return [v for v in vars(loaded).values() if isinstance(v, torch.nn.Module)] if hasattr(loaded, "__dict__") else []


class Placement:
    """Moves loaded models between the device and host memory as the placement says, and remembers
    where each one is (`where`: slot -> "device", "host", "cpu" or "offloaded"), for the group's status and
    the tests."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {mode!r}")
        self.mode, self.device = mode, device
        self.where: dict[Slot, str] = {}

    @property
    def text_device(self) -> torch.device:
        """Where text encoders are loaded and run."""
        return HOST if self.mode == "cpu" else self.device

    @property
    def parks_text(self) -> bool:
        return self.mode == "offload"

    @property
    def parks_idle_experts(self) -> bool:
        return self.mode != "keep"

    def loaded(self, slot: Slot, where: str) -> None:
        """A model was loaded: on the "device", in "host" memory (an idle expert), on the "cpu" to run
        there (text encoders with placement cpu), or "offloaded" (a DiT with dit_offload); the last two are
        never moved."""
        self.where[slot] = where

    def forget(self, slot: Slot) -> None:
        self.where.pop(slot, None)

    def bring(self, slot: Slot, loaded) -> None:
        """To the device (before it runs), if it waits in host memory."""
        if self.where.get(slot) == "host":
            self._move(loaded, self.device)
            self.where[slot] = "device"

    def park(self, slot: Slot, loaded) -> None:
        """To host memory (it is idle), handing the device memory back."""
        if self.where.get(slot) == "device":
            self._move(loaded, HOST)
            self.where[slot] = "host"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _move(loaded, device: torch.device) -> None:
        for module in modules_of(loaded):
            module.to(device)


# -- slots and records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where a loaded model is held. kind: "dit", "text" or "vae"; name: the family (a DiT: each expert of a
    model keeps its own slot) or the text input the part serves; path: a DiT's resolved file."""

    kind: str
    name: str = ""
    path: str = ""

    @property
    def role(self) -> str:
        """What its loads are counted as: "dit", "vae", or the text input ("t5", "llama", ...)."""
        return self.name if self.kind == "text" else self.kind


VAE_SLOT = Slot("vae")


def text_slot(name: str) -> Slot:
    return Slot("text", name)


def file_key(path: str, what: str = "model file") -> tuple:
    """Identifies a model file's contents: a changed file is a different model."""
    try:
        p = Path(path).resolve()
        if not p.exists():
            raise CheckpointError(f"{what} not found on rank: {p}")
        stat = p.stat()
    except OSError as exc:  # a path too long, a loop of links, no permission: a bad input, not a crash
        raise CheckpointError(f"{what} {path!r} cannot be read: {exc}") from None
    return str(p), stat.st_mtime_ns, stat.st_size


def dit_slot(path: str, family: ModelFamily) -> Slot:
    return Slot("dit", family.name, file_key(path)[0])


@dataclass(eq=False)
class LoadedDiT:
    """A DiT as this rank holds it: the module and what its load decided (parallelize.py), plus the LoRAs
    applied to it (formats/lora.py's state, to undo them; their key, to skip a chain applied already)."""

    module: torch.nn.Module
    family: ModelFamily
    sp: SequenceParallel
    backend: str
    hooks: SequenceHooks  # what its sequence-parallel hooks share with the step caches
    compiled_blocks: int = 0
    fp8_compute_layers: int = 0
    lora_key: tuple = ()
    lora_warnings: list[str] = field(default_factory=list)
    lora_state: Any = None


DitLoader = Callable[[str, ModelFamily, torch.device], LoadedDiT]


class Residency:
    """The models of one rank, one per slot, each loaded once from its file (loads counted per role), and
    the placement that moves them. Expert switching lives here: which DiT is on the device."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.load_counts: Counter[str] = Counter()
        self._held: dict[Slot, tuple[tuple, Any]] = {}  # slot -> (file key, model)

    def get(self, slot: Slot) -> Any:
        """The model in slot, or None."""
        held = self._held.get(slot)
        return None if held is None else held[1]

    def cached(self, slot: Slot, path: str, load: Callable[[str], Any]) -> Any:
        """The model in slot, loaded from path unless that very file is loaded already."""
        key = file_key(path)
        held = self._held.get(slot)
        if held is None or held[0] != key:
            self.unload(slot)  # free the old model before loading the new one
            self._held[slot] = (key, load(path))
            self.load_counts[slot.role] += 1
        return self._held[slot][1]

    def unload(self, slot: Slot) -> None:
        self._held.pop(slot, None)
        self.placement.forget(slot)

    def dits(self) -> list[tuple[Slot, LoadedDiT]]:
        """The DiTs held, with their slots, in load order."""
        return [(slot, held[1]) for slot, held in self._held.items() if slot.kind == "dit"]

    def dit(self, path: str, family: ModelFamily, load: DitLoader, idle: bool = False) -> LoadedDiT:
        """The DiT in path, loaded once as `family`; each expert of a model keeps its own slot. idle: an
        expert that does not run next; with placement offload/cpu it waits in host memory (and is loaded
        there), else it is brought to the device."""
        slot = dit_slot(path, family)
        park = idle and self.placement.parks_idle_experts
        device = HOST if park else self.placement.device

        def load_here(p: str) -> LoadedDiT:
            dit = load(p, family, device)
            # an offloaded DiT's shards are already in host memory: the placement leaves it alone. Others are
            # recorded on the device, so that park() below moves an idle expert to host memory even where the
            # loader put it on the device (a diffusers folder, which FSDP shards onto the device after loading)
            self.placement.loaded(slot, "offloaded" if is_offloaded(dit.module) else "device")
            return dit

        dit = self.cached(slot, path, load_here)
        if park:
            self.placement.park(slot, dit)
        else:
            self.placement.bring(slot, dit)
        return dit

    def experts(self, paths: list[str], families: list[ModelFamily], running: int,
                load: DitLoader) -> list[LoadedDiT]:
        """The DiTs of these paths, paths[running] on the device and the others idle (as dit() says); the
        idle ones are loaded or parked first, so that they never meet the running one on the device."""
        order = sorted(range(len(paths)), key=lambda i: i == running)
        loaded = {i: self.dit(paths[i], families[i], load, idle=i != running) for i in order}
        return [loaded[i] for i in range(len(paths))]

    def run_expert(self, dit: LoadedDiT) -> None:
        """Before an expert runs: it goes to the device, every other loaded DiT (an idle expert) to host
        memory when the placement says so (parked first, so that the two never meet on the device)."""
        mine = next(slot for slot, other in self.dits() if other is dit)
        if self.placement.parks_idle_experts:
            for slot, other in self.dits():
                if slot != mine:
                    self.placement.park(slot, other)
        self.placement.bring(mine, dit)

    def forget_other_dits(self, keep: list[tuple[str, ModelFamily]]) -> None:
        """Free the DiTs that this request does not use (a new model replaces the old). The files are
        checked first (file_key): a request naming a missing file frees nothing."""
        kept = {dit_slot(path, family) for path, family in keep}
        for slot in [s for s, _ in self.dits() if s not in kept]:
            self.unload(slot)

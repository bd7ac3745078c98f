"""The models around the DiT: text encoders (prompt -> conditioning) and the VAE (frames <-> latent).

The engine (engine.py) hands each its residency (residency.py: the slots the models are held in, and
the placement that moves them) and what else it needs; both load their models once per file. A text
encoder runs on rank 0, or on every rank when the weights of one of its parts are sharded (the
pre-flight decides, preflight.py); the VAE on rank 0, or on every rank with vae_split, as the VAE's
family splits the work (exact).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import models
from .models.family import ModelFamily
from .parallel import fsdp
from .parallel.vae_split import VaeSplit
from .preflight import Preflight
from .requests import Cond, EncodeRequest
from .residency import VAE_SLOT, Residency, text_slot
from .validation import check_frames, check_latent


@dataclass
class LoadedVAE:
    module: torch.nn.Module
    family: ModelFamily


@contextmanager
def counting_calls(module: torch.nn.Module, total: int, on_progress: Callable[[int, int], None] | None):
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


class TextEncoders:
    """The text encoders of one rank: each family TextPart's model in its slot (text_slot(input))."""

    def __init__(self, residency: Residency, preflight: Preflight, device: torch.device, dtype: torch.dtype):
        self.residency, self.placement, self.preflight = residency, residency.placement, preflight
        self.device, self.dtype = device, dtype

    def _text_inputs(self, request: EncodeRequest) -> tuple[ModelFamily, dict[str, str]]:
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
        shard = [self.preflight.should_shard(part.input, files[part.input])
                 for part in family.text_parts if part.shard_units is not None]
        return any(shard)

    def _load_text_part(self, part, path: str):
        shard = None
        if part.shard_units is not None and self.preflight.sharded.get(part.input):  # decided before the load
            def shard(model):  # called by the loader, on the meta device where it streams the file
                return fsdp.shard_model(model, part.shard_units(model), self.device)
        return part.load(path, self.dtype, self.placement.text_device, shard)

    def text_part(self, name: str):
        """The loaded text part of that input (a family TextPart's input name), or None."""
        return self.residency.get(text_slot(name))

    def encode(self, request: EncodeRequest) -> Cond:
        """The prompt's conditioning tensors ({"tokens": [1, L, D], ...}), float32 on the CPU."""
        family, files = self._text_inputs(request)
        parts = {}
        for part in family.text_parts:
            slot = text_slot(part.input)

            def load(path, part=part, slot=slot):
                loaded = self._load_text_part(part, path)
                self.placement.loaded(slot, "cpu" if self.placement.mode == "cpu" else "device")
                return loaded

            parts[part.input] = self.residency.cached(slot, files[part.input], load)
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
                    self.placement.park(text_slot(part.input), parts[part.input])


class Vae:
    """The VAE of one rank (one slot: a new file replaces the old). split: the ranks share its work
    (vae_split with more than one rank)."""

    def __init__(self, residency: Residency, device: torch.device, dtype: torch.dtype, rank: int, world_size: int,
                 split: bool):
        self.residency, self.device, self.dtype = residency, device, dtype
        self.rank, self.world_size, self.split = rank, world_size, split

    def _load_vae(self, path: str) -> LoadedVAE:
        family = models.detect_vae(path)
        return LoadedVAE(family.load_vae(path, self.dtype, self.device), family)

    def loaded_vae(self, path: str) -> LoadedVAE:
        """The VAE in path with its family, loaded once."""
        return self.residency.cached(VAE_SLOT, path, self._load_vae)

    @torch.no_grad()
    def decode(self, path: str, latent: torch.Tensor,
               on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        """Frames on rank 0 (None on the others). With vae_split the ranks share the decode, as the
        VAE's family splits it (exact); otherwise rank 0 decodes alone. on_progress(done, total) runs on
        rank 0 after each call of the VAE's decoder (a latent frame, or a tile)."""
        loaded = self.loaded_vae(path)
        vae, family = loaded.module, loaded.family
        check_latent(latent, "latent", family, check_size=False)
        with counting_calls(vae.decoder, family.decoder_calls(vae, latent), on_progress if self.rank == 0 else None):
            if not self.split:
                return family.decode(vae, latent, None) if self.rank == 0 else None
            return family.decode(vae, latent, VaeSplit(self.rank, self.world_size, self.device, dist.group.WORLD))

    @torch.no_grad()
    def encode_video(self, path: str, frames: torch.Tensor,
                     on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
        """The raw latent [1, C, T, H/s, W/s] of IMAGE frames [F, H, W, 3] (one video) on rank 0 (None on
        the others). With vae_split the ranks share the encode by rows, as the VAE's family splits it (exact);
        otherwise rank 0 encodes alone. on_progress(done, total) runs on rank 0 after each call of the VAE's
        encoder (a latent frame)."""
        loaded = self.loaded_vae(path)
        vae, family = loaded.module, loaded.family
        if not family.vae_encodes:
            family.encode(vae, frames, None)  # its refusal, by name
        check_frames(frames, "pixels", family)
        with counting_calls(vae.encoder, family.encoder_calls(vae, frames), on_progress if self.rank == 0 else None):
            if not self.split:
                return family.encode(vae, frames, None) if self.rank == 0 else None
            return family.encode(vae, frames, VaeSplit(self.rank, self.world_size, self.device, dist.group.WORLD))

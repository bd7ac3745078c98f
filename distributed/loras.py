"""The LoRA chains of a sampler call, applied to the loaded experts (the file reading and the hooks are
formats/lora.py's; this module decides when to apply and keeps the record on the LoadedDiT)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .formats import lora
from .residency import LoadedDiT, file_key


def apply_chains(experts: list[LoadedDiT], paths: list[str], chains: list[list], dtype: torch.dtype,
                 load_counts: Counter[str]) -> list[str]:
    """Give each expert (loaded from paths[i]) the LoRAs chains[i] lists for it ([[file, strength], ...]; an
    empty list of chains: none), unless it has them already: the old ones removed, the new ones read (their
    files only: the base model stays as loaded; each read counted as "lora" in load_counts) and applied
    unmerged (formats/lora.py). The same list twice changes nothing. Returns warnings for LoRAs that match
    only part of the model (applied to the layers they match), every time the LoRAs run, not only when read."""
    warnings = []
    for dit, path, wanted in zip(experts, paths, chains or [[] for _ in experts]):
        key = tuple((file_key(p, "LoRA file"), float(s)) for p, s in wanted)
        if dit.lora_key == key:
            warnings += dit.lora_warnings
            continue
        lora.remove(dit.module, dit.lora_state)
        dit.lora_key, dit.lora_warnings, dit.lora_state = (), [], None
        if wanted:
            family = dit.family
            source, shapes = family.dit_source_map(path)
            patches = []
            for lora_path, strength in wanted:
                found, report = lora.read_lora(lora_path, float(strength), shapes, family.lora_aliases,
                                               f"{family.label} ({Path(path).name})")
                load_counts["lora"] += 1
                patches += found
                if report.warning():
                    dit.lora_warnings.append(report.warning())
            dit.lora_state = lora.apply(dit.module, source, patches, dtype)
            warnings += dit.lora_warnings
        dit.lora_key = key
    return warnings

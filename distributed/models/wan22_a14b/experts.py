"""Telling Wan 2.2 A14B's experts apart, and from the files they are not.

The two experts (and a Wan 2.1 14B file) have the same tensor names and shapes, so only names can say
which is which: ComfyUI's repackaged files are called wan2.2_t2v_high_noise_14B_fp16.safetensors and
wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors; a diffusers Wan 2.2 pipeline keeps the high-noise expert
in transformer/ and the low-noise one in transformer_2/. Shapes do tell a TI2V-5B file (48 input
channels, hidden size 3072) from an expert, text-to-video (16 input channels) or image-to-video (36).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...formats.checkpoint import CheckpointError, unprefixed
from ..wan21.dit import CONFIG_METADATA_KEY, FUN_CONTROL_A14B_CHANNELS, I2V_CHANNELS

T2V_CHANNELS = 16
HIDDEN_14B = 5120
SLOTS = ("high_noise", "low_noise")
_SAYS = {"high_noise": re.compile(r"high[_\-. ]?noise|(^|[^a-z])high([^a-z]|$)", re.I),
         "low_noise": re.compile(r"low[_\-. ]?noise|(^|[^a-z])low([^a-z]|$)", re.I)}
_WAN21 = re.compile(r"wan[_\-. ]?2[._]?1(?!\d)", re.I)


def _input_channels_problem(name: str, channels: int, hidden: int | None) -> str | None:
    if channels == 48 or hidden == 3072:
        return (f"{name} looks like Wan 2.2 TI2V-5B ({channels} input channels, hidden size {hidden}), not an "
                "A14B expert; Wan 2.2 A14B experts are 14B text-to-video models")
    if channels not in (T2V_CHANNELS, I2V_CHANNELS, FUN_CONTROL_A14B_CHANNELS):
        return (f"{name} has {channels} input channels; a Wan 2.2 A14B expert has {T2V_CHANNELS} (text to video), "
                f"{I2V_CHANNELS} (image to video, Fun InP) or {FUN_CONTROL_A14B_CHANNELS} (Fun Control)")
    return None


def check_expert_shapes(path: Path, shapes: dict, metadata: dict) -> None:
    """CheckpointError for a single file whose shapes show it is no A14B T2V expert (a file that states
    its config in its metadata, as the tiny test files do, may have any size)."""
    stripped = unprefixed(shapes)
    shape = (stripped.get("patch_embedding.weight") or [[]])[0]
    if len(shape) < 2:
        return  # not a Wan DiT at all: the Wan 2.1 checks say what it is
    hidden, channels = shape[0], shape[1]
    problem = _input_channels_problem(path.name, channels, hidden)
    if problem:
        raise CheckpointError(problem)
    if hidden != HIDDEN_14B and CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path.name} has hidden size {hidden}; Wan 2.2 A14B experts have the 14B architecture "
                              f"({HIDDEN_14B}; 1536 is the Wan 2.1 1.3B model)")


def check_expert_folder(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    problem = _input_channels_problem(path.name, config.get("in_channels", T2V_CHANNELS),
                                      config.get("num_attention_heads", 40) * config.get("attention_head_dim", 128))
    if problem:
        raise CheckpointError(problem)
    if config.get("image_dim"):
        raise CheckpointError(f"{path} is a Wan 2.1 image-to-video model (CLIP vision cross-attention); "
                              "Wan 2.2 A14B experts have none")


def says(path: str) -> str | None:
    """The slot a file's or folder's name says it belongs to, or None."""
    p = Path(path)
    if p.is_dir() and p.name in ("transformer", "transformer_2"):  # a diffusers Wan 2.2 pipeline
        return "high_noise" if p.name == "transformer" else "low_noise"
    said = {slot for slot, pattern in _SAYS.items() if pattern.search(p.name)}
    return said.pop() if len(said) == 1 else None


def check_pair(paths: list[str], configs: list[dict]) -> list[str]:
    """The two experts, high noise first: CheckpointError when they cannot go together or the names put
    them in the other slots; returns warnings where the names do not say."""
    high, low = paths
    if Path(high).resolve() == Path(low).resolve():
        raise CheckpointError(f"the same file is in both expert slots ({Path(high).name}); Wan 2.2 A14B needs its "
                              "high-noise and its low-noise expert")
    if configs[0] and configs[1] and configs[0] != configs[1]:
        changed = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
        raise CheckpointError(f"the experts are of different architectures ({Path(high).name} and {Path(low).name} "
                              f"differ in {', '.join(changed)}); both must be the experts of one Wan 2.2 A14B model "
                              "(both text-to-video, or both image-to-video)")
    warnings = []
    for slot, path in zip(SLOTS, paths):
        if _WAN21.search(Path(path).name):
            warnings.append(f"{Path(path).name} is named as a Wan 2.1 model; it runs as the Wan 2.2 "
                            f"{slot.replace('_', '-')} expert (their tensors look alike)")
            continue
        said = says(path)
        if said is not None and said != slot:
            raise CheckpointError(f"{Path(path).name} is in the {slot.replace('_', '-')} slot but its name says "
                                  f"{said.replace('_', '-')}: swap the two experts")
        if said is None:
            warnings.append(f"{Path(path).name}'s name does not say which expert it is; it runs as the "
                            f"{slot.replace('_', '-')} expert (the files of the two experts look alike)")
    return warnings

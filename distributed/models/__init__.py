"""The model families, one package each (models/family.py says what a family is), and how their
files are told apart. Shared helpers: checkpoint.py (reading files), fp8.py (fp8 storage), video.py
(VAE frames), tiny.py (what the tiny sets share).

Adding a family: a package with a FAMILY, listed in FAMILIES below, a node file and its workflows.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CheckpointError, read_header, unprefixed
from .family import ModelFamily
from .hunyuan_video import FAMILY as HUNYUAN_VIDEO
from .wan21 import FAMILY as WAN21

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WAN21, HUNYUAN_VIDEO)}


def get(name: str) -> ModelFamily:
    """The family called name ("wan2.1", ...); ValueError lists the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def _one_of(labels: list[str], what: str) -> str:
    """'neither a A nor a B diffusion model' / 'none of A, B or C diffusion models'."""
    if len(labels) == 2:
        return f"neither a {labels[0]} nor a {labels[1]} {what}"
    return f"none of {', '.join(labels[:-1])} or {labels[-1]} {what}s" if len(labels) > 1 else f"not a {labels[0]} {what}"


def describe_keys(keys_or_shapes) -> str:
    """What a checkpoint looks like, for error messages ("looks like a VAE")."""
    shapes = keys_or_shapes if isinstance(keys_or_shapes, dict) else dict.fromkeys(keys_or_shapes, ([], ""))
    for family in FAMILIES.values():
        described = family.describe(shapes)
        if described:
            return described
    keys = set(shapes)
    if "decoder.middle.0.residual.0.gamma" in keys or any(k.startswith(("decoder.", "encoder.conv")) for k in keys):
        return "looks like a VAE"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "looks like a T5/UMT5 text encoder"
    if any("input_blocks." in k or "joint_blocks." in k for k in keys):
        return "looks like an image model (SD/SDXL/SD3)"
    return "unrecognised tensor names"


def _folder_class(path: Path) -> str | None:
    config_file = path / "config.json"
    return json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None


def detect_dit(path: str | Path) -> ModelFamily:
    """The family of a DiT single file or diffusers folder; CheckpointError when it is none of them."""
    path = Path(path)
    labels = [f.label for f in FAMILIES.values()]
    if path.is_dir():
        name = _folder_class(path)
        if name is None:
            raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers transformer "
                                  f"folder ({' or '.join(f.dit_class for f in FAMILIES.values())})")
        for family in FAMILIES.values():
            if name == family.dit_class:
                return family
        raise CheckpointError(f"{path}: a diffusers {name}; expected "
                              f"{' or '.join(f.dit_class for f in FAMILIES.values())}")
    shapes, _ = read_header(path)
    stripped = unprefixed(shapes)
    for family in FAMILIES.values():
        if family.is_dit(set(stripped)):
            return family
    raise CheckpointError(f"{path.name} is {_one_of(labels, 'diffusion model')} ({describe_keys(stripped)})")


def detect_vae(path: str | Path) -> ModelFamily:
    """Which family's VAE a file or diffusers folder is (its loader then checks it in detail)."""
    path = Path(path)
    if path.is_dir():
        name = _folder_class(path)
        for family in FAMILIES.values():
            if name == family.vae_class:
                return family
        raise CheckpointError(f"{path}: expected a diffusers VAE folder "
                              f"({' or '.join(f.vae_class for f in FAMILIES.values())}), found {name or 'no config.json'}")
    shapes, _ = read_header(path)
    for family in FAMILIES.values():
        if family.is_vae(set(shapes)):
            return family
    kinds = " or a ".join(f"{f.label} VAE" for f in FAMILIES.values())
    raise CheckpointError(f"{path.name} is not a {kinds} ({describe_keys(shapes)}); pick the VAE file of your "
                          "model from models/vae")


def check_dit_file(path: str | Path) -> tuple[ModelFamily, dict]:
    """Family and config of a DiT file, read from its header only (fast, in the calling process)."""
    family = detect_dit(path)
    path = Path(path)
    if path.is_dir():
        return family, {}
    shapes, metadata = read_header(path)
    return family, family.dit_config(path, shapes, metadata)


__all__ = ["FAMILIES", "ModelFamily", "get", "detect_dit", "detect_vae", "check_dit_file", "describe_keys",
           "CheckpointError"]

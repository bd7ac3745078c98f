"""The model families, one package each (models/family.py says what a family is), and how their
files are told apart. Shared helpers: video.py (VAE frames), tiny.py (what the tiny sets share); the file formats
(checkpoint, safetensors, GGUF, fp8, LoRA) are read by distributed/formats/.

Adding a family: a package here whose FAMILY is a ModelFamily (FAMILIES finds it), a node file and its
workflows; nothing else changes.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from ..formats.checkpoint import CheckpointError, read_header, unprefixed
from .family import ModelFamily


def _discover() -> dict[str, ModelFamily]:
    """Every family package's FAMILY, in their `order` (detection tries them in it)."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            family = getattr(importlib.import_module(f".{module.name}", __name__), "FAMILY", None)
            if isinstance(family, ModelFamily):
                found.append(family)
    return {f.name: f for f in sorted(found, key=lambda f: (f.order, f.name))}


FAMILIES: dict[str, ModelFamily] = _discover()


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


def _is_dir(path: Path) -> bool:
    """path.is_dir(), with a path that cannot even be looked at (too long, a loop of links, no
    permission) a CheckpointError naming it."""
    try:
        return path.is_dir()
    except OSError as exc:
        raise CheckpointError(f"model file {str(path)[:200]!r} cannot be read: {exc.strerror or exc}") from None


def _folder_class(path: Path) -> str | None:
    config_file = path / "config.json"
    return json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None


def detect_dit(path: str | Path, family: str | None = None) -> ModelFamily:
    """The family of a DiT single file or diffusers folder; CheckpointError when it is none of them.

    Files of some families look exactly like another's (Wan 2.2 A14B's experts have Wan 2.1 14B's
    tensors): those families do not claim files (claims_files False) and are only chosen by name, with
    `family`; the file must then pass that family's checks."""
    return check_dit_file(path, family)[0]


def check_dit_file(path: str | Path, family: str | None = None) -> tuple[ModelFamily, dict]:
    """Family and config of a DiT file, read from its header only, once (fast, in the calling process);
    {} for a diffusers folder. `family` as for detect_dit."""
    path = Path(path)
    if family is not None:
        candidates = [get(family)]
    else:
        candidates = [f for f in FAMILIES.values() if f.claims_files]
    labels = [f.label for f in candidates]
    if _is_dir(path):
        name = _folder_class(path)
        if name is None:
            raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers transformer "
                                  f"folder ({' or '.join(dict.fromkeys(f.dit_class for f in candidates))})")
        found, _ = _first_that_takes([f for f in candidates if f.dit_class == name],
                                     lambda f: f.check_dit_folder(path),
                                     f"{path}: a diffusers {name}; expected "
                                     f"{' or '.join(dict.fromkeys(f.dit_class for f in candidates))}")
        return found, {}
    shapes, metadata = read_header(path)
    stripped = unprefixed(shapes)
    return _first_that_takes([f for f in candidates if f.is_dit(set(stripped))],
                             lambda f: f.dit_config(path, shapes, metadata),
                             f"{path.name} is {_one_of(labels, 'diffusion model')} ({describe_keys(stripped)})")


def _first_that_takes(families: list[ModelFamily], check, none_message: str) -> tuple[ModelFamily, object]:
    """The first family whose check of the file passes (families that share tensor names, Wan 2.1 and
    Wan 2.2 TI2V-5B, tell their files apart by shapes) and what its check returned; the first one's
    error when none does."""
    if not families:
        raise CheckpointError(none_message)
    errors = []
    for family in families:
        try:
            return family, check(family)
        except CheckpointError as exc:
            errors.append(exc)
    raise errors[0]


def detect_vae(path: str | Path) -> ModelFamily:
    """Which family's VAE a file or diffusers folder is (its loader then checks it in detail)."""
    path = Path(path)
    if _is_dir(path):
        name = _folder_class(path)
        config = json.loads((path / "config.json").read_text()) if name else {}
        for family in FAMILIES.values():
            if name == family.vae_class and family.is_vae_folder(config):
                return family
        raise CheckpointError(f"{path}: expected a diffusers VAE folder "
                              f"({' or '.join(dict.fromkeys(f.vae_class for f in FAMILIES.values()))}), found {name or 'no config.json'}")
    shapes, _ = read_header(path)
    for family in FAMILIES.values():
        if family.is_vae(set(shapes)):
            return family
    kinds = " or a ".join(f"{f.label} VAE" for f in FAMILIES.values())
    raise CheckpointError(f"{path.name} is not a {kinds} ({describe_keys(shapes)}); pick the VAE file of your "
                          "model from models/vae")


def same_latent_space(a: str, b: str) -> bool:
    """Do the latents of these two families (by name) mean the same thing (Wan 2.1 and Wan 2.2 A14B do)?"""
    return get(a).latent_format == get(b).latent_format


__all__ = ["FAMILIES", "ModelFamily", "get", "detect_dit", "detect_vae", "check_dit_file", "same_latent_space", "describe_keys",
           "CheckpointError"]

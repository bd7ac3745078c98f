"""`usp-video`: the command line. It drives the same group client and checks as the ComfyUI nodes.

    usp-video demo [--model hunyuan]     tiny random model set, text -> video on 2 CPU ranks
    usp-video make-tiny-models DIR       write every model family's tiny set in ComfyUI's layout
    usp-video generate --dit F --text-encoder F --vae F --prompt "..." [--ranks N --ulysses U --ring R]
    usp-video generate --dit HUNYUAN_F --llama F --clip F --tokenizers DIR --vae F --prompt "..." ...
    usp-video generate --model wan2.2 --high-noise F --low-noise F --text-encoder F --vae F --prompt "..." ...
    usp-video queue WORKFLOW_API.json --server http://127.0.0.1:8188 [--set NODE.INPUT=VALUE ...]
    usp-video plan --model wan-14b --gpus 8 --size 1280x720x81 [--link nvlink|pcie|xgmi]

This module parses the command line; generate.py runs generate and demo, comfy_queue.py queue, planner.py plan.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .config import GroupConfig
from .models import FAMILIES

# The group's fields that generate offers no flag for (the group's size is --ranks, or the --gpus listed)
_NOT_GROUP_FLAGS = ("timeout",)


def _group_for(args: argparse.Namespace):
    """The group the command runs on: attached (started with torchrun elsewhere) or launched here."""
    from .client import UspGroup

    if getattr(args, "attach", None):  # a group started with torchrun, e.g. on several hosts
        secret = os.environ.get("USP_VIDEO_SECRET")
        if not secret:
            raise ValueError("--attach needs the group's secret in USP_VIDEO_SECRET (the one its ranks were given)")
        return UspGroup.attach(args.attach, secret, args.ranks), args.ranks
    if args.device == "cuda":
        import torch

        gpus = args.gpus or tuple(range(torch.cuda.device_count()))
        ranks = len(gpus)
    else:
        gpus, ranks = (), args.ranks
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return GroupConfig.from_args(args, ranks, gpus=gpus, dtype=dtype), ranks


def _family_by_short_name(short_name: str):
    return next(f for f in FAMILIES.values() if f.short_name == short_name)


def _run(group_and_ranks, model, files: dict, prompt: str, settings):
    """generate.generate on a group, which is closed (attached) or freed (launched here) after."""
    from .client import UspGroup
    from .registry import free_group
    from .generate import generate

    group, ranks = group_and_ranks
    try:
        return generate(group, ranks, model, files, prompt, settings)
    finally:
        group.close() if isinstance(group, UspGroup) else free_group()


def generate_command(args: argparse.Namespace) -> Path | None:
    from . import generate

    files = {name: getattr(args, name, None) for name in _file_flags()}
    settings = generate.Settings(
        width=args.width, height=args.height, frames=args.frames, negative=args.negative, steps=args.steps,
        cfg=args.cfg, shift=args.shift, seed=args.seed, sampler=args.sampler, cache=args.cache,
        boundary=args.boundary, image=args.image, fps=args.fps, out=args.out, save_latent=args.save_latent)
    family = _family_by_short_name(args.model).name if args.model else None
    model = generate.check(family, files, settings)
    # the sampler options of the model's family that were given (another family's are not its own)
    options = {name: getattr(args, name) for name in model.family.options if getattr(args, name, None) is not None}
    return _run(_group_for(args), model, files, args.prompt, replace(settings, options=options))


def demo(args: argparse.Namespace) -> None:
    from .generate import Settings, check

    family = _family_by_short_name(args.model)
    files = {name: str(path) for name, path in family.make_tiny(args.models_dir).items()}
    image = files.pop("image", None)  # a tiny set's synthetic start / control image, where it has one
    print(f"tiny {family.label} model set: {args.models_dir}")
    size = family.pixel_multiple  # the smallest video the model takes, a few patches wide
    settings = Settings(width=4 * size, height=3 * size, frames=9, steps=4, seed=42, fps=8.0, out=args.out, image=image)
    model = check(family.name, files, settings)
    settings = replace(settings, conditioning=family.demo_conditioning(model.configs[0], settings.width,
                                                                       settings.height, settings.frames))
    group = GroupConfig(ranks=args.ranks, device="cpu", dtype="fp32", attention="sdpa", threads_per_rank=1)
    _run((group, args.ranks), model, files, "a cat walks on the beach at sunset", settings)


def make_tiny(args: argparse.Namespace) -> None:
    from .models.tiny import make_all

    for paths in make_all(args.dir).values():
        for path in paths.values():
            print(path)


def default_tiny_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "usp-video" / "tiny-models"


def _file_flags() -> dict[str, str]:
    """The model file flags of generate ({dest: help}): the DiT, every family's experts and text parts, the VAE."""
    labels = " or ".join(f.label for f in FAMILIES.values() if not f.experts)
    flags = {"dit": f"{labels} T2V .safetensors file or diffusers folder"}
    experts, text_inputs = {}, {}
    for family in FAMILIES.values():
        for name in family.experts:
            experts.setdefault(name, []).append(family.label)
        for part in family.text_parts:
            text_inputs.setdefault(part.input, []).append(f"{family.label}: {part.help}")
    flags.update({name: f"the {name.replace('_', ' ')} expert's file or folder ({', '.join(labels_)})"
                  for name, labels_ in experts.items()})
    flags.update({name: "; ".join(helps) for name, helps in text_inputs.items()})
    flags["vae"] = "the model's VAE .safetensors file or diffusers folder (needed for --out and --image)"
    return flags


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run text -> video on the built-in tiny model (2 CPU ranks)")
    p.add_argument("--models-dir", type=Path, default=default_tiny_dir())
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", choices=[f.short_name for f in FAMILIES.values()],
                   default=next(iter(FAMILIES.values())).short_name,
                   help="which family's tiny set")
    p.add_argument("--out", type=Path, default=Path("usp-video-demo.webp"))
    p.set_defaults(func=demo)
    p = sub.add_parser("make-tiny-models", help="write the tiny model sets in ComfyUI's models/ layout")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=make_tiny)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text -> video with given model files")
    p.add_argument("--model", choices=[f.short_name for f in FAMILIES.values()],
                   help="the model family (default: told from the --dit file); needed for a family of experts")
    p.add_argument("--boundary", type=float, default=None,
                   help="the sigma where two experts switch (default: the family's, e.g. "
                        + ", ".join(f"{f.label} {f.defaults.boundaries[0]}" for f in FAMILIES.values()
                                    if f.defaults.boundaries) + ")")
    for name, help_text in _file_flags().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help_text)
    p.add_argument("--image", help="start image (png/jpg) for an image-to-video model that takes no CLIP vision "
                                   "(Wan 2.2 I2V A14B), resized as ComfyUI's WanImageToVideo resizes it")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None, help="negative prompt (used when cfg != 1; default: the model's)")
    for family in FAMILIES.values():
        for name, option in family.options.items():
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None,
                           help=f"{option.help} (default {option.default:g})")
    _add_sampling(p)
    p.add_argument("--ranks", type=int, default=1, help="number of CPU ranks (device cpu)")
    GroupConfig.add_arguments(p, defaults={"dtype": None}, skip=_NOT_GROUP_FLAGS)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--out", help="video file to write (.webp or .gif)")
    p.add_argument("--save-latent", help="write the sampled latent (ComfyUI SaveLatent format)")
    p.add_argument("--attach", metavar="RUN_DIR",
                   help="use a group started with torchrun (several hosts) whose rank 0 runs here with this "
                        "--run-dir; its secret comes from USP_VIDEO_SECRET; --ranks gives its size")
    p.set_defaults(func=generate_command)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """generate's video size and sampler settings (defaults: the families', listed in the help)."""
    from .sampling.samplers import SAMPLERS

    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=33)
    defaults = lambda what: ", ".join(f"{f.label} {getattr(f.defaults, what)}" for f in FAMILIES.values())  # noqa: E731
    p.add_argument("--steps", type=int, default=None, help=f"default: {defaults('steps')}")
    p.add_argument("--cfg", default=None, help="one scale, or one per expert (4.0,3.0); default: "
                                               + ", ".join(f"{f.label} {','.join(map(str, f.defaults.cfg_list()))}"
                                                           for f in FAMILIES.values()))
    p.add_argument("--shift", type=float, default=None, help=f"default: {defaults('shift')}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help=f"default: {defaults('sampler')}")
    p.add_argument("--cache", default=None, metavar="METHOD:THRESHOLD",
                   help="a step cache: teacache:0.2, fbcache:0.1 or magcache:0.12 (docs/features.md, 'Step caches')")


def build_parser() -> argparse.ArgumentParser:
    from .comfy_queue import add_parser as add_queue_parser
    from .planner import add_parser as add_plan_parser

    parser = argparse.ArgumentParser(prog="usp-video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_generate(sub)
    add_plan_parser(sub)
    add_queue_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"usp-video: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        print("usp-video: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

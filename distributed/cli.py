"""`usp-video`: the command line. It drives the same group client and checks as the ComfyUI nodes.

    usp-video demo [--model hunyuan]     tiny random model set, text -> video on 2 CPU ranks
    usp-video make-tiny-models DIR       write every model family's tiny set in ComfyUI's layout
    usp-video generate --dit F --text-encoder F --vae F --prompt "..." [--ranks N --ulysses U --ring R]
    usp-video generate --dit HUNYUAN_F --llama F --clip F --tokenizers DIR --vae F --prompt "..." ...
    usp-video generate --model wan2.2 --high-noise F --low-noise F --text-encoder F --vae F --prompt "..." ...
    usp-video queue WORKFLOW_API.json --server http://127.0.0.1:8188 [--set NODE.INPUT=VALUE ...]
    usp-video plan --model wan-14b --gpus 8 --size 1280x720x81 [--link nvlink|pcie|xgmi]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

def check_video_size(width: int, height: int, frames: int, multiple: int = 16) -> None:
    problems = []
    if width < multiple or width % multiple:
        problems.append(f"--width {width} must be a positive multiple of {multiple} (e.g. {multiple * 52})")
    if height < multiple or height % multiple:
        problems.append(f"--height {height} must be a positive multiple of {multiple} (e.g. {multiple * 30})")
    if frames < 1 or (frames - 1) % 4:
        problems.append(f"--frames {frames} must be 4k+1 (1, 5, 9, ..., 81)")
    if problems:
        raise ValueError("; ".join(problems))


def write_video(frames, path: Path, fps: float) -> Path:
    """IMAGE frames [T, H, W, 3] in 0..1 -> animated WebP or GIF."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in (".webp", ".gif"):
        raise ValueError(f"--out {path.name}: supported video formats are .webp and .gif")
    images = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"lossless": False, "quality": 90} if path.suffix.lower() == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, **extra)
    return path


def save_latent(latent, path: Path) -> None:
    """The format of ComfyUI's SaveLatent / LoadLatent nodes."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))


def _group_for(args: argparse.Namespace):
    """The group the command runs on: attached (started with torchrun elsewhere) or launched here."""
    from .client import UspGroup
    from .config import GroupConfig, parse_degree

    if getattr(args, "attach", None):  # a group started with torchrun, e.g. on several hosts
        secret = os.environ.get("USP_VIDEO_SECRET")
        if not secret:
            raise ValueError("--attach needs the group's secret in USP_VIDEO_SECRET (the one its ranks were given)")
        return UspGroup.attach(args.attach, secret, args.ranks), args.ranks
    if args.device == "cuda":
        import torch

        gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else tuple(range(torch.cuda.device_count()))
        ranks = len(gpus)
    else:
        gpus, ranks = (), args.ranks
    config = GroupConfig(ranks=ranks, device=args.device, gpus=gpus, ulysses=parse_degree(args.ulysses),
                         ring=parse_degree(args.ring), dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
                         attention=args.attention, threads_per_rank=args.threads_per_rank,
                         cfg_parallel=2 if getattr(args, "cfg_parallel", False) else 1,
                         shard_weights=getattr(args, "shard_weights", "auto"),
                         vae_split=getattr(args, "vae_split", "on") == "on",
                         placement=getattr(args, "placement", "offload"),
                         dit_offload=getattr(args, "dit_offload", "off") == "on",
                         compile=getattr(args, "compile", "off"), fp8_compute=getattr(args, "fp8_compute", "off") == "on")
    return config, ranks


def generate(args: argparse.Namespace) -> Path | None:
    import torch

    from . import api
    from .client import UspGroup
    from .registry import free_group
    from .requests import SampleRequest

    family = _family_by_short_name(args.model) if getattr(args, "model", None) else None
    if family is not None and family.experts:
        paths = [getattr(args, name, None) for name in family.experts]
        missing = [f"--{name.replace('_', '-')}" for name, path in zip(family.experts, paths) if not path]
        flags = " and ".join(f"--{name}".replace("_", "-") for name in family.experts)
        if getattr(args, "dit", None):
            raise ValueError(f"{family.label} is made of {len(family.experts)} experts: give {flags} instead of --dit")
        if missing:
            raise ValueError(f"{family.label} is made of {len(family.experts)} experts: give {flags} "
                             f"(missing: {', '.join(missing)})")
    elif not getattr(args, "dit", None):
        raise ValueError("give the diffusion model with --dit (or --model for a family of experts)")
    else:
        paths = [args.dit]
    family, warnings = api.check_model_files(paths, family.name if family is not None else None)
    check_video_size(args.width, args.height, args.frames, family.pixel_multiple)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    files = {part.input: getattr(args, part.input, None) for part in family.text_parts}
    missing = [f"--{name.replace('_', '-')}" for name, path in files.items() if not path]
    if missing:
        what = "; ".join(f"--{p.input.replace('_', '-')}: {p.help}" for p in family.text_parts)
        plural = "s" if len(family.text_parts) > 1 else ""
        raise ValueError(f"{Path(paths[0]).name} is a {family.label} model: give its text encoder{plural} with "
                         f"{', '.join(missing)} ({what})")
    negative_prompt = args.negative if args.negative is not None else family.defaults.negative_prompt
    options = {name: getattr(args, name) for name in family.options if getattr(args, name, None) is not None}
    group, ranks = _group_for(args)
    started = time.monotonic()
    try:
        info = api.load_dit(group, paths, family=family.name)
        print(f"model: {info['model']}, {info['layers']} layers, {info['heads']} heads; {ranks} rank(s): "
              f"ulysses={info['ulysses']} x ring={info['ring']}; weights per rank "
              f"{info['parameter_bytes'] / 2**20:.1f} MiB{' (sharded)' if info['sharded'] else ''}", flush=True)
        cfg = _cfg(args.cfg, family)
        positive = api.encode(group, family.name, files, args.prompt)
        uses_negative = any(scale != 1.0 for scale in (cfg if isinstance(cfg, list) else [cfg]))
        negative = api.encode(group, family.name, files, negative_prompt) if uses_negative else None
        pixels = family.spatial_compression
        latent = torch.zeros(1, family.latent_channels, (args.frames - 1) // 4 + 1, args.height // pixels,
                             args.width // pixels)
        if getattr(args, "image", None):
            start = start_conditioning(group, args, paths[0], family)
            positive = {**positive, **start}
            negative = None if negative is None else {**negative, **start}

        def progress(event: dict) -> None:
            per_step = event["elapsed"] / event["step"]
            skipped = f"  ({event['skipped']} skipped by the step cache)" if "skipped" in event else ""
            print(f"step {event['step']}/{event['total']}  {per_step:.2f} s/step  "
                  f"ETA {per_step * (event['total'] - event['step']):.0f} s{skipped}", flush=True)

        boundaries = list(family.defaults.boundaries)
        if getattr(args, "boundary", None) is not None:
            if len(paths) != 2:
                raise ValueError(f"--boundary is where two experts switch; {family.label} has {len(paths)} DiT")
            boundaries = [args.boundary]
        request = SampleRequest(experts=paths, boundaries=boundaries, family=family.name, positive=positive,
                                negative=negative, latent=latent, seed=args.seed,
                                steps=family.defaults.steps if args.steps is None else args.steps, cfg=cfg,
                                shift=family.defaults.shift if args.shift is None else args.shift,
                                sampler=args.sampler or family.defaults.sampler, options=options,
                                cache=_cache(getattr(args, "cache", None)))
        samples, reply = api.sample(group, request, text_dim=info["text_dim"], on_progress=progress)
        if "cache" in reply:
            print(f"step cache ({reply['cache']['method']}) skipped steps {reply['cache']['skipped_steps']}")
        if args.save_latent:
            save_latent(samples, Path(args.save_latent))
            print(f"latent: {args.save_latent}")
        out = None
        if args.out:
            out = write_video(api.decode(group, args.vae, samples, family=family.name), Path(args.out), args.fps)
            print(f"video: {out.resolve()}")
        print(f"done in {time.monotonic() - started:.1f} s")
        return out
    finally:
        group.close() if isinstance(group, UspGroup) else free_group()


def start_conditioning(group, args: argparse.Namespace, dit: str, family) -> dict:
    """--image: the start video's conditioning as WanImageToVideo makes it (the image resized with a centred crop,
    gray frames after it, encoded by the group's split VAE encode; its mask). For image-to-video models that need
    no CLIP vision features (Wan 2.2 I2V A14B): the CLI does not compute them."""
    import numpy as np
    import torch
    from PIL import Image

    from . import api, models

    config = models.check_dit_file(dit, family.name)[1]
    if config.get("in_channels") != 36:
        raise ValueError(f"--image: {Path(dit).name} is a text-to-video model; give an image-to-video (I2V) model")
    if config.get("image_dim"):
        raise ValueError("--image: Wan 2.1 I2V needs the start image's CLIP ViT-H features, which the command line "
                         "does not compute; use ComfyUI (CLIP Vision Encode into WanImageToVideo), or Wan 2.2 I2V A14B")
    if not args.vae:
        raise ValueError("--image needs the VAE (--vae) to encode the start image")
    try:
        with Image.open(args.image) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image: cannot read {args.image} as an image ({exc})") from None
    return api.encode_start_image(group, args.vae, pixels, args.width, args.height, args.frames)


def _cache(text: str | None) -> dict:
    """--cache METHOD:THRESHOLD (teacache:0.2, fbcache:0.1, magcache:0.12) -> the request's cache setting."""
    from .sampling.step_cache import CacheSettings

    if not text:
        return {}
    method, _, threshold = text.partition(":")
    try:
        settings = {"method": method, "threshold": float(threshold or 0.1)}
    except ValueError:
        raise ValueError(f"--cache must be METHOD:THRESHOLD like fbcache:0.1, got {text!r}") from None
    CacheSettings.from_dict(settings)
    return settings


def _cfg(text: str | None, family) -> float | list[float]:
    """--cfg: one scale, or one per expert ("4.0,3.0"); default: the family's."""
    if text is None:
        scales = family.defaults.cfg_list()
    else:
        try:
            scales = [float(part) for part in str(text).split(",")]
        except ValueError:
            raise ValueError(f"--cfg {text!r}: give a number, or one per expert separated by commas") from None
    experts = max(len(family.experts), 1)
    if len(scales) not in (1, experts):
        raise ValueError(f"--cfg lists {len(scales)} scales; {family.label} takes one, or one per expert ({experts})")
    return scales[0] if len(scales) == 1 else scales


def default_tiny_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "usp-video" / "tiny-models"


def _family_by_short_name(short_name: str):
    from .models import FAMILIES

    return next(f for f in FAMILIES.values() if f.short_name == short_name)


def demo(args: argparse.Namespace) -> None:
    family = _family_by_short_name(args.model)
    paths = family.make_tiny(args.models_dir)
    print(f"tiny {family.label} model set: {args.models_dir}")
    size = family.pixel_multiple  # the smallest video the model takes, a few patches wide
    gen = argparse.Namespace(prompt="a cat walks on the beach at sunset", width=4 * size, height=3 * size, frames=9,
                             steps=4,
                             seed=42, device="cpu", gpus="", ranks=args.ranks, ulysses="auto", ring="auto",
                             dtype="fp32", attention="sdpa", threads_per_rank=1, fps=8.0, save_latent=None,
                             out=args.out, negative=None, cfg=None, shift=None, sampler=None, boundary=None,
                             model=args.model, **{name: str(path) for name, path in paths.items()})
    generate(gen)


def make_tiny(args: argparse.Namespace) -> None:
    from .models.tiny import make_all

    for paths in make_all(args.dir).values():
        for path in paths.values():
            print(path)


def queue(args: argparse.Namespace) -> None:
    from .comfy_queue import apply_overrides, load_workflow, run_workflow

    prompt = apply_overrides(load_workflow(args.workflow), args.set or [])

    def show(event: dict) -> None:
        data = event.get("data", {})
        if event.get("type") == "queued":
            print(f"queued prompt {data.get('prompt_id')}", flush=True)
        elif event.get("type") == "progress":
            print(f"node {data.get('node')}: {data.get('value')}/{data.get('max')}", flush=True)
        elif event.get("type") == "executing" and data.get("node") is not None:
            print(f"running node {data['node']} ({prompt.get(data['node'], {}).get('class_type', '?')})", flush=True)

    status, files = run_workflow(args.server, prompt, Path(args.out_dir), timeout=args.timeout, on_event=show)
    if status == "interrupted":
        raise RuntimeError("the prompt was interrupted")
    for path in files:
        print(f"output: {path}")
    if not files:
        print("the workflow finished without output files")


def build_parser() -> argparse.ArgumentParser:
    from .config import DTYPES, PLACEMENTS, SHARD_WEIGHTS
    from .models import FAMILIES
    from .parallel.compile import COMPILE
    from .parallel.usp_attention import BACKENDS
    from .sampling.samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="usp-video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("generate", help="text -> video with given model files")
    labels = " or ".join(f.label for f in FAMILIES.values() if not f.experts)
    p.add_argument("--dit", help=f"{labels} T2V .safetensors file or diffusers folder")
    p.add_argument("--model", choices=[f.short_name for f in FAMILIES.values()],
                   help="the model family (default: told from the --dit file); needed for a family of experts")
    experts = {}
    for family in FAMILIES.values():
        for name in family.experts:
            experts.setdefault(name, []).append(family.label)
    for name, labels_ in experts.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                       help=f"the {name.replace('_', ' ')} expert's file or folder ({', '.join(labels_)})")
    p.add_argument("--boundary", type=float, default=None,
                   help="the sigma where two experts switch (default: the family's, e.g. "
                        + ", ".join(f"{f.label} {f.defaults.boundaries[0]}" for f in FAMILIES.values()
                                    if f.defaults.boundaries) + ")")
    text_inputs = {}
    for family in FAMILIES.values():
        for part in family.text_parts:
            text_inputs.setdefault(part.input, []).append(f"{family.label}: {part.help}")
    for name, helps in text_inputs.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, help="; ".join(helps))
    p.add_argument("--vae", help="the model's VAE .safetensors file or diffusers folder (needed for --out and --image)")
    p.add_argument("--image", help="start image (png/jpg) for an image-to-video model that takes no CLIP vision "
                                   "(Wan 2.2 I2V A14B), resized as ComfyUI's WanImageToVideo resizes it")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None, help="negative prompt (used when cfg != 1; default: the model's)")
    for family in FAMILIES.values():
        for name, option in family.options.items():
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None,
                           help=f"{option.help} (default {option.default:g})")
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
                   help="a step cache: teacache:0.2, fbcache:0.1 or magcache:0.12 (README, 'Step caches')")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpus", default="", help="GPU indices, e.g. 0,1,2,3 (default: all)")
    p.add_argument("--ranks", type=int, default=1, help="number of CPU ranks (device cpu)")
    p.add_argument("--ulysses", default="auto")
    p.add_argument("--ring", default="auto")
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--attention", default="sdpa", choices=list(BACKENDS),
                   help="attention kernel (auto: the fastest available, sdpa on CPU; sageattention only with ring 1)")
    p.add_argument("--threads-per-rank", type=int, default=0)
    p.add_argument("--cfg-parallel", action="store_true",
                   help="run the conditional and unconditional passes on the two halves of the ranks")
    p.add_argument("--shard-weights", default="auto", choices=list(SHARD_WEIGHTS),
                   help="FSDP weight sharding of the DiT and the text encoder (auto: when one device's memory is short)")
    p.add_argument("--vae-split", default="on", choices=["on", "off"],
                   help="split the VAE decode across the ranks (exact)")
    p.add_argument("--placement", default="offload", choices=list(PLACEMENTS),
                   help="where idle models wait: offload (text encoders and the idle expert in host memory), "
                        "keep (on the GPUs), cpu (text encoders run on the CPU)")
    p.add_argument("--dit-offload", default="off", choices=["on", "off"],
                   help="the DiT's weight shards wait in host memory and each block's are copied to the GPU just "
                        "before it runs (for a DiT whose per-rank share does not fit a GPU; slower)")
    p.add_argument("--compile", default="off", choices=list(COMPILE),
                   help="torch.compile each DiT block: on (inductor), aot_eager (checks compilation, no speed gain)")
    p.add_argument("--fp8-compute", default="off", choices=["on", "off"],
                   help="an fp8 file's layers multiply in fp8 (torch._scaled_mm; CUDA GPUs of capability >= 8.9)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--out", help="video file to write (.webp or .gif)")
    p.add_argument("--save-latent", help="write the sampled latent (ComfyUI SaveLatent format)")
    p.add_argument("--attach", metavar="RUN_DIR",
                   help="use a group started with torchrun (several hosts) whose rank 0 runs here with this "
                        "--run-dir; its secret comes from USP_VIDEO_SECRET; --ranks gives its size")
    p.set_defaults(func=generate)

    from .planner import add_parser as add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("queue", help="run an API-format workflow on a ComfyUI server and download its outputs")
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/wan21_t2v_usp_api.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is an id, a title or a class_type (repeatable)")
    p.add_argument("--out-dir", default="usp-video-outputs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait without a websocket")
    p.set_defaults(func=queue)
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

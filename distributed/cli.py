"""`usp-video`: the command line. It drives the same group client and checks as the ComfyUI nodes.

    usp-video demo [--model hunyuan]     tiny random model set, text -> video on 2 CPU ranks
    usp-video make-tiny-models DIR       write the tiny model sets (Wan 2.1, HunyuanVideo) in ComfyUI's layout
    usp-video generate --dit F --text-encoder F --vae F --prompt "..." [--ranks N --ulysses U --ring R]
    usp-video generate --dit HUNYUAN_F --llama F --clip F --tokenizers DIR --vae F --prompt "..." ...
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

WAN_NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的"


def _degree(value: str):
    return value if value == "auto" else int(value)


def check_video_size(width: int, height: int, frames: int) -> None:
    problems = []
    if width < 16 or width % 16:
        problems.append(f"--width {width} must be a positive multiple of 16 (e.g. 832)")
    if height < 16 or height % 16:
        problems.append(f"--height {height} must be a positive multiple of 16 (e.g. 480)")
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


def generate(args: argparse.Namespace) -> Path | None:
    import torch

    from . import api
    from .client import GroupConfig, UspGroup, free_group
    from .models.families import HUNYUAN, WAN

    check_video_size(args.width, args.height, args.frames)
    family, _ = api.check_dit_file(args.dit)
    if family is HUNYUAN:
        missing = [f"--{n}" for n in ("llama", "clip", "tokenizers") if not getattr(args, n, None)]
        if missing:
            raise ValueError(f"{Path(args.dit).name} is a HunyuanVideo model: give its text encoders with "
                             f"{', '.join(missing)} (llava_llama3 file, clip_l file, tokenizer folder)")
    elif not getattr(args, "text_encoder", None):
        raise ValueError(f"{Path(args.dit).name} is a Wan 2.1 model: give its text encoder with --text-encoder "
                         "(umt5_xxl file)")
    negative_prompt = args.negative if args.negative is not None else (WAN_NEGATIVE if family is WAN else "")
    if getattr(args, "attach", None):  # a group started with torchrun, e.g. on several hosts
        secret = os.environ.get("USP_VIDEO_SECRET")
        if not secret:
            raise ValueError("--attach needs the group's secret in USP_VIDEO_SECRET (the one its ranks were given)")
        ranks = args.ranks
        group = UspGroup.attach(args.attach, secret, ranks)
    else:
        if args.device == "cuda":
            gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else tuple(range(torch.cuda.device_count()))
            ranks = len(gpus)
        else:
            gpus, ranks = (), args.ranks
        group = GroupConfig(ranks=ranks, device=args.device, gpus=gpus, ulysses=_degree(args.ulysses),
                            ring=_degree(args.ring), dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
                            attention=args.attention, threads_per_rank=args.threads_per_rank,
                            cfg_parallel=2 if getattr(args, "cfg_parallel", False) else 1,
                            shard_weights=getattr(args, "shard_weights", "auto"),
                            vae_split=getattr(args, "vae_split", "on") == "on")
    started = time.monotonic()
    try:
        info = api.load_dit(group, args.dit)
        print(f"model: {info['model']}, {info['layers']} layers, {info['heads']} heads; {ranks} rank(s): "
              f"ulysses={info['ulysses']} x ring={info['ring']}; weights per rank "
              f"{info['parameter_bytes'] / 2**20:.1f} MiB{' (sharded)' if info['sharded'] else ''}", flush=True)
        cfg = family.cfg if args.cfg is None else args.cfg
        if family is HUNYUAN:
            def encode(prompt):
                return api.encode_hunyuan_text(group, args.llama, args.clip, args.tokenizers, prompt)
        else:
            def encode(prompt):
                return api.encode_text(group, args.text_encoder, prompt), None
        positive, positive_pooled = encode(args.prompt)
        negative, negative_pooled = encode(negative_prompt) if cfg != 1.0 else (None, None)
        latent = torch.zeros(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)

        def progress(event: dict) -> None:
            per_step = event["elapsed"] / event["step"]
            print(f"step {event['step']}/{event['total']}  {per_step:.2f} s/step  "
                  f"ETA {per_step * (event['total'] - event['step']):.0f} s", flush=True)

        samples, _ = api.sample(group, args.dit, positive=positive, negative=negative, latent=latent,
                                seed=args.seed, steps=args.steps, cfg=cfg,
                                shift=family.shift if args.shift is None else args.shift,
                                sampler=args.sampler or family.sampler, text_dim=info["text_dim"],
                                positive_pooled=positive_pooled, negative_pooled=negative_pooled,
                                guidance=args.guidance, on_progress=progress)
        if args.save_latent:
            save_latent(samples, Path(args.save_latent))
            print(f"latent: {args.save_latent}")
        out = None
        if args.out:
            out = write_video(api.decode(group, args.vae, samples), Path(args.out), args.fps)
            print(f"video: {out.resolve()}")
        print(f"done in {time.monotonic() - started:.1f} s")
        return out
    finally:
        group.close() if isinstance(group, UspGroup) else free_group()


def default_tiny_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "usp-video" / "tiny-models"


def demo(args: argparse.Namespace) -> None:
    from .models.tiny import make_tiny_hunyuan_models, make_tiny_models

    common = dict(prompt="a cat walks on the beach at sunset", width=64, height=48, frames=9, steps=4, seed=42,
                  device="cpu", gpus="", ranks=args.ranks, ulysses="auto", ring="auto", dtype="fp32",
                  attention="sdpa", threads_per_rank=1, fps=8.0, save_latent=None, out=args.out, guidance=6.0)
    if args.model == "hunyuan":
        paths = make_tiny_hunyuan_models(args.models_dir)
        print(f"tiny HunyuanVideo model set: {args.models_dir}")
        gen = argparse.Namespace(dit=str(paths["dit"]), llama=str(paths["llama"]), clip=str(paths["clip"]),
                                 tokenizers=str(paths["tokenizers"]), vae=str(paths["vae"]), negative="",
                                 cfg=1.0, shift=7.0, sampler="euler", **common)
    else:
        paths = make_tiny_models(args.models_dir)
        print(f"tiny Wan 2.1 model set: {args.models_dir}")
        gen = argparse.Namespace(dit=str(paths["dit"]), text_encoder=str(paths["text_encoder"]), vae=str(paths["vae"]),
                                 negative=WAN_NEGATIVE, cfg=5.0, shift=5.0, sampler="unipc", **common)
    generate(gen)


def make_tiny(args: argparse.Namespace) -> None:
    from .models.tiny import make_tiny_hunyuan_models, make_tiny_models

    for path in (*make_tiny_models(args.dir).values(), *make_tiny_hunyuan_models(args.dir).values()):
        print(path)


def queue(args: argparse.Namespace) -> None:
    from .comfy_queue import apply_overrides, load_workflow, run_workflow

    prompt = apply_overrides(load_workflow(args.workflow), args.set or [])

    def show(event: dict) -> None:
        data = event.get("data", {})
        if event.get("type") == "progress":
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
    parser = argparse.ArgumentParser(prog="usp-video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run text -> video on the built-in tiny model (2 CPU ranks)")
    p.add_argument("--models-dir", type=Path, default=default_tiny_dir())
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", choices=["wan", "hunyuan"], default="wan")
    p.add_argument("--out", type=Path, default=Path("usp-video-demo.webp"))
    p.set_defaults(func=demo)

    p = sub.add_parser("make-tiny-models", help="write the tiny model sets in ComfyUI's models/ layout")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=make_tiny)

    p = sub.add_parser("generate", help="text -> video with given model files")
    p.add_argument("--dit", required=True, help="Wan 2.1 or HunyuanVideo T2V .safetensors file or diffusers folder")
    p.add_argument("--text-encoder", help="Wan: umt5_xxl .safetensors file or diffusers folder")
    p.add_argument("--llama", help="HunyuanVideo: llava_llama3 .safetensors file or diffusers text_encoder folder")
    p.add_argument("--clip", help="HunyuanVideo: clip_l .safetensors file or diffusers text_encoder_2 folder")
    p.add_argument("--tokenizers", help="HunyuanVideo: folder with the Llama 3 and CLIP tokenizers (llama/ and "
                                        "clip/, a diffusers HunyuanVideo folder, or a ComfyUI checkout)")
    p.add_argument("--vae", help="the model's VAE .safetensors file or diffusers folder (needed for --out)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None, help="negative prompt (used when cfg != 1; Wan: its default)")
    p.add_argument("--guidance", type=float, default=6.0, help="HunyuanVideo's embedded guidance")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=None, help="default: Wan 5.0, HunyuanVideo 1.0")
    p.add_argument("--shift", type=float, default=None, help="default: Wan 5.0, HunyuanVideo 7.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, choices=["unipc", "euler"],
                   help="default: Wan unipc, HunyuanVideo euler")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpus", default="", help="GPU indices, e.g. 0,1,2,3 (default: all)")
    p.add_argument("--ranks", type=int, default=1, help="number of CPU ranks (device cpu)")
    p.add_argument("--ulysses", default="auto")
    p.add_argument("--ring", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--attention", default="sdpa", choices=["auto", "sdpa", "flash_attn", "math"])
    p.add_argument("--threads-per-rank", type=int, default=0)
    p.add_argument("--cfg-parallel", action="store_true",
                   help="run the conditional and unconditional passes on the two halves of the ranks")
    p.add_argument("--shard-weights", default="auto", choices=["auto", "off", "on"],
                   help="FSDP weight sharding of the DiT and UMT5 (auto: when one device's memory is short)")
    p.add_argument("--vae-split", default="on", choices=["on", "off"],
                   help="split the VAE decode across the ranks (exact)")
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
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/wan21_t2v_usp_api.json)")
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

"""One-GPU check, in a single run: are the attention kernels right on this device, and how fast
is one Wan-1.3B-size step at 480p with each attention backend, ours vs stock diffusers?

    python benchmarks/gpu_check.py                    # on a CUDA/ROCm machine (H100/H200 class)
    python benchmarks/gpu_check.py --device cpu --small   # smoke test of the script itself

1. Kernels against an fp64 reference: attention and its log-sum-exp (what Ring merges) for every
   backend and dtype available, plus a 4-chunk ring merge and a padded last chunk done in one
   process with the same merge code the ranks use.
2. Timing: one DiT forward of a Wan 2.1 1.3B-shaped model (random weights, bf16) on 480p x 81
   frames (32,760 tokens); a sampler step at cfg > 1 is two of them. Ours at world size 1 for
   each backend, and stock diffusers WanTransformer3DModel, interleaved, medians.
3. fp8 weights (formats/fp8.py): the same forward with the blocks' Linear weights stored in fp8 and
   cast layer by layer, against those weights dequantized to bf16: error, time ratio, bytes ratio.
4. Fitting 24-48 GB cards: the memory pre-flight's prediction per rank for Wan 2.1 14B and Wan 2.2
   A14B from their released configs (no file needed), bf16 and fp8 files, sharded over 2 and 4 ranks:
   the DiT load's peak (for A14B one expert on the GPU, the other in host memory: placement offload)
   plus one step's activations at 832x480x81, cfg 5 (the planner's memory), against 24 and 48 GB cards.
   The text encoder (placement offload: off the GPU while sampling) and the VAE are not counted.
5. Memory measured on this GPU, through the engine (one rank, bf16): a step's activation peak
   (torch.cuda.max_memory_allocated minus what was allocated before) beside the pre-flight's prediction
   at three sizes (a Wan 1.3B-wide DiT of 4 blocks, written to a temporary file); and the device memory
   two such experts hold with placement keep against offload (the idle one in host memory).
6. Kernels and compile (#22), timed on Wan 1.3B- and 14B-shaped DiTs of 2 blocks (random bf16 weights,
   world size 1) at 480p and 720p x 81 frames (32,760 / 75,600 tokens): one forward per attention backend
   (sdpa, flash_attn, sageattention: each imported if installed, else a line says it is skipped; nothing is
   downloaded), the fastest eager one with every block compiled (inductor), and fp8 weights cast per layer
   against fp8 compute (torch._scaled_mm, GPUs of capability >= 8.9), with errors against sdpa / the cast
   path. A step is estimated as the per-block time x the model's layers x 2 (cfg). Each measurement is
   skipped, with a line, when the time left (--budget-s, the whole run) is too short.
7. Our world-size-1 forward against ComfyUI's own WanModel (comfy.ldm.wan) with the same weights on the
   same GPU, when COMFYUI_DIR names a ComfyUI checkout (else a line says it is skipped).
8. Ranks sharing this device (ranks.py): 2 and 4 ranks on the one card, their collectives through gloo (NCCL
   refuses two ranks on one GPU), Ulysses, ring, both, and FSDP2, with sdpa and sageattention (where it imports):
   each N-rank bf16 output against the one-process bf16 output, within the one-process bf16-vs-fp32 difference;
   and the split Wan VAE decode (fp32) on 2 and 4 ranks against the whole decode.
The whole run stays under --budget-s (default 290 s, one call of at most 5 minutes: sections 6 and 7
take what the others leave). Every section runs in try/except: an error is recorded and the run goes on.
The report is written after every section (--out, default benchmarks/results/gpu_check_latest.json);
a short table is printed last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import ModuleType

import torch

from . import comfyui, fit, fp8, kernel_timing, kernels, memory, ranks, step
from .common import Context

# In run order: (report key, section, whether its result is a list of rows: a list section that raises keeps the
# rows it already put in the report, or [], a dict section gets {"error": ...}).
SECTIONS: tuple[tuple[str, ModuleType, bool], ...] = (
    ("kernels", kernels, True), ("step", step, True), ("fp8", fp8, False), ("fit", fit, True),
    ("memory", memory, False), ("ranks", ranks, True), ("kernel_timing", kernel_timing, True),
    ("comfyui", comfyui, False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "gpu_check_latest.json",
                        help="the report, written after every section (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="the whole run's time; sections 6-7 skip what would pass it (default: %(default)s)")
    return parser.parse_args(argv)


def run_section(ctx: Context, key: str, section: ModuleType, rows: bool) -> None:
    """section.run(ctx) into the report under key; an error is printed and recorded, and the run goes on."""
    try:
        ctx.report[key] = section.run(ctx)
    except Exception as exc:  # report, do not lose the rest of the run
        print(f"section {key} failed: {type(exc).__name__}: {exc}")
        ctx.report[key] = ctx.report.get(key, []) if rows else {"error": f"{type(exc).__name__}: {exc}"}
        ctx.report.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
    ctx.save()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA/ROCm device: run with --device cpu --small to check the script itself")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ctx = Context(device, args.small, args.repeats, args.out, args.budget_s)
    ctx.report.update(device=name, torch=torch.__version__, budget_s=args.budget_s)
    for key, section, rows in SECTIONS:
        run_section(ctx, key, section, rows)
    print(f"device: {name}, torch {torch.__version__}")
    for key, section, _ in SECTIONS:
        section.show(ctx.report[key], ctx)
    ctx.save()
    print(f"wall {ctx.report['wall_s']:.0f} s (budget {args.budget_s:.0f} s), report in {args.out}")


if __name__ == "__main__":
    main()

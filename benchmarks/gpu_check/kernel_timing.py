"""Section 6: kernels and compile (#22), timed on Wan 1.3B- and 14B-shaped DiTs of KERNEL_LAYERS blocks (random
bf16 weights, world size 1) at 480p and 720p x 81 frames (32,760 / 75,600 tokens): one forward per attention
backend (sdpa, flash_attn, sageattention: each where it imports, else a line says it is skipped; nothing is
downloaded), the fastest eager one with every block compiled (inductor; aot_eager with --small), and fp8 weights
cast per layer against fp8 compute (torch._scaled_mm, GPUs of capability >= 8.9), with errors against sdpa / the
cast path. A step is estimated as the per-block time x the model's layers x 2 (cfg). Each measurement is skipped,
with a line, when the time left in the run's budget is too short for it.

Report key "kernel_timing": one row per measurement, appended (and the report saved) as it is measured, so a
run cut short or a section that raises keeps the rows it has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .common import KERNEL_LAYERS, Context, backends_available, rel, timed, wan_setup

KERNEL_MODELS = {"Wan 1.3B": "wan2.1-t2v-1.3b", "Wan 14B": "wan2.1-t2v-14b"}
KERNEL_SIZES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # 81 frames: 32,760 / 75,600 tokens


@dataclass
class _Shape:
    """One model shape at one size: what its measurements share. `outs` holds each kind's output, the
    reference for the kinds measured after it."""

    label: str  # "Wan 1.3B"
    size: str  # "480p"
    tokens: int
    layers: int  # the full model's, for the step estimate
    config: dict  # the diffusers config, cut to KERNEL_LAYERS blocks
    dtype: torch.dtype
    inputs: tuple
    source: torch.nn.Module  # the weights every measurement loads
    outs: dict[str, torch.Tensor] = field(default_factory=dict)


def run(ctx: Context) -> list[dict]:
    """Per model shape and size: each backend eager, the fastest compiled, fp8 weights cast vs fp8 compute."""
    from usp_video.distributed.formats import fp8
    from usp_video.distributed.parallel.compile import check_compile

    rows = ctx.live_rows("kernel_timing")
    compile_mode = "aot_eager" if ctx.small else "on"  # small: the script's own check, no code generation
    try:
        check_compile(compile_mode, ctx.device)
    except ValueError as exc:
        print(f"skipped: compile: {exc}")
        compile_mode = None
    fp8_unavailable = fp8.fp8_compute_unavailable(ctx.device) if ctx.device.type == "cuda" else None  # CPU: runs
    if fp8_unavailable:
        print(f"skipped: fp8 compute: {fp8_unavailable}")
    backends = [b for b in backends_available(ctx) if b != "math"]
    sizes = {"small": (3, 8, 12)} if ctx.small else KERNEL_SIZES
    for label, variant in KERNEL_MODELS.items():
        for size, latent in sizes.items():
            shape = _setup(ctx, label, variant, size, latent)
            base_s = 15 if ctx.small else (20 if "720" in size or "14B" in label else 8)
            for backend in backends:
                _measure(ctx, rows, shape, backend, backend, base_s, reference="sdpa")
            measured = [r for r in rows if r["model"] == label and r["size"] == size and "forward_s" in r]
            if compile_mode and measured:
                fastest = min(measured, key=lambda r: r["forward_s"])["backend"]
                _measure(ctx, rows, shape, f"{fastest} compiled", fastest, base_s + 60, compile_mode=compile_mode,
                         reference=fastest)
            if not fp8_unavailable:
                _measure(ctx, rows, shape, "fp8 weights, cast", "sdpa", base_s, weights="fp8 cast")
                _measure(ctx, rows, shape, "fp8 compute", "sdpa", base_s, weights="fp8 compute",
                         reference="fp8 weights, cast")
    return rows


def _setup(ctx: Context, label: str, variant: str, size: str, latent: tuple[int, int, int]) -> _Shape:
    """The inputs and the source weights of one model shape at one size; the block weights fp8-representable,
    so that fp8 storage is exact and the fp8 rows differ only by the compute."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    config, dtype, inputs = wan_setup(ctx.small, ctx.device, variant, latent)
    config = dict(config, num_layers=KERNEL_LAYERS)
    torch.manual_seed(0)
    source = WanTransformer3DModel(**config).eval()
    for name, module in source.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
    tokens = latent[0] * latent[1] * latent[2] // 4
    return _Shape(label, size, tokens, WAN_VARIANTS[variant]["num_layers"], config, dtype, inputs, source)


def _measure(ctx: Context, rows: list[dict], shape: _Shape, kind: str, backend: str, need_s: float,
             compile_mode: str | None = None, weights: str = "bf16", reference: str | None = None) -> None:
    """One row: the model built for (backend, weights, compile), timed, its error against `reference`'s output;
    skipped when need_s would pass the deadline. The report is saved after each measured row."""
    from usp_video.distributed.parallel.compile import BACKEND_OF

    row = {"model": shape.label, "size": shape.size, "tokens": shape.tokens, "kind": kind, "backend": backend,
           "compile": BACKEND_OF[compile_mode] if compile_mode else "off", "weights": weights}
    if time.monotonic() + need_s > ctx.deadline:
        print(f"skipped (time budget): {shape.label} {shape.size} {kind}")
        row["skipped"] = "time budget"
        rows.append(row)
        return
    model = None
    try:
        model = _build(ctx, shape, backend, weights, compile_mode, row)
        seconds, out, first = timed(model, shape.inputs, ctx.device, ctx.repeats)
        shape.outs[kind] = out
        per_block = seconds / KERNEL_LAYERS
        row.update(forward_s=seconds, first_forward_s=first, per_block_s=per_block,
                   step_s_estimate=per_block * shape.layers * 2)
        if reference in shape.outs:
            row[f"rel_err_vs_{reference}"] = rel(out, shape.outs[reference])
    except Exception as exc:  # report, go on with the next measurement
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append(row)
    ctx.save()


def _build(ctx: Context, shape: _Shape, backend: str, weights: str, compile_mode: str | None,
           row: dict) -> torch.nn.Module:
    """A fresh model with the shape's weights: bf16, fp8 cast per layer or fp8 compute (the number of layers
    computing in fp8 goes into row), parallelized at world size 1 with backend, its blocks compiled on request."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats import fp8
    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.compile import compile_blocks
    from usp_video.distributed.parallel.mesh import SequenceParallel

    model = cast_model(WanTransformer3DModel(**shape.config).eval(), shape.dtype)
    model.load_state_dict(shape.source.state_dict())
    if weights != "bf16":
        markers = {f"{n}.weight": torch.ones(m.weight.shape[0]) for n, m in model.named_modules()
                   if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
        fp8.keep_fp8(model, markers, ("blocks.",))
        if weights == "fp8 compute":
            row["fp8_compute_layers"] = fp8.use_scaled_mm(model)
    model = parallelize_wan(model.to(ctx.device), SequenceParallel(), backend).module
    if compile_mode:
        torch._dynamo.reset()  # a fresh cache per shape: no recompile limit reached
        compile_blocks(model.blocks, compile_mode)
    return model


def show(rows: list[dict], ctx: Context) -> None:
    print(f"kernels and compile: {KERNEL_LAYERS}-block Wan DiTs, world size 1; step = per block x layers x 2 (cfg)")
    print(f"{'model':<10}{'size':<7}{'kind':<24}{'compile':<10}{'forward s':>10}{'1st s':>8}{'step s':>9}"
          f"{'rel err':>10}")
    for r in rows:
        head = f"{r['model']:<10}{r['size']:<7}{r['kind']:<24}{r['compile']:<10}"
        if "forward_s" not in r:
            print(head + f"  {r.get('error', r.get('skipped'))}")
            continue
        err = next((v for k, v in r.items() if k.startswith("rel_err_vs_")), None)
        print(head + f"{r['forward_s']:>10.3f}{r['first_forward_s']:>8.1f}{r['step_s_estimate']:>9.2f}"
              + (f"{err:>10.1e}" if err is not None else f"{'-':>10}"))

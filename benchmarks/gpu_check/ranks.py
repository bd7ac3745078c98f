"""Section 8: 2 and 4 ranks sharing this one device (a lent card is one GPU). NCCL refuses two ranks on one GPU
("Duplicate GPU detected"), so these ranks' collectives go through gloo (its CUDA all-to-all and all-gather copy
through host memory): the times say nothing about a real multi-GPU speed-up, the errors say whether the CUDA
paths are exact. In the smoke run (--small, CI) one case runs: 2 ranks, Ulysses 2 with FSDP2 and the split VAE. For each case, a Wan 1.3B-width DiT of 2 blocks (bf16; tiny and fp32 with --small) at 480p x 81
frames: the N-rank output against the one-process bf16 output (ours, world size 1), which must stay within the
one-process bf16-vs-fp32 difference (with --small, fp32: within 1e-5). Cases: Ulysses 2 and 4, ring 2, Ulysses x
ring 2x2, FSDP2 weight sharding on 2 ranks, the split Wan VAE decode on 2 and 4 ranks (fp32, against the whole
decode in one process: within 1e-5) (where gloo allows it: an error is a row), each with sdpa and with
sageattention where it imports (ring 1 only: it returns no log-sum-exp).

Report key "ranks": one row per case.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import KERNEL_LAYERS, Context, backends_available, rel, timed, wan_setup

TARGET = f"{Path(__file__).with_name('rank_targets.py')}:shared_device_forward"
# ranks, ulysses, ring, fsdp, the split VAE decode too (with sdpa)
CASES = ((2, 2, 1, False, True), (4, 4, 1, False, True), (2, 1, 2, False, False), (4, 2, 2, False, False),
         (2, 2, 1, True, False))
SMALL_CASES = ((2, 2, 1, True, True),)  # the smoke run (CI): one spawn of 2 ranks, Ulysses with FSDP2, the split VAE


def references(ctx: Context) -> tuple[torch.Tensor, float, float]:
    """(the one-process output in the section's dtype, its error against fp32, its forward time)."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(ctx.small, ctx.device)
    if not ctx.small:
        config["num_layers"] = KERNEL_LAYERS
    outs = {}
    for name, as_dtype in (("run", dtype), ("fp32", torch.float32))[:1 if dtype == torch.float32 else 2]:
        torch.manual_seed(0)
        model = parallelize_wan(cast_model(WanTransformer3DModel(**config), as_dtype).to(ctx.device).eval(),
                                SequenceParallel()).module
        cast_inputs = tuple(t.to(as_dtype) if t.is_floating_point() and t.dim() > 1 else t for t in inputs)
        seconds, outs[name], _ = timed(model, cast_inputs, ctx.device, ctx.repeats)
        outs[name + "_s"] = seconds
        del model
    return outs["run"].float().cpu(), rel(outs["run"], outs.get("fp32", outs["run"])), outs["run_s"]


def one_process_decode(ctx: Context) -> torch.Tensor:
    """The section's latent decoded whole in this process (the split decode's reference)."""
    import importlib.util

    from usp_video.distributed.models.wan21.vae import decode

    spec = importlib.util.spec_from_file_location("rank_targets", TARGET.rsplit(":", 1)[0])
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    vae, latent = targets.vae_setup(ctx.small, ctx.device)
    with torch.no_grad():
        return decode(vae, latent, None)


def run(ctx: Context) -> list[dict]:
    from usp_video.distributed.testing.spawn import run_ranks

    rows = ctx.live_rows("ranks")
    reference, bf16_vs_fp32, one_rank_s = references(ctx)
    bound = 1e-5 if ctx.small else bf16_vs_fp32
    backends = [b for b in backends_available(ctx) if b in ("sdpa", "sageattention")]
    vae_reference = None
    for ranks, ulysses, ring, fsdp, vae in (SMALL_CASES if ctx.small else CASES):
        for backend in backends:
            if backend == "sageattention" and ring > 1:
                continue
            if time.monotonic() > ctx.deadline - 30:
                print(f"skipped: {ranks} ranks, ulysses {ulysses} x ring {ring}, {backend}: the time budget is spent")
                continue
            vae = vae and backend == "sdpa"
            if vae and vae_reference is None:
                vae_reference = one_process_decode(ctx)
            row = {"ranks": ranks, "ulysses": ulysses, "ring": ring, "backend": backend, "fsdp": fsdp,
                   "one_rank_forward_s": one_rank_s, "bf16_vs_fp32_one_rank": bf16_vs_fp32, "bound": bound}
            try:
                outs = run_ranks(TARGET, ranks, dict(device=str(ctx.device), small=ctx.small, ulysses=ulysses,
                                                     ring=ring, backend=backend, fsdp=fsdp, repeats=ctx.repeats,
                                                     vae=vae),
                                 timeout=240.0)
                row["rel_err_vs_one_rank"] = max(rel(o["out"], reference) for o in outs)
                row["forward_s"] = max(float(o["seconds"]) for o in outs)
                row["within"] = row["rel_err_vs_one_rank"] <= bound
                if vae:  # fp32 both sides: the split is exact up to float rounding
                    row["vae_split_rel_err"] = rel(outs[0]["frames"], vae_reference)
                    row["within"] = row["within"] and row["vae_split_rel_err"] <= 1e-5
            except Exception as exc:  # a gloo limitation on CUDA tensors, say: recorded, the run goes on
                row["error"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
            rows.append(row)
            ctx.save()
    return rows


def show(rows: list[dict], ctx: Context) -> None:
    print("ranks sharing one device (gloo collectives): N ranks vs one process, "
          + ("fp32, bound 1e-5" if ctx.small else "bf16, bound = the one-process bf16-vs-fp32 difference"))
    print(f"{'case':<34}{'rel err':>10}{'bound':>10}{'within':>8}{'forward s':>11}{'1 rank s':>10}{'VAE split err':>15}")
    for r in rows:
        case = f"{r['ranks']} ranks, u{r['ulysses']} x r{r['ring']}, {r['backend']}{', fsdp2' if r['fsdp'] else ''}"
        if "error" in r:
            print(f"{case:<34}  error: {r['error'][:200]}")
            continue
        print(f"{case:<34}{r['rel_err_vs_one_rank']:>10.1e}{r['bound']:>10.1e}{str(r['within']):>8}"
              f"{r['forward_s']:>11.3f}{r['one_rank_forward_s']:>10.3f}"
              + (f"{r['vae_split_rel_err']:>15.1e}" if "vae_split_rel_err" in r else f"{'-':>15}"))

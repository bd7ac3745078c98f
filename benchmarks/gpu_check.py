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
3. fp8 weights (models/fp8.py): the same forward with the blocks' Linear weights stored in fp8 and
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
The whole run stays under --budget-s (default 290 s, one call of at most 5 minutes: sections 6 and 7
take what the others leave). Every section runs in try/except: an error is recorded and the run goes on.
The report is written after every section (--out, default benchmarks/results/gpu_check_latest.json);
a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


_SKIPS_SAID: set[str] = set()


def backends_available(device: torch.device) -> list[str]:
    """sdpa and math, and each third-party kernel whose package imports here (else one line says it is skipped)."""
    import importlib

    from usp_video.distributed.parallel.kernels import PACKAGES

    names = ["sdpa", "math"]
    for backend, package in PACKAGES.items():
        why = None
        if device.type != "cuda":
            why = "needs a CUDA GPU"
        else:
            try:
                importlib.import_module(backend)
                names.append(backend)
            except Exception as exc:  # not installed, or built for another torch/CUDA
                why = f"{package} does not import ({type(exc).__name__}: {exc}); no wheel is carried, nothing is downloaded"
        if why and backend not in _SKIPS_SAID:
            print(f"skipped: attention '{backend}': {why}")
            _SKIPS_SAID.add(backend)
    return names


def check_kernels(device: torch.device, small: bool) -> list[dict]:
    from yunchang.ring.utils import update_out_and_lse

    from usp_video.distributed.parallel.kernels import HALF_ONLY, NO_LSE
    from usp_video.distributed.parallel.usp_attention import _valid_in_chunk, attention, attention_with_lse

    seq, heads, dim = (300, 4, 32) if small else (4096, 12, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    q64, k64, v64 = (torch.randn(1, seq, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    ref_out, ref_lse = attention_with_lse(q64, k64, v64, "math")
    rows = []
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16])
    for backend in backends_available(device):
        for dtype in dtypes:
            if backend in HALF_ONLY and dtype == torch.float32:
                continue
            q, k, v = (t.to(device, dtype) for t in (q64, k64, v64))
            row = {"backend": backend, "dtype": str(dtype).removeprefix("torch.")}
            if backend in NO_LSE:  # no log-sum-exp, never merged: the plain output only
                try:
                    row["plain_rel_err"] = rel(attention(q, k, v, backend), ref_out)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            try:
                out, lse = attention_with_lse(q, k, v, backend)
                row["out_rel_err"] = rel(out, ref_out)
                row["lse_max_abs_err"] = float((lse.double().cpu() - ref_lse).abs().max())
                row["plain_rel_err"] = rel(attention(q, k, v, backend), ref_out)
                # ring merge of 4 chunks, the last one padded: what the ranks do, in one process
                chunks, valid_len = 4, seq - 3
                chunk_len = -(-seq // chunks)
                pad = chunk_len * chunks - seq
                kp = torch.cat([k, k.new_zeros(1, pad, heads, dim)], 1)
                vp = torch.cat([v, v.new_zeros(1, pad, heads, dim)], 1)
                merged = lse_acc = None
                for c in range(chunks):
                    n = _valid_in_chunk(c, chunk_len, valid_len)
                    if n:
                        kc = kp[:, c * chunk_len: c * chunk_len + n]
                        vc = vp[:, c * chunk_len: c * chunk_len + n]
                        block_out, block_lse = attention_with_lse(q, kc, vc, backend)
                        merged, lse_acc = update_out_and_lse(merged, lse_acc, block_out, block_lse)
                ref_valid, _ = attention_with_lse(q64, k64[:, :valid_len], v64[:, :valid_len], "math")
                row["ring_merge_rel_err"] = rel(merged, ref_valid)
            except Exception as exc:  # report, do not stop the run
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def wan_setup(small: bool, device: torch.device, variant: str = "wan2.1-t2v-1.3b",
              shape: tuple[int, int, int] = (21, 60, 104)):
    """A Wan 2.1 config (1.3B-shaped by default) and one forward's inputs (480p x 81 frames by default, bf16;
    tiny with small)."""
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    config, dtype = dict(WAN_VARIANTS[variant]), torch.bfloat16  # (21, 60, 104) -> 21 x 30 x 52 = 32,760 tokens
    if small:
        config.update(num_layers=2, attention_head_dim=16, ffn_dim=256, text_dim=64)
        shape, dtype = (3, 8, 12), torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 16, *shape, generator=g).to(device, dtype)
    ctx = torch.randn(1, 512, config["text_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    return config, dtype, (x, t, ctx)


def time_forwards(models: dict, inputs: tuple, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """One warm-up forward per model (its output kept), then `repeats` interleaved timed forwards:
    (median seconds per model, output per model)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, outs = {name: [] for name in models}, {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            outs[name] = model(*inputs, return_dict=False)[0]
        for _ in range(repeats):  # interleaved
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(*inputs, return_dict=False)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def time_step(device: torch.device, small: bool, repeats: int) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(small, device)
    torch.manual_seed(0)
    stock = cast_model(WanTransformer3DModel(**config), dtype).to(device).eval()
    models = {"stock diffusers": stock}
    for backend in backends_available(device):
        if backend == "math" and not small:
            continue  # the fp32 reference kernel is for correctness, far too slow and large at 32k tokens
        ours = WanTransformer3DModel(**config).eval()
        ours.load_state_dict(stock.state_dict())
        models[f"ours ({backend})"] = parallelize_wan(cast_model(ours, dtype).to(device), SequenceParallel(), backend)
    seconds, outs = time_forwards(models, inputs, device, repeats)
    stock_s = seconds["stock diffusers"]
    return [{"model": name, "forward_s": seconds[name], "step_s_cfg": 2 * seconds[name],
             "vs_stock": seconds[name] / stock_s, "rel_err_vs_stock": rel(outs[name], outs["stock diffusers"])}
            for name in models]


def check_fp8(device: torch.device, small: bool, repeats: int) -> dict:
    """fp8 storage vs the same (fp8-representable) weights in the compute dtype: one forward each."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models import fp8
    from usp_video.distributed.models.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.fsdp import parameter_bytes
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(small, device)
    torch.manual_seed(0)
    source = WanTransformer3DModel(**config).eval()
    markers = {}
    for name, module in source.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):  # make the weights fp8 values
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
            markers[f"{name}.weight"] = torch.ones(module.weight.shape[0])
    models = {}
    for kind in ("dequantized", "fp8"):
        model = cast_model(WanTransformer3DModel(**config).eval(), dtype)
        model.load_state_dict(source.state_dict())
        if kind == "fp8":
            fp8.keep_fp8(model, markers, ("blocks.",))
        models[kind] = parallelize_wan(model.to(device), SequenceParallel(), "sdpa")
    seconds, outs = time_forwards(models, inputs, device, repeats)
    return {"dtype": str(dtype), "fp8_forward_s": seconds["fp8"], "dequantized_forward_s": seconds["dequantized"],
            "time_ratio": seconds["fp8"] / seconds["dequantized"],
            "bytes_ratio": parameter_bytes(models["fp8"]) / parameter_bytes(models["dequantized"]),
            "rel_err": rel(outs["fp8"], outs["dequantized"])}


def predict_fit() -> list[dict]:
    """The pre-flight's per-rank prediction for the 14B models on 2 and 4 ranks (bf16 compute): the load's
    peak of the expert on the GPU plus the planner's activations of a step at 832x480x81, cfg 5."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed import planner
    from usp_video.distributed.models.streamed import peak_bytes
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_VARIANTS["wan2.1-t2v-14b"])
    rows = []
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    for file_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        # an fp8 file (ComfyUI's *_fp8_e4m3fn): the blocks' 2-D weights in fp8, the rest in bf16
        tensors = {name: (file_dtype if len(shape) == 2 and name.startswith("blocks.") else torch.bfloat16, shape)
                   for name, shape in shapes.items()}
        for key, label in (("wan-14b", "Wan 2.1 14B"), ("wan2.2-a14b", "Wan 2.2 A14B (offload)")):
            for ranks in (2, 4):
                weights = peak_bytes(tensors, torch.bfloat16, ranks, ("blocks.",))
                plan = planner.recommend(planner.candidates(planner.MODELS[key], ranks, 32760, planner.LINKS["pcie"],
                                                            5.0, shard=True))
                per_rank = weights / 2**30 + plan.activation_gb * 1e9 / 2**30
                rows.append({"model": label, "file": "fp8" if file_dtype != torch.bfloat16 else "bf16",
                             "ranks": ranks, "weights_gib": weights / 2**30,
                             "activations_gib": plan.activation_gb * 1e9 / 2**30, "gib_per_rank": per_rank,
                             "gib_left_of_24": 24 - per_rank, "gib_left_of_48": 48 - per_rank})
    return rows


def measure_memory(device: torch.device, small: bool) -> dict:
    """A step's measured activation peak against the prediction at three sizes, and placement keep
    against offload for two experts: through the Engine, one rank, no process group."""
    import tempfile

    from activation_bench import write_model  # beside this script

    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest

    config, dtype, _ = wan_setup(small, device)
    config = dict(config, num_layers=2 if small else 4)
    sizes = [(3, 8, 12), (3, 16, 12), (5, 16, 16)] if small else [(11, 60, 104), (21, 60, 104), (21, 90, 160)]
    group = dict(ranks=1, device=device.type, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # two experts of the same shape (different weights)
        paths = [str(write_model(config, Path(tmp, f"expert{i}.safetensors"), seed=i)) for i in range(2)]
        engine = Engine(GroupConfig(**group, placement="keep"))
        model = engine.dit(paths[0])
        g = torch.Generator().manual_seed(0)
        cond = {"tokens": torch.randn(1, 512, config["text_dim"], generator=g)}
        for shape in sizes:
            request = SampleRequest(experts=[paths[0]], positive=cond, negative=cond, latent=torch.zeros(1, 16, *shape),
                                    seed=1, steps=1, cfg=5.0, shift=5.0, sampler="euler")
            predicted = engine.activation_bytes(model.usp_family, [model], tuple(request.latent.shape), 512, passes=2)
            sync()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            before = allocated()
            engine.sample(request)
            sync()
            peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
            rows.append({"latent": list(shape), "tokens": shape[0] * shape[1] * shape[2] // 4,
                         "measured_gib": peak / 2**30, "predicted_gib": predicted / 2**30,
                         "ratio": predicted / peak if peak else None})
        del engine, model
        held = {}
        for placement in ("keep", "offload"):
            engine = Engine(GroupConfig(**group, placement=placement))
            before = allocated()
            engine.dit_info(paths)  # both experts loaded, the first to run on the device
            sync()
            held[placement] = (allocated() - before) / 2**30
            del engine
    return {"activations": rows, "experts_held_gib": held}


# -- 6. kernels and compile (#22) -------------------------------------------------------------------------------------

KERNEL_MODELS = {"Wan 1.3B": "wan2.1-t2v-1.3b", "Wan 14B": "wan2.1-t2v-14b"}
KERNEL_SIZES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # 81 frames: 32,760 / 75,600 tokens
KERNEL_LAYERS = 2  # blocks per timed DiT (the step estimate scales the per-block time to the model's layers)


def _timed(model, inputs: tuple, device: torch.device, repeats: int) -> tuple[float, torch.Tensor, float]:
    """(median seconds of `repeats` forwards, the output, seconds of the first forward: warm-up / compilation)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(*inputs, return_dict=False)[0]
        sync()
        first = time.perf_counter() - start
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(*inputs, return_dict=False)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times), out, first


def time_kernels_and_compile(device: torch.device, small: bool, repeats: int, deadline: float,
                             rows: list[dict], save: callable) -> list[dict]:
    """Per model shape and size: each backend eager, the fastest compiled, fp8 weights cast vs fp8 compute.
    Rows are appended (and the report saved) as they are measured; one that would pass the deadline is skipped."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models import fp8
    from usp_video.distributed.models.checkpoint import cast_model
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS, parallelize_wan
    from usp_video.distributed.parallel.compile import BACKEND_OF, check_compile, compile_blocks
    from usp_video.distributed.parallel.mesh import SequenceParallel

    compile_mode = "aot_eager" if small else "on"  # small: the script's own check, no code generation
    try:
        check_compile(compile_mode, device)
    except ValueError as exc:
        print(f"skipped: compile: {exc}")
        compile_mode = None
    fp8_unavailable = fp8.fp8_compute_unavailable(device) if device.type == "cuda" else None  # CPU: runs (small)
    if fp8_unavailable:
        print(f"skipped: fp8 compute: {fp8_unavailable}")
    backends = [b for b in backends_available(device) if b != "math"]
    sizes = {"small": (3, 8, 12)} if small else KERNEL_SIZES
    for label, variant in KERNEL_MODELS.items():
        for size, shape in sizes.items():
            config, dtype, inputs = wan_setup(small, device, variant, shape)
            layers = WAN_VARIANTS[variant]["num_layers"]
            config = dict(config, num_layers=KERNEL_LAYERS)
            torch.manual_seed(0)
            source = WanTransformer3DModel(**config).eval()
            for name, module in source.named_modules():  # fp8-representable block weights: fp8 storage is exact
                if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
                    module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
            tokens = shape[0] * shape[1] * shape[2] // 4
            outs: dict[str, torch.Tensor] = {}

            def measure(kind: str, backend: str, need_s: float, compiled: bool = False, weights: str = "bf16",
                        reference: str | None = None) -> None:
                row = {"model": label, "size": size, "tokens": tokens, "kind": kind, "backend": backend,
                       "compile": BACKEND_OF[compile_mode] if compiled else "off", "weights": weights}
                if time.monotonic() + need_s > deadline:
                    print(f"skipped (time budget): {label} {size} {kind}")
                    row["skipped"] = "time budget"
                    rows.append(row)
                    return
                model = None
                try:
                    model = cast_model(WanTransformer3DModel(**config).eval(), dtype)
                    model.load_state_dict(source.state_dict())
                    if weights != "bf16":
                        markers = {f"{n}.weight": torch.ones(m.weight.shape[0]) for n, m in model.named_modules()
                                   if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
                        fp8.keep_fp8(model, markers, ("blocks.",))
                        if weights == "fp8 compute":
                            row["fp8_compute_layers"] = fp8.use_scaled_mm(model)
                    model = parallelize_wan(model.to(device), SequenceParallel(), backend)
                    if compiled:
                        torch._dynamo.reset()  # a fresh cache per shape: no recompile limit reached
                        compile_blocks(model.blocks, compile_mode)
                    seconds, out, first = _timed(model, inputs, device, repeats)
                    outs[kind] = out
                    per_block = seconds / KERNEL_LAYERS
                    row.update(forward_s=seconds, first_forward_s=first, per_block_s=per_block,
                               step_s_estimate=per_block * layers * 2)
                    if reference in outs:
                        row[f"rel_err_vs_{reference}"] = rel(out, outs[reference])
                except Exception as exc:  # report, go on with the next measurement
                    row["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                save()

            base_s = 15 if small else (20 if "720" in size or "14B" in label else 8)
            for backend in backends:
                measure(backend, backend, base_s, reference="sdpa")
            timed = [r for r in rows if r["model"] == label and r["size"] == size and "forward_s" in r]
            if compile_mode and timed:
                fastest = min(timed, key=lambda r: r["forward_s"])["backend"]
                measure(f"{fastest} compiled", fastest, base_s + 60, compiled=True, reference=fastest)
            if not fp8_unavailable:
                measure("fp8 weights, cast", "sdpa", base_s, weights="fp8 cast")
                measure("fp8 compute", "sdpa", base_s, weights="fp8 compute", reference="fp8 weights, cast")
    return rows


# -- 7. ours against ComfyUI's own Wan model -------------------------------------------------------------------------

def compare_comfyui(device: torch.device, small: bool, repeats: int, deadline: float) -> dict:
    """Our world-size-1 forward vs ComfyUI's WanModel (COMFYUI_DIR) on the same weights and inputs, bf16
    (fp32 with small), Wan 1.3B-shaped at 480p with KERNEL_LAYERS blocks: time ratio and output error."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("skipped: ComfyUI's own Wan model: COMFYUI_DIR is not set (a ComfyUI checkout, e.g. ../shared/ComfyUI)")
        return {"skipped": "COMFYUI_DIR not set"}
    if time.monotonic() + 30 > deadline:
        print("skipped (time budget): ComfyUI's own Wan model")
        return {"skipped": "time budget"}
    from activation_bench import write_model  # beside this script

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from comfyui_reference.common import wan_unet_config

    sys.path.insert(0, comfy_dir)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = device.type == "cpu"
        import comfy.supported_models
    except ModuleNotFoundError as exc:  # ComfyUI's own requirements (einops, ...) are not in this Python
        print(f"skipped: ComfyUI's own Wan model: its requirements are not installed in this Python ({exc}); run "
              f"this script with ComfyUI's Python, or pip install -r {comfy_dir}/requirements.txt")
        return {"skipped": f"ComfyUI's requirements missing: {exc}"}
    from safetensors.torch import load_file

    from usp_video.distributed.models.wan21.dit import load_wan_transformer, parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    config, dtype, inputs = wan_setup(small, device)
    config = dict(config, num_layers=KERNEL_LAYERS)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(config, Path(tmp, "wan.safetensors"))
        model_config = comfy.supported_models.WAN21_T2V(wan_unet_config(config))
        model_config.set_inference_dtype(dtype, None)
        comfy_model = model_config.get_model({}).diffusion_model
        comfy_model.load_state_dict(load_file(str(path)), strict=True)
        comfy_model = comfy_model.to(device, dtype).eval()
        ours = parallelize_wan(load_wan_transformer(path, dtype, device), SequenceParallel(), "sdpa").eval()
    x, t, ctx = inputs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"ours": [], "comfyui": []}
    with torch.no_grad():
        out_ours, out_comfy = ours(x, t, ctx, return_dict=False)[0], comfy_model(x, t, ctx)  # warm-up
        for _ in range(repeats):  # interleaved
            for name, run in (("ours", lambda: ours(x, t, ctx, return_dict=False)),
                              ("comfyui", lambda: comfy_model(x, t, ctx))):
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
    ours_s, comfy_s = statistics.median(times["ours"]), statistics.median(times["comfyui"])
    return {"ours_forward_s": ours_s, "comfyui_forward_s": comfy_s, "ours_vs_comfyui": ours_s / comfy_s,
            "rel_err": rel(out_ours, out_comfy), "layers": KERNEL_LAYERS, "dtype": str(dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check_latest.json",
                        help="the report, written after every section (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="the whole run's time; sections 6-7 skip what would pass it (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA/ROCm device: run with --device cpu --small to check the script itself")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.monotonic()
    deadline = started + args.budget_s
    report = {"device": name, "torch": torch.__version__, "budget_s": args.budget_s}

    def save() -> None:
        report["wall_s"] = time.monotonic() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    def section(key: str, run: callable, failed=None):
        try:
            report[key] = run()
        except Exception as exc:  # report, do not lose the rest of the run
            print(f"section {key} failed: {type(exc).__name__}: {exc}")
            report[key] = failed if failed is not None else {"error": f"{type(exc).__name__}: {exc}"}
            report.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        save()
        return report[key]

    kernels = section("kernels", lambda: check_kernels(device, args.small), failed=[])
    steps = section("step", lambda: time_step(device, args.small, args.repeats), failed=[])
    fp8_row = section("fp8", lambda: check_fp8(device, args.small, args.repeats))
    fit = section("fit", predict_fit, failed=[])
    measured = section("memory", lambda: measure_memory(device, args.small))
    report["kernel_timing"] = []
    timing = section("kernel_timing", lambda: time_kernels_and_compile(
        device, args.small, args.repeats, deadline, report["kernel_timing"], save), failed=report["kernel_timing"])
    comfy = section("comfyui", lambda: compare_comfyui(device, args.small, args.repeats, deadline))
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'kernel':<12}{'dtype':<10}{'out err':>10}{'lse err':>10}{'ring err':>10}")
    for r in kernels:
        if "error" in r:
            print(f"{r['backend']:<12}{r['dtype']:<10}  {r['error']}")
        elif "out_rel_err" not in r:
            print(f"{r['backend']:<12}{r['dtype']:<10}{r['plain_rel_err']:>10.1e}{'(no LSE)':>10}{'-':>10}")
        else:
            print(f"{r['backend']:<12}{r['dtype']:<10}{r['out_rel_err']:>10.1e}{r['lse_max_abs_err']:>10.1e}"
                  f"{r['ring_merge_rel_err']:>10.1e}")
    label = "Wan 1.3B-size forward, 480p x 81 frames (32,760 tokens), bf16" if not args.small else "small forward"
    print(label)
    print(f"{'model':<22}{'forward s':>10}{'step s (cfg)':>14}{'vs stock':>10}{'rel err':>10}")
    for r in steps:
        print(f"{r['model']:<22}{r['forward_s']:>10.3f}{r['step_s_cfg']:>14.3f}{r['vs_stock']:>10.3f}"
              f"{r['rel_err_vs_stock']:>10.1e}")
    if "error" in fp8_row:
        print(f"fp8 weights: {fp8_row['error']}")
    else:
        print(f"fp8 weights ({fp8_row['dtype']} compute): forward {fp8_row['fp8_forward_s']:.3f} s vs "
              f"{fp8_row['dequantized_forward_s']:.3f} s dequantized ({fp8_row['time_ratio']:.2f}x), parameter bytes "
              f"{fp8_row['bytes_ratio']:.2f}x, rel err {fp8_row['rel_err']:.1e}")
    print("pre-flight per rank, shard_weights on, bf16 compute: the DiT load's peak + a step's activations "
          "at 832x480x81, cfg 5")
    print(f"{'model':<26}{'file':>6}{'ranks':>7}{'weights':>9}{'activ.':>8}{'GiB/rank':>10}{'left of 24':>12}"
          f"{'left of 48':>12}")
    for r in fit:
        print(f"{r['model']:<26}{r['file']:>6}{r['ranks']:>7}{r['weights_gib']:>9.1f}{r['activations_gib']:>8.1f}"
              f"{r['gib_per_rank']:>10.1f}{r['gib_left_of_24']:>12.1f}{r['gib_left_of_48']:>12.1f}")
    if "error" in measured:
        print(f"memory on this device: {measured['error']}")
    else:
        print("a step's activations on this device (one rank, cfg 5): measured peak vs the pre-flight's prediction")
        for r in measured["activations"]:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            print(f"  latent {'x'.join(map(str, r['latent']))} ({r['tokens']} tokens): measured "
                  f"{r['measured_gib']:.2f} GiB, predicted {r['predicted_gib']:.2f} GiB, ratio {ratio}")
        held = measured["experts_held_gib"]
        print(f"two experts loaded: device memory {held['keep']:.2f} GiB with placement keep, "
              f"{held['offload']:.2f} GiB with offload")
    print(f"kernels and compile: {KERNEL_LAYERS}-block Wan DiTs, world size 1; step = per block x layers x 2 (cfg)")
    print(f"{'model':<10}{'size':<7}{'kind':<24}{'compile':<10}{'forward s':>10}{'1st s':>8}{'step s':>9}{'rel err':>10}")
    for r in timing:
        head = f"{r['model']:<10}{r['size']:<7}{r['kind']:<24}{r['compile']:<10}"
        if "forward_s" not in r:
            print(head + f"  {r.get('error', r.get('skipped'))}")
            continue
        err = next((v for k, v in r.items() if k.startswith("rel_err_vs_")), None)
        print(head + f"{r['forward_s']:>10.3f}{r['first_forward_s']:>8.1f}{r['step_s_estimate']:>9.2f}"
              + (f"{err:>10.1e}" if err is not None else f"{'-':>10}"))
    if "ours_forward_s" in comfy:
        print(f"ours vs ComfyUI's WanModel ({comfy['layers']} blocks, {comfy['dtype']}): {comfy['ours_forward_s']:.3f} s "
              f"vs {comfy['comfyui_forward_s']:.3f} s ({comfy['ours_vs_comfyui']:.3f}x), rel err {comfy['rel_err']:.1e}")
    else:
        print(f"ComfyUI's WanModel: {comfy.get('skipped', comfy.get('error'))}")
    save()
    print(f"wall {report['wall_s']:.0f} s (budget {args.budget_s:.0f} s), report in {args.out}")


if __name__ == "__main__":
    main()

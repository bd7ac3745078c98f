"""CPU benchmarks, measured side by side in one run; prints a table and writes it as JSON.

    python benchmarks/cpu_bench.py [--out benchmarks/results/cpu.json] [--quick]

(a) strong scaling of one DiT forward of a mid-size Wan-shaped model (12 heads x 64, 2 layers,
    3840 video tokens): 1 rank x 1 thread vs 2 ranks x 1 thread, and stock diffusers
    WanTransformer3DModel in one process with 2 threads;
(b) bytes each rank sends per forward, counted at the collectives, beside the analytic Ulysses
    and Ring volumes for the same shapes;
(c) sidecar overhead: a sampler call's wall time in the client minus the ranks' compute time,
    and the cost of moving 480p/720p latents and 512-token conditioning through the channel;
(d) degree-1 overhead: our world-size-1 model vs stock diffusers on the same weights and threads.

Timings are medians of several repeats; ratios come from runs made minutes apart in the same
process tree, never from numbers of another run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_targets  # noqa: E402

from usp_video.distributed.testing.spawn import run_ranks  # noqa: E402

CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=64, in_channels=16, out_channels=16,
              text_dim=512, freq_dim=256, ffn_dim=3072, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
SHAPE = (4, 48, 80)  # latent T x H x W -> 4 x 24 x 40 = 3840 tokens
TEXT_LEN = 512


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tokens(shape) -> int:
    return shape[0] * (shape[1] // 2) * (shape[2] // 2)


def scaling(repeats: int) -> dict:
    target = f"{HERE / 'bench_targets.py'}:forward_rank"
    common = dict(config=CONFIG, shape=SHAPE, text_len=TEXT_LEN, repeats=repeats)
    one = run_ranks(target, 1, dict(common, ulysses=1, ring=1), timeout=900, threads_per_rank=1)[0]
    results = {"tokens": tokens(SHAPE)}
    for name, (u, r) in {"ulysses2": (2, 1), "ring2": (1, 2)}.items():
        two = run_ranks(target, 2, dict(common, ulysses=u, ring=r), timeout=900, threads_per_rank=1)
        per_iter = torch.stack([t["times"] for t in two]).max(0).values  # a forward ends when the slowest rank does
        results[name] = {"seconds": statistics.median(per_iter.tolist()),
                         "rel_error_vs_1_rank": max(rel_error(t["out"], one["out"]) for t in two)}
    results["one_rank_1_thread"] = statistics.median(one["times"].tolist())
    # stock diffusers, one process, the same 2 cores as threads
    torch.set_num_threads(2)
    stock = bench_targets.build_model(CONFIG)
    x, t, ctx = bench_targets.inputs(SHAPE, TEXT_LEN, CONFIG["text_dim"])
    stock_out, stock_times = bench_targets.timed_forwards(stock, x, t, ctx, repeats)
    results["stock_2_threads"] = statistics.median(stock_times)
    results["stock_rel_error_vs_1_rank"] = rel_error(stock_out, one["out"])
    for name in ("ulysses2", "ring2"):
        results[name]["speedup_vs_1_rank"] = results["one_rank_1_thread"] / results[name]["seconds"]
        results[name]["efficiency"] = results[name]["speedup_vs_1_rank"] / 2
        results[name]["speedup_vs_stock_2_threads"] = results["stock_2_threads"] / results[name]["seconds"]
    return results


def analytic_bytes(world: int, ulysses: int, ring: int, seq: int, hidden: int, layers: int, out_dim: int,
                   batch: int = 1, elem: int = 4) -> dict:
    seq_pad = -(-seq // world) * world
    shard = seq_pad // world
    return {
        "all_to_all": layers * 4 * (ulysses - 1) * (shard // 1) * hidden * batch * elem // ulysses,
        "ring_p2p": layers * 2 * (ring - 1) * (seq_pad // ring) * (hidden // ulysses) * batch * elem,
        "all_gather": (world - 1) * shard * out_dim * batch * elem,
    }


def comm_bytes() -> list[dict]:
    target = f"{HERE / 'bench_targets.py'}:bytes_rank"
    hidden = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    out_dim = CONFIG["out_channels"] * 4
    rows = []
    # the last case: 2 x 5 x 7 = 70 tokens, which 3 does not divide (the ranks' shards are padded)
    for world, u, r, shape in ((2, 2, 1, SHAPE), (2, 1, 2, SHAPE), (4, 2, 2, SHAPE), (3, 3, 1, (2, 10, 14))):
        ranks = run_ranks(target, world, dict(config=CONFIG, shape=shape, text_len=TEXT_LEN, ulysses=u, ring=r),
                          timeout=900, threads_per_rank=1)
        measured = {k: max(float(rk[k]) for rk in ranks) for k in ranks[0]}
        expected = analytic_bytes(world, u, r, tokens(shape), hidden, CONFIG["num_layers"], out_dim)
        rows.append({"world": world, "ulysses": u, "ring": r, "tokens": tokens(shape),
                     "measured": measured, "analytic": expected,
                     "ratio": (sum(measured.values()) / sum(expected.values()))})
    return rows


def sidecar_overhead(repeats: int) -> dict:
    from usp_video.distributed import api, protocol
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.registry import free_group, get_group
    from usp_video.distributed.models.wan21.tiny import make_tiny_models
    from usp_video.distributed.requests import SampleRequest

    models = make_tiny_models(Path(os.environ.get("TMPDIR", "/tmp")) / "usp-video-bench-tiny")
    group = GroupConfig(ranks=2, threads_per_rank=1)
    cond = torch.randn(1, 512, 32)
    latent = torch.zeros(1, 16, 5, 24, 24)
    overheads = []
    try:
        api.load_dit(group, models["dit"])
        def request(seed: int, steps: int) -> SampleRequest:
            return SampleRequest(experts=[str(models["dit"])], positive=cond, negative=None, latent=latent, seed=seed,
                                 steps=steps, cfg=1.0, shift=5.0, sampler="euler")

        api.sample(group, request(0, 1))
        for i in range(repeats):
            start = time.perf_counter()
            _, info = api.sample(group, request(i, 4))
            overheads.append(time.perf_counter() - start - info["seconds"])
        get_group(group)  # still the same group
    finally:
        free_group()

    def round_trip(tensors: dict) -> float:
        a, b = socket.socketpair()
        try:
            def echo():
                header, out = protocol.recv_frame(b)
                protocol.send_frame(b, header, out)
            times = []
            for _ in range(3):
                thread = threading.Thread(target=echo)
                thread.start()
                start = time.perf_counter()
                protocol.send_frame(a, {"type": "echo"}, tensors)
                protocol.recv_frame(a)
                times.append((time.perf_counter() - start) / 2)  # one way
                thread.join()
            return statistics.median(times)
        finally:
            a.close()
            b.close()

    transfers = {}
    for name, shape in {"latent_480p_81f": (1, 16, 21, 60, 104), "latent_720p_81f": (1, 16, 21, 90, 160),
                        "conditioning_512x4096": (1, 512, 4096)}.items():
        tensor = torch.randn(shape)
        seconds = round_trip({"t": tensor})
        transfers[name] = {"megabytes": tensor.numel() * 4 / 1e6, "ms_one_way": seconds * 1e3,
                           "gb_per_s": tensor.numel() * 4 / seconds / 1e9}
    return {"overhead_ms_per_call": statistics.median(overheads) * 1e3, "calls": repeats,
            "steps_per_call": 4, "transfers": transfers}


def degree_one_overhead(repeats: int) -> dict:
    from usp_video.distributed.models.wan21.dit import parallelize_wan
    from usp_video.distributed.parallel.mesh import SequenceParallel

    torch.set_num_threads(2)
    x, t, ctx = bench_targets.inputs(SHAPE, TEXT_LEN, CONFIG["text_dim"])
    times = {"ours": [], "stock": []}
    stock = bench_targets.build_model(CONFIG)
    ours = parallelize_wan(bench_targets.build_model(CONFIG), SequenceParallel()).module
    outs = {}
    for _ in range(repeats):  # interleaved, so that drift hits both alike
        for name, model in (("stock", stock), ("ours", ours)):
            outs[name], ts = bench_targets.timed_forwards(model, x, t, ctx, 1)
            times[name].extend(ts)
    return {"ours_seconds": statistics.median(times["ours"]), "stock_seconds": statistics.median(times["stock"]),
            "ratio_ours_over_stock": statistics.median(times["ours"]) / statistics.median(times["stock"]),
            "rel_error": rel_error(outs["ours"], outs["stock"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 4
    started = time.monotonic()
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    report["a_scaling"] = scaling(repeats)
    report["b_comm_bytes"] = comm_bytes()
    report["c_sidecar"] = sidecar_overhead(5 if args.quick else 10)
    report["d_degree_one"] = degree_one_overhead(repeats)
    report["wall_seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    a, d, c = report["a_scaling"], report["d_degree_one"], report["c_sidecar"]
    print(f"(a) one DiT forward, {a['tokens']} tokens, Wan-shaped 12x64 heads, 2 layers")
    print(f"    1 rank x 1 thread           {a['one_rank_1_thread']:.3f} s")
    for name in ("ulysses2", "ring2"):
        r = a[name]
        print(f"    2 ranks x 1 thread {name:<9}{r['seconds']:.3f} s   speedup {r['speedup_vs_1_rank']:.2f}x, "
              f"efficiency {r['efficiency']:.0%}, vs stock 2 threads {r['speedup_vs_stock_2_threads']:.2f}x, "
              f"rel. error {r['rel_error_vs_1_rank']:.1e}")
    print(f"    stock diffusers, 2 threads  {a['stock_2_threads']:.3f} s")
    print("(b) bytes sent per rank per forward: measured / analytic")
    for row in report["b_comm_bytes"]:
        parts = ", ".join(f"{k} {row['measured'][k] / 1e6:.2f}/{row['analytic'][k] / 1e6:.2f} MB" for k in row["measured"])
        print(f"    {row['world']} ranks u{row['ulysses']} x r{row['ring']}, {row['tokens']} tokens: {parts}  "
              f"(total ratio {row['ratio']:.4f})")
    print(f"(c) sidecar overhead per sampler call: {c['overhead_ms_per_call']:.1f} ms "
          f"(median of {c['calls']} calls of {c['steps_per_call']} steps)")
    for name, tr in c["transfers"].items():
        print(f"    {name}: {tr['megabytes']:.1f} MB in {tr['ms_one_way']:.1f} ms ({tr['gb_per_s']:.2f} GB/s)")
    print(f"(d) world size 1: ours {d['ours_seconds']:.3f} s vs stock diffusers {d['stock_seconds']:.3f} s "
          f"-> ratio {d['ratio_ours_over_stock']:.3f} (rel. error {d['rel_error']:.1e})")
    print(f"written {args.out} in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

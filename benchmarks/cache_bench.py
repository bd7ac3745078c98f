"""Step caches on the CPU: TeaCache and the first-block cache against no cache, side by side in one run.

    python benchmarks/cache_bench.py            # about a minute on 2 CPU cores; writes results/cache.json
    python benchmarks/cache_bench.py --small    # seconds: checks that the script works

A Wan-shaped DiT with random weights (1.3B's width and heads, 4 blocks) samples one latent with euler,
cfg 5 (the two sides batched), without a cache and with each cache (TeaCache, first-block cache, MagCache) at a fixed threshold, on 1 and
2 CPU ranks. Printed per run: the steps skipped, the sampling time and its ratio to the uncached run of
the same world size, and the latent's relative difference from the uncached latent. Random weights
change the first block's output differently from a trained model, so which steps are skipped (and so
the speed-up) is illustrative only; the mechanics and the cost of a skipped step are what it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DIT = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=256, ffn_dim=8960, num_layers=4, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
SETTINGS = {"off": None, "teacache": 0.2, "fbcache": 0.3, "magcache": 0.12}


def run(rank: int, world_size: int, dit_path: str, shape: list, steps: int) -> dict:
    """One world size: every setting in the same ranks, timed one after the other."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from parity_targets import make_engine, sample_request

    engine = make_engine(rank, world_size)
    engine.dit(dit_path)  # loaded before timing
    out = {}
    for method, threshold in SETTINGS.items():
        request = sample_request(dit_path, tuple(shape), steps=steps, sampler="euler")
        if threshold is not None:
            request.cache = {"method": method, "threshold": threshold}
        started = time.perf_counter()
        result = engine.sample(request)
        latent, seconds = result.latent, time.perf_counter() - started
        skipped = result.step_cache.report()["skipped_steps"] if result.step_cache is not None else []
        out[f"{method}/latent"] = latent
        out[f"{method}/seconds"] = torch.tensor(seconds)
        out[f"{method}/skipped"] = torch.tensor(skipped, dtype=torch.long)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", default=str(HERE / "results" / "cache.json"))
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models.wan21 import dit as wan
    from usp_video.distributed.models.wan21.tiny import _save, wan_to_original_keys
    from usp_video.distributed.testing.spawn import run_ranks

    config = dict(DIT, num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2) if args.small else DIT
    shape, steps = ([3, 4, 6], 6) if args.small else ([5, 16, 28], 20)  # 5 x 8 x 14 = 560 tokens
    report = {"dit_config": config, "latent_shape": [1, 16, *shape], "steps": steps, "sampler": "euler", "cfg": 5.0,
              "thresholds": {k: v for k, v in SETTINGS.items() if v is not None}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dit_path = str(Path(tmp, "dit.safetensors"))
        _save(wan_to_original_keys(WanTransformer3DModel(**config).state_dict()), Path(dit_path),
              {wan.CONFIG_METADATA_KEY: json.dumps(config)})
        print(f"{'ranks':>5} {'cache':>9} {'threshold':>9} {'skipped':>8} {'seconds':>8} {'time ratio':>10} "
              f"{'rel diff':>9}")
        for world_size in (1, 2):
            if world_size == 1:
                result = run(0, 1, dit_path, shape, steps)
            else:
                result = run_ranks(f"{Path(__file__).resolve()}:run", world_size,
                                   dict(dit_path=dit_path, shape=shape, steps=steps), timeout=900)[0]
            base = result["off/latent"]
            for method, threshold in SETTINGS.items():
                seconds = float(result[f"{method}/seconds"])
                skipped = result[f"{method}/skipped"].tolist()
                diff = float((result[f"{method}/latent"] - base).norm() / base.norm())
                ratio = seconds / float(result["off/seconds"])
                report["runs"].append({"ranks": world_size, "cache": method, "threshold": threshold,
                                       "skipped_steps": skipped, "seconds": seconds, "time_ratio": ratio,
                                       "rel_diff_vs_no_cache": diff})
                print(f"{world_size:>5} {method:>9} {threshold if threshold is not None else '-':>9} "
                      f"{len(skipped):>3}/{steps:<4} {seconds:>8.2f} {ratio:>10.2f} {diff:>9.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

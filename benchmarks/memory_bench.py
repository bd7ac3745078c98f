"""Memory per rank with weight sharding and the split VAE decode, for N = 1, 2, 4 CPU ranks.

    python benchmarks/memory_bench.py            # a few minutes on 2 CPU cores; writes results/memory.json
    python benchmarks/memory_bench.py --small    # seconds: checks that the script works

Prints, per N: the bytes of DiT parameters each rank holds with shard_weights on (against the
whole model: the target is <= 1/N + 5%), and for each VAE the peak resident memory each rank adds
while decoding one video split across the N ranks (VmHWM after a reset, minus VmRSS before), with
the decode time and the max abs difference of the split decode from N = 1. The Wan-VAE splits the
rows of every frame; the HunyuanVideo VAE shares out its tiles (here small tiles, so that a small
video makes many).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

DIT = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=64, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=256, ffn_dim=3072, num_layers=4, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
VAE = dict(base_dim=16, z_dim=16)
HUNYUAN_VAE = dict(block_out_channels=[32, 32, 64, 64], norm_num_groups=8, layers_per_block=1)
# 64 px tiles every 48 px, 8 frames every 4: a 5x24x24 latent makes 5 x 4 x 4 = 80 tiles
HUNYUAN_TILES = dict(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_min_num_frames=8,
                     tile_sample_stride_height=48, tile_sample_stride_width=48, tile_sample_stride_num_frames=4)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def weights_rank(rank, world_size, dit_path):
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.parallel.fsdp import parameter_bytes

    config = GroupConfig(ranks=world_size, shard_weights="on" if world_size > 1 else "off", vae_split=False)
    engine = Engine(config, rank=rank)
    return {"bytes": torch.tensor([parameter_bytes(engine.dit(dit_path))], dtype=torch.float64)}


def vae_rank(rank, world_size, vae_path, shape, mkldnn=False, tiling=None):
    import time

    import torch.distributed as dist

    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    torch.backends.mkldnn.enabled = mkldnn
    engine = Engine(GroupConfig(ranks=world_size, vae_split=True), rank=rank)
    vae = engine.vae(vae_path)
    if tiling:
        vae.enable_tiling(**tiling)
    latent = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(3))
    if world_size > 1:
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    frames = engine.decode(vae_path, latent)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") - before
    out = {"peak_kb": torch.tensor([peak], dtype=torch.float64), "seconds": torch.tensor([seconds])}
    if frames is not None:
        out["frames"] = frames
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--mkldnn", action="store_true",
                        help="keep oneDNN's CPU convolutions on: faster, but their time and workspace jump with "
                             "the frame height (measured: 24 latent rows took longer and more memory than 48), "
                             "which hides what the split does; off by default here")
    args = parser.parse_args()

    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan, WanTransformer3DModel

    from usp_video.distributed.models.hunyuan_video import tiny as hunyuan_tiny, vae as hunyuan_vae
    from usp_video.distributed.models.wan21 import dit as wan, vae as wan_vae
    from usp_video.distributed.models.wan21.tiny import _save, wan_to_original_keys, wan_vae_to_original_keys
    from usp_video.distributed.parallel.spawn import run_ranks

    dit_config = dict(DIT, attention_head_dim=8, ffn_dim=64, num_layers=2, freq_dim=32) if args.small else DIT
    vaes = {  # name: (config, latent frames x rows x columns, tiling)
        "wan": (dict(VAE, base_dim=8) if args.small else VAE, (2, 24, 16) if args.small else (5, 48, 48), None),
        "hunyuan": (hunyuan_tiny.TINY_HUNYUAN_VAE if args.small else HUNYUAN_VAE, (3, 9, 8) if args.small else (5, 24, 24),
                    hunyuan_tiny.TINY_HUNYUAN_VAE_TILES if args.small else HUNYUAN_TILES)}
    results = {"dit_config": dit_config, "mkldnn": args.mkldnn, "runs": [],
               "vaes": {name: {"config": c, "latent_shape": [1, 16, *shape], "tiling": tiling}
                        for name, (c, shape, tiling) in vaes.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dit_path = Path(tmp, "dit.safetensors")
        dit = WanTransformer3DModel(**dit_config)
        full = sum(p.numel() * p.element_size() for p in dit.parameters())
        _save(wan_to_original_keys(dit.state_dict()), dit_path, {wan.CONFIG_METADATA_KEY: json.dumps(dit_config)})
        del dit
        paths = {"wan": Path(tmp, "wan_vae.safetensors"), "hunyuan": Path(tmp, "hunyuan_vae.safetensors")}
        _save(wan_vae_to_original_keys(AutoencoderKLWan(**vaes["wan"][0]).state_dict()), paths["wan"],
              {wan_vae.CONFIG_METADATA_KEY: json.dumps(vaes["wan"][0])})
        _save(AutoencoderKLHunyuanVideo(**vaes["hunyuan"][0]).state_dict(), paths["hunyuan"],
              {hunyuan_vae.CONFIG_METADATA_KEY: json.dumps(vaes["hunyuan"][0])})
        reference = {}
        for n in (1, 2, 4):
            held = [int(r["bytes"]) for r in run_ranks(f"{__file__}:weights_rank", n, dict(dit_path=str(dit_path)),
                                                       timeout=600)]
            run = {"ranks": n, "param_bytes_per_rank": held, "fraction_of_full": [h / full for h in held]}
            for name, (_, shape, tiling) in vaes.items():
                decoded = run_ranks(f"{__file__}:vae_rank", n, dict(vae_path=str(paths[name]), shape=shape,
                                                                    mkldnn=args.mkldnn, tiling=tiling), timeout=600)
                frames = decoded[0]["frames"]
                reference.setdefault(name, frames)
                run[name] = {"peak_mib_per_rank": [float(r["peak_kb"]) / 1024 for r in decoded],
                             "seconds": max(float(r["seconds"]) for r in decoded),
                             "max_abs_diff_vs_one_rank": float((frames - reference[name]).abs().max())}
            results["runs"].append(run)
    results["full_param_bytes"] = full

    print(f"DiT: {full / 2**20:.1f} MiB of parameters. VAE decodes: "
          + "; ".join(f"{name} 1x16x{'x'.join(map(str, shape))}" + (" (tiled)" if tiling else "")
                      for name, (_, shape, tiling) in vaes.items()))
    header = f"{'ranks':>5}{'weights/rank MiB':>18}{'of full':>9}{'target':>8}"
    for name in vaes:
        header += f"{name + ' peak/rank MiB':>24}{'s':>7}{'max diff':>10}"
    print(header)
    for run in results["runs"]:
        n = run["ranks"]
        line = (f"{n:>5}{max(run['param_bytes_per_rank']) / 2**20:>18.1f}{max(run['fraction_of_full']):>9.3f}"
                f"{1 / n + 0.05:>8.3f}")
        for name in vaes:
            v = run[name]
            line += f"{max(v['peak_mib_per_rank']):>24.1f}{v['seconds']:>7.2f}{v['max_abs_diff_vs_one_rank']:>10.1e}"
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

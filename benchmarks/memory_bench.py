"""Memory per rank with weight sharding and the split VAE decode, for N = 1, 2, 4 CPU ranks, and the
peak of loading a model: a Wan DiT (whole file read, against the streamed load, sharded and not), a
HunyuanVideo DiT and a Llama text encoder (the streamed load, sharded and not).

    python benchmarks/memory_bench.py            # a few minutes on 2 CPU cores; writes results/memory.json
    python benchmarks/memory_bench.py --small    # seconds: checks that the script works
    python benchmarks/memory_bench.py --load-only --load-models hunyuan,llama   # updates those in the file

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


# The load benchmark's models: each >= 1 GiB of fp32 weights in >= 20 blocks (the architectures, narrower).
LOAD_DIT = dict(DIT, num_attention_heads=16, attention_head_dim=64, ffn_dim=4096, num_layers=20)
LOAD_HUNYUAN = dict(num_attention_heads=6, num_layers=6, num_single_layers=14)  # on the released config
LOAD_LLAMA = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=20, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000)  # on Llama 3 8B's


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


def _read_whole_file(path, device):
    """How the DiT was loaded before the streamed load: every rank reads the whole file into memory,
    converts it and builds the whole model (shard_weights then sharded it afterwards)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from usp_video.distributed.formats.checkpoint import (DIT_PREFIXES, build_on_meta, dequantize, keeps_fp32,
                                                         load_state_dict, read_header, strip_prefix)
    from usp_video.distributed.models.wan21 import dit as wan

    shapes, metadata = read_header(path)
    state = convert_wan_transformer_to_diffusers(strip_prefix(load_state_dict(path), DIT_PREFIXES))
    state = dequantize(state, torch.float32, keeps_fp32(WanTransformer3DModel))  # to the compute dtype
    model = build_on_meta(lambda: WanTransformer3DModel(**wan.infer_wan_config(Path(path), shapes, metadata)), state,
                          path, "Wan")
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size, model.config.rope_max_seq_len)
    return model.to(device)


def _load_llama(engine, path: str, sharded: bool):
    """The Llama as the engine loads a sharded text part: the family's TextPart, given the shard callable."""
    from usp_video.distributed.models import FAMILIES
    from usp_video.distributed.parallel import fsdp

    part = next(p for p in FAMILIES["hunyuan-video"].text_parts if p.input == "llama")
    shard = (lambda model: fsdp.shard_model(model, part.shard_units(model), engine.device)) if sharded else None
    return part.load(path, engine.dtype, engine.device, shard)


def load_rank(rank, world_size, path, how, kind="wan"):
    """Peak resident memory this rank adds while loading the model (VmHWM after a reset, minus VmRSS just
    before), and the parameter bytes it holds after. how: "streamed" (the engine's load, sharded when
    N > 1), "streamed-whole" (the engine's load, shard_weights off) or "whole-file" (the old load, Wan
    only). kind: "wan" or "hunyuan" (a DiT), or "llama" (HunyuanVideo's text encoder)."""
    import gc

    import torch.distributed as dist

    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.parallel import fsdp

    import diffusers.loaders.single_file_utils  # noqa: F401  (imported before the measurement, not during it)
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import LlamaModel  # noqa: F401

    shard = "on" if how == "streamed" and world_size > 1 else "off"
    engine = Engine(GroupConfig(ranks=world_size, shard_weights=shard, vae_split=False), rank=rank)
    gc.collect()
    if world_size > 1:
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    if how == "whole-file":
        model = _read_whole_file(path, engine.device)
        if world_size > 1:
            fsdp.shard_model(model, list(model.blocks), engine.device)
    elif kind == "llama":
        model = _load_llama(engine, path, shard == "on")
    else:
        model = engine.dit(path)
    # touch every weight, as the first step will: a memory-mapped file's pages count only once read
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    checksum = sum(float(t.float().sum()) for t in local)
    peak = _status_kb("VmHWM") - before
    return {"peak_kb": torch.tensor([peak], dtype=torch.float64),
            "file_kb": torch.tensor([_status_kb("RssFile")], dtype=torch.float64),
            "bytes": torch.tensor([fsdp.parameter_bytes(model)], dtype=torch.float64),
            "checksum": torch.tensor([checksum], dtype=torch.float64)}


def _predicted(kind: str, path: Path, shares: int) -> int:
    """The pre-flight's prediction of the load's peak per rank (the Llama's by the same rule)."""
    from usp_video.distributed.formats import streamed
    from usp_video.distributed.models import FAMILIES

    if kind == "llama":
        return streamed.load_peak_bytes(path, torch.float32, shares, keep_within=("model.layers.",))
    return FAMILIES["wan2.1" if kind == "wan" else "hunyuan-video"].dit_load_bytes(str(path), torch.float32, shares)


def measure_load(path: Path, full: int, counts=(1, 2, 4), kind: str = "wan") -> list[dict]:
    """The load's peak per rank for N in counts, each way, side by side; as fractions of the model."""
    from usp_video.distributed.testing.spawn import run_ranks

    rows = []
    for n in counts:
        for how in ("whole-file", "streamed-whole", "streamed") if kind == "wan" else ("streamed-whole", "streamed"):
            if how == "streamed" and n == 1:
                continue
            ranks = run_ranks(f"{__file__}:load_rank", n, dict(path=str(path), how=how, kind=kind), timeout=900)
            peaks = [float(r["peak_kb"]) * 1024 / full for r in ranks]
            shares = n if how == "streamed" else 1
            rows.append({"ranks": n, "load": how, "peak_per_rank": peaks, "peak_sum": sum(peaks),
                         "held_per_rank": [float(r["bytes"]) / full for r in ranks],
                         "predicted_per_rank": _predicted(kind, path, shares) / full if how != "whole-file" else None})
    return rows


def write_load_model(kind: str, small: bool, path: Path) -> tuple[dict, int]:
    """The load benchmark's model of that kind, written to path as its released files are (original key
    names, bf16): (its config, its bytes at fp32, the compute dtype on the CPU)."""
    from usp_video.distributed.models.wan21.tiny import _save

    torch.manual_seed(0)
    if kind == "wan":
        from diffusers import WanTransformer3DModel

        from usp_video.distributed.models.wan21 import dit as wan
        from usp_video.distributed.models.wan21.tiny import wan_to_original_keys

        config = dict(LOAD_DIT, num_attention_heads=4, attention_head_dim=16, ffn_dim=64) if small else LOAD_DIT
        model = WanTransformer3DModel(**config)
        state, metadata = wan_to_original_keys(model.state_dict()), {wan.CONFIG_METADATA_KEY: json.dumps(config)}
    elif kind == "hunyuan":
        from diffusers import HunyuanVideoTransformer3DModel

        from usp_video.distributed.models.hunyuan_video import dit as hunyuan
        from usp_video.distributed.models.hunyuan_video.tiny import TINY_HUNYUAN_CONFIG

        config = dict(hunyuan.HUNYUAN_VARIANTS["hunyuan-video-t2v-720p"], **LOAD_HUNYUAN)
        if small:
            config = dict(TINY_HUNYUAN_CONFIG, num_layers=6, num_single_layers=14)
        model = HunyuanVideoTransformer3DModel(**config)
        state = hunyuan.hunyuan_to_original_keys(model.state_dict())
        metadata = {hunyuan.CONFIG_METADATA_KEY: json.dumps(config)}
    else:
        from transformers import LlamaConfig, LlamaModel

        from usp_video.distributed.models.hunyuan_video import text

        config = dict(text.LLAMA_8B, **LOAD_LLAMA)
        if small:
            config.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=256)
        model = LlamaModel(LlamaConfig(**config))
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        metadata = {text.LLAMA_CONFIG_KEY: json.dumps(config)}
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    _save({k: v.to(torch.bfloat16) for k, v in state.items()}, path, metadata)
    return config, full


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
    parser.add_argument("--load-only", action="store_true",
                        help="only the load's peak (skip the weights and VAEs; the file's other numbers are kept)")
    parser.add_argument("--load-models", default="wan,hunyuan,llama",
                        help="whose load to measure, of wan, hunyuan, llama (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--mkldnn", action="store_true",
                        help="keep oneDNN's CPU convolutions on: faster, but their time and workspace jump with "
                             "the frame height (measured: 24 latent rows took longer and more memory than 48), "
                             "which hides what the split does; off by default here")
    args = parser.parse_args()

    results = {}
    if args.load_only and args.out.is_file():  # the numbers of the other parts stay as they were
        results = json.loads(args.out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if not args.load_only:
            results.update(measure_weights_and_vaes(args, Path(tmp)))
        for kind in args.load_models.split(","):
            load_path = Path(tmp, f"load_{kind}.safetensors")
            load_config, load_full = write_load_model(kind, args.small, load_path)
            runs = measure_load(load_path, load_full, (1, 2) if args.small else (1, 2, 4), kind)
            results[LOAD_KEYS[kind]] = {"config": load_config, "model_bytes": load_full, "runs": runs}
            load_path.unlink()

    if not args.load_only:
        print_weights_and_vaes(results)
    for kind in args.load_models.split(","):
        print_load(kind, results[LOAD_KEYS[kind]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


LOAD_KEYS = {"wan": "load", "hunyuan": "load_hunyuan", "llama": "load_llama"}  # where results keep them


def measure_weights_and_vaes(args, tmp: Path) -> dict:
    """The DiT's parameter bytes per rank with shard_weights on, and each VAE's split decode, for N = 1, 2, 4."""
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan, WanTransformer3DModel

    from usp_video.distributed.models.hunyuan_video import tiny as hunyuan_tiny, vae as hunyuan_vae
    from usp_video.distributed.models.wan21 import dit as wan, vae as wan_vae
    from usp_video.distributed.models.wan21.tiny import _save, wan_to_original_keys, wan_vae_to_original_keys
    from usp_video.distributed.testing.spawn import run_ranks

    dit_config = dict(DIT, attention_head_dim=8, ffn_dim=64, num_layers=2, freq_dim=32) if args.small else DIT
    vaes = {  # name: (config, latent frames x rows x columns, tiling)
        "wan": (dict(VAE, base_dim=8) if args.small else VAE, (2, 24, 16) if args.small else (5, 48, 48), None),
        "hunyuan": (hunyuan_tiny.TINY_HUNYUAN_VAE if args.small else HUNYUAN_VAE, (3, 9, 8) if args.small else (5, 24, 24),
                    hunyuan_tiny.TINY_HUNYUAN_VAE_TILES if args.small else HUNYUAN_TILES)}
    results = {"dit_config": dit_config, "mkldnn": args.mkldnn, "runs": [],
               "vaes": {name: {"config": c, "latent_shape": [1, 16, *shape], "tiling": tiling}
                        for name, (c, shape, tiling) in vaes.items()}}
    torch.manual_seed(0)
    dit_path = tmp / "dit.safetensors"
    dit = WanTransformer3DModel(**dit_config)
    full = sum(p.numel() * p.element_size() for p in dit.parameters())
    _save(wan_to_original_keys(dit.state_dict()), dit_path, {wan.CONFIG_METADATA_KEY: json.dumps(dit_config)})
    del dit
    paths = {"wan": tmp / "wan_vae.safetensors", "hunyuan": tmp / "hunyuan_vae.safetensors"}
    _save(wan_vae_to_original_keys(AutoencoderKLWan(**vaes["wan"][0]).state_dict()), paths["wan"],
          {wan_vae.CONFIG_METADATA_KEY: json.dumps(vaes["wan"][0])})
    _save(AutoencoderKLHunyuanVideo(**vaes["hunyuan"][0]).state_dict(), paths["hunyuan"],
          {hunyuan_vae.CONFIG_METADATA_KEY: json.dumps(vaes["hunyuan"][0])})
    reference = {}
    for n in (1, 2) if args.small else (1, 2, 4):  # --small checks the script: 4 ranks add a minute on CI
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
    return results


def print_weights_and_vaes(results: dict) -> None:
    vaes = results["vaes"]
    print(f"DiT: {results['full_param_bytes'] / 2**20:.1f} MiB of parameters. VAE decodes: "
          + "; ".join(f"{name} {'x'.join(map(str, v['latent_shape']))}" + (" (tiled)" if v["tiling"] else "")
                      for name, v in vaes.items()))
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


def print_load(kind: str, load: dict) -> None:
    config = load["config"]
    blocks = config.get("num_layers", 0) + config.get("num_single_layers", 0) + config.get("num_hidden_layers", 0)
    what = {"wan": "a Wan DiT", "hunyuan": "a HunyuanVideo DiT", "llama": "a Llama text encoder"}[kind]
    print(f"\nLoading {what} of {load['model_bytes'] / 2**30:.2f} GiB (fp32, {blocks} blocks): "
          "peak memory added per rank, as a fraction of the model (target: streamed <= 1/N + 0.15 per rank and "
          "<= 1.3 summed over the ranks; streamed-whole <= 1.15)")
    print(f"{'ranks':>5}{'load':>16}{'peak/rank':>11}{'sum':>7}{'held/rank':>11}{'target/rank':>13}"
          f"{'pre-flight':>12}{'/ peak':>8}")
    for row in load["runs"]:
        n, how = row["ranks"], row["load"]
        target = f"{1 / n + 0.15:.3f}" if how == "streamed" else ("1.150" if how == "streamed-whole" else "-")
        predicted = row["predicted_per_rank"]
        ratio = f"{predicted / max(row['peak_per_rank']):>8.2f}" if predicted else f"{'-':>8}"
        print(f"{n:>5}{how:>16}{max(row['peak_per_rank']):>11.3f}{row['peak_sum']:>7.2f}"
              f"{max(row['held_per_rank']):>11.3f}{target:>13}{(f'{predicted:.3f}' if predicted else '-'):>12}{ratio}")


if __name__ == "__main__":
    main()

"""The activations pre-flight against the measured peak of a sampling step, on CPU ranks.

    python benchmarks/activation_bench.py           # about a minute on 2 cores; writes results/activations.json
    python benchmarks/activation_bench.py --small   # seconds: checks that the script works

For Wan-shaped DiTs of three widths / FFN sizes, three video sizes, batch 1 (cfg 1) and 2 (cfg 5, both
passes in one batch), and 1 or 2 ranks (ulysses 2, ring 2): the peak resident memory one step adds to a
rank (VmHWM after a reset, minus VmRSS before; the model loaded and touched before), beside the engine's
prediction (Preflight.activation_bytes, memory.py). The target: predicted / measured within 1.0 .. 1.3.

The ranks run with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every tensor above 64 KiB with its
own mapping and returns it when freed, so the resident size follows the live tensors. Without it, memory
freed earlier (by the load) is reused from the heap and the measured peak depends on the process's history.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BASE = dict(patch_size=[1, 2, 2], num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=2048, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
MODELS = {"512/2048": BASE, "512/4096": dict(BASE, ffn_dim=4096), "1024/2048": dict(BASE, num_attention_heads=16)}
SIZES = [(5, 40, 40), (7, 48, 48), (9, 40, 60)]  # latent frames x rows x columns: 2000, 2688 and 5400 tokens
TEXT_TOKENS = 512


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def write_model(config: dict, path: Path, seed: int = 0) -> Path:
    """A Wan DiT of this config with random weights, written as released files are (original key names)."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.models.wan21 import dit as wan
    from usp_video.distributed.models.wan21.tiny import _save, wan_to_original_keys

    torch.manual_seed(seed)
    _save(wan_to_original_keys(WanTransformer3DModel(**config).state_dict()), path,
          {wan.CONFIG_METADATA_KEY: json.dumps(config)})
    return path


def step_rank(rank, world_size, dit_path, shape, cfg, ulysses=1, ring=1):
    """One euler step on a zero latent of this shape: {"peak": bytes added, "predicted": bytes}."""
    import gc

    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest

    engine = Engine(GroupConfig(ranks=world_size, ulysses=ulysses, ring=ring, shard_weights="off", vae_split=False),
                    rank=rank)
    dit = engine.load_dit(dit_path)
    text_dim = dit.module.config.text_dim
    g = torch.Generator().manual_seed(3)
    request = SampleRequest(experts=[dit_path], positive={"tokens": torch.randn(1, TEXT_TOKENS, text_dim, generator=g)},
                            negative={"tokens": torch.randn(1, TEXT_TOKENS, text_dim, generator=g)},
                            latent=torch.zeros(1, 16, *shape), seed=1, steps=1, cfg=cfg, shift=5.0, sampler="euler")
    predicted = engine.preflight.activation_bytes([dit], tuple(request.latent.shape), TEXT_TOKENS,
                                                  passes=2 if cfg != 1.0 else 1)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    before = _status_kb("VmRSS")
    engine.sample(request)
    peak = (_status_kb("VmHWM") - before) * 1024
    return {"peak": torch.tensor([peak], dtype=torch.float64), "predicted": torch.tensor([predicted], dtype=torch.float64)}


def measure(dit_path: Path, shape, cfg: float, world_size: int = 1, ulysses: int = 1, ring: int = 1) -> dict:
    """The step's peak on each rank beside the prediction, ranks spawned with the allocator setting above."""
    from usp_video.distributed.testing.spawn import run_ranks

    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        ranks = run_ranks(f"{__file__}:step_rank", world_size,
                          dict(dit_path=str(dit_path), shape=tuple(shape), cfg=cfg, ulysses=ulysses, ring=ring),
                          timeout=600)
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    peak = max(float(r["peak"]) for r in ranks)
    predicted = max(float(r["predicted"]) for r in ranks)
    return {"shape": list(shape), "cfg": cfg, "ranks": world_size, "ulysses": ulysses, "ring": ring,
            "peak_bytes": peak, "predicted_bytes": predicted, "ratio": predicted / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="one model, one size: checks that the script works")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "activations.json")
    args = parser.parse_args()
    models = dict(list(MODELS.items())[:1]) if args.small else MODELS
    sizes = SIZES[:1] if args.small else SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in models.items():
            path = write_model(config, Path(tmp, "dit.safetensors"))
            runs = [(1, 1, 1, cfg) for cfg in (1.0, 5.0)] + ([] if args.small else [(2, 2, 1, 5.0), (2, 1, 2, 5.0)])
            for shape in sizes:
                for world_size, ulysses, ring, cfg in runs:
                    row = dict(measure(path, shape, cfg, world_size, ulysses, ring), model=name)
                    rows.append(row)
                    print(f"{name:>10} latent {'x'.join(map(str, shape)):>8} cfg {cfg:g} {world_size} rank(s) "
                          f"u{ulysses} r{ring}: measured {row['peak_bytes'] / 2**20:7.1f} MiB, predicted "
                          f"{row['predicted_bytes'] / 2**20:7.1f} MiB, ratio {row['ratio']:.2f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"predicted / measured: {min(ratios):.2f} .. {max(ratios):.2f} (target 1.0 .. 1.3)")
    if not args.small:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": "cpu", "dtype": "fp32", "text_tokens": TEXT_TOKENS,
                                        "models": MODELS, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

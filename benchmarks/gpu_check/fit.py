"""Section 4: do the 14B models fit 24-48 GB cards? The memory pre-flight's prediction per rank for Wan 2.1 14B
and Wan 2.2 A14B from their released configs (no file needed, the model is built on the meta device), bf16 and
fp8 files, sharded over 2 and 4 ranks: the DiT load's peak (for A14B one expert on the GPU, the other in host
memory: placement offload) plus one step's activations at 832x480x81, cfg 5 (the planner's memory). The text
encoder (off the GPU while sampling) and the VAE are not counted.

Report key "fit": one row per (model, file dtype, ranks), in GiB.
"""

from __future__ import annotations

import torch

from .common import Context


def run(ctx: Context) -> list[dict]:
    """The pre-flight's per-rank prediction for the 14B models on 2 and 4 ranks (bf16 compute): the load's
    peak of the expert on the GPU plus the planner's activations of a step at 832x480x81, cfg 5."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed import planner
    from usp_video.distributed.formats.streamed import peak_bytes
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


def show(rows: list[dict], ctx: Context) -> None:
    print("pre-flight per rank, shard_weights on, bf16 compute: the DiT load's peak + a step's activations "
          "at 832x480x81, cfg 5")
    print(f"{'model':<26}{'file':>6}{'ranks':>7}{'weights':>9}{'activ.':>8}{'GiB/rank':>10}{'left of 24':>12}"
          f"{'left of 48':>12}")
    for r in rows:
        print(f"{r['model']:<26}{r['file']:>6}{r['ranks']:>7}{r['weights_gib']:>9.1f}{r['activations_gib']:>8.1f}"
              f"{r['gib_per_rank']:>10.1f}{r['gib_left_of_24']:>12.1f}{r['gib_left_of_48']:>12.1f}")

"""The USP Group node (which devices, how many ranks, which degrees) and USP Free Group."""

from __future__ import annotations

from ..distributed.config import DTYPES, PLACEMENTS, SHARD_WEIGHTS, GroupConfig, parse_bool, parse_degree
from ..distributed.parallel.compile import COMPILE
from ..distributed.parallel.usp_attention import BACKENDS
from ..distributed.registry import free_group, get_group
from . import services, socket_types
from .v3 import CATEGORY, advanced, io, schema

DEGREES = ["auto", "1", "2", "3", "4", "5", "6", "8"]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(gpus: str, available: int) -> tuple[int, ...]:
    """'all' or '0,1,2,3' -> GPU indices, checked against the GPUs present."""
    text = gpus.strip().lower()
    if available == 0:
        raise ValueError("device 'cuda' was chosen but no CUDA/ROCm GPU is visible; choose device 'cpu'")
    if text in ("", "all"):
        return tuple(range(available))
    try:
        indices = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"gpus must be 'all' or a comma-separated list like '0,1', got {gpus!r}") from None
    bad = [i for i in indices if not 0 <= i < available]
    if bad:
        raise ValueError(f"gpus lists {bad}, but this machine has {available} GPU(s): "
                         f"{', '.join(map(str, range(available)))}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus lists a GPU twice: {gpus!r}")
    return indices


TIP_ATTENTION = (
    "Attention kernel. auto: the fastest available (sdpa on CPU; on GPUs sageattention where ring is 1, then "
    "flash_attn, then sdpa; the loader's info says which ran). sdpa: torch's own. flash_attn and sageattention need "
    "their package, a GPU and bf16/fp16; sageattention returns no log-sum-exp, so it runs only with ring 1. math: "
    "the slow exact reference.")
TIP_CFG_PARALLEL = (
    "on: split the ranks into two halves that run the conditional and unconditional passes at once (ulysses x ring "
    "then applies per half); nearly halves the step time when cfg != 1. Needs an even number of ranks; with cfg 1 "
    "both halves run the same single pass.")
TIP_SHARD = ("FSDP: each rank keeps 1/N of the DiT's (and the text encoder's) weights and gathers a block's weights "
             "just before it runs. auto: on when the weights would not fit one GPU's free memory.")
TIP_VAE_SPLIT = (
    "on: the ranks share the decode: Wan-VAE, every rank decodes its rows of each frame, swapping edge rows with its "
    "neighbours (exact; about 1/N of the memory and time per GPU); HunyuanVideo VAE, the ranks share out its tiles "
    "(the one-GPU tiled result, about 1/N of the time). off: rank 0 decodes alone.")
TIP_PLACEMENT = (
    "Where models wait while they are not running. offload: the text encoder goes to host memory after encoding, "
    "and the idle expert of a two-expert model while the other runs (the device memory is handed back). keep: "
    "everything stays on the GPUs (fastest, most memory). cpu: the text encoder runs on the CPU (slow; never takes "
    "GPU memory).")
TIP_DIT_OFFLOAD = (
    "on: when even a rank's share of the DiT does not fit its GPU (one GPU too). The DiT's weights are sharded and "
    "each rank's shards wait in host memory; each block's are copied to the GPU just before it runs, so a GPU holds "
    "about two blocks. Slower (every step copies the whole share over PCIe) and takes host memory; shard_weights "
    "must not be off.")
TIP_COMPILE = (
    "torch.compile each DiT block (after sequence parallelism and weight sharding, which stay as they are). on: "
    "inductor (GPUs: needs triton; CPU: needs a C++ compiler); the first steps of a new size are slow while it "
    "compiles. aot_eager: checks compilation, no speed gain. off: the default.")
TIP_FP8 = (
    "on: with an fp8 model file, its layers multiply in fp8 (torch._scaled_mm, the input rounded to fp8 per tensor) "
    "instead of casting the weights up: faster on GPUs of compute capability >= 8.9 (RTX 40xx/50xx, L40, H100, "
    "B200), slightly less exact. Refused elsewhere.")

TIP_MAX_STEP = (
    "Refuse a sampling step estimated (from its tokens, the model and the ranks' measured speed) to take longer than "
    "this many seconds, before it starts: a step that long (a huge width x height, say) could not be cancelled in "
    "reasonable time either. 0: no limit. Changing it keeps the running group.")


def _combo(name: str, options, tooltip: str, default=None):
    return io.Combo.Input(name, options=list(options), default=default, tooltip=tooltip)


class UspGroupNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspGroup", display_name="USP Group (GPUs / ranks)", category=CATEGORY,
            description=("Starts (once) the sidecar process group that runs the model with Unified Sequence "
                         "Parallelism: one process per GPU, or N CPU processes. ulysses x ring must equal the number "
                         "of ranks; 'auto' picks Ulysses as large as the model's heads allow."),
            search_aliases=["multi-gpu", "gpus", "sequence parallel", "usp group", "xdit"],
            inputs=[
                _combo("device", ["auto", "cuda", "cpu"], "auto: GPUs when present, else CPU ranks."),
                io.String.Input("gpus", default="all", tooltip="GPU indices to use, e.g. '0,1,2,3', or 'all'."),
                io.Int.Input("cpu_ranks", default=2, min=1, max=64, tooltip="Number of ranks when running on CPU."),
                _combo("ulysses", DEGREES, "Ulysses (all-to-all) degree; must divide the attention heads (12 for Wan "
                                           "1.3B, 40 for 14B). Best within one node."),
                _combo("ring", DEGREES, "Ring attention degree; works for any head count."),
                _combo("attention", BACKENDS, TIP_ATTENTION),
                _combo("dtype", ["auto", *DTYPES], "Compute precision; auto: bf16 on GPU, fp32 on CPU."),
                io.Int.Input("timeout_s", default=600, min=10, max=86400,
                             tooltip="A collective stuck this long fails instead of hanging."),
                _combo("cfg_parallel", ["off", "on"], TIP_CFG_PARALLEL),
                _combo("shard_weights", SHARD_WEIGHTS, TIP_SHARD),
                _combo("vae_split", ["on", "off"], TIP_VAE_SPLIT),
                _combo("placement", PLACEMENTS, TIP_PLACEMENT, default="offload"),
                _combo("dit_offload", ["off", "on"], TIP_DIT_OFFLOAD),
                _combo("compile", COMPILE, TIP_COMPILE),
                _combo("fp8_compute", ["off", "on"], TIP_FP8),
                advanced(io.Int.Input, "max_step_s", optional=True, default=300, min=0, max=86400, tooltip=TIP_MAX_STEP),
            ],
            outputs=[socket_types.Group.Output("group", tooltip="For every USP node of the graph."),
                     io.String.Output("info", tooltip="The group's ranks and degrees.")],
        )

    @classmethod
    def execute(cls, device, gpus, cpu_ranks, ulysses, ring, attention, dtype, timeout_s, cfg_parallel="off",
                shard_weights="auto", vae_split="on", placement="offload", dit_offload="off", compile="off",
                fp8_compute="off", max_step_s=300):
        config = make_config(device, gpus, cpu_ranks, ulysses, ring, attention, dtype, timeout_s, cfg_parallel,
                             shard_weights, vae_split, placement, dit_offload, compile, fp8_compute, max_step_s)
        services.free_comfy_models(services.group_devices(config))  # before the group loads anything
        group = get_group(config)
        services.note_group(group, config)
        return io.NodeOutput(config, "\n".join([f"USP group: {config.describe()}", *services.card_lines(group)]))


def make_config(device, gpus, cpu_ranks, ulysses, ring, attention, dtype, timeout_s, cfg_parallel="off",
                shard_weights="auto", vae_split="on", placement="offload", dit_offload="off", compile="off",
                fp8_compute="off", max_step_s=300) -> GroupConfig:
    if device == "auto":
        device = "cuda" if _cuda_count() else "cpu"
    gpu_list = parse_gpus(gpus, _cuda_count()) if device == "cuda" else ()
    ranks = len(gpu_list) if device == "cuda" else cpu_ranks
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return GroupConfig(ranks=ranks, device=device, gpus=gpu_list, ulysses=parse_degree(ulysses),
                       ring=parse_degree(ring), dtype=dtype, attention=attention, timeout=float(timeout_s),
                       cfg_parallel=2 if parse_bool(cfg_parallel) else 1, shard_weights=shard_weights,
                       vae_split=parse_bool(vae_split), placement=placement, dit_offload=parse_bool(dit_offload),
                       compile=compile, fp8_compute=parse_bool(fp8_compute), max_step_s=float(max_step_s))


class UspFreeGroup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspFreeGroup", display_name="USP Free Group", category=CATEGORY,
            description=("Stops the USP group and frees its memory; the next USP node starts it again. Connect `after` "
                         "to the last output of the generation (the IMAGE, say): without an input, ComfyUI may run "
                         "this node first."),
            search_aliases=["free memory", "unload", "stop group"],
            inputs=[io.AnyType.Input("after", optional=True,
                                     tooltip="Any output; the group is freed once it has been made.")],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, after=None):
        return float("nan")  # always run when queued

    @classmethod
    def execute(cls, after=None):
        free_group()
        services.clear_status()
        return io.NodeOutput()


NODES = [UspGroupNode, UspFreeGroup]

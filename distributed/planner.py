"""Degree planner: which ulysses x ring (x cfg) to use for a model, a video size and a machine.

A small cost model, stated so that it can be checked:
  compute per forward = 2 * tokens * params + 4 * attention_layers * tokens^2 * hidden  (FLOPs)
  sustained throughput per GPU: calibrated so that the model reproduces the published 1-GPU
      times in PUBLISHED, the families' reference_times (Wan 2.1 14B 720p: 1838 s, HunyuanVideo
      720p: 1904 s, both on H100-class GPUs: about 360 TFLOP/s), shared equally by the ranks;
  Ulysses: 4 all-to-alls per attention layer, each rank sending (u-1)/u of its (S/N x hidden)
      shard, at the link's aggregate bandwidth; not overlapped with compute; on PCIe without
      peer-to-peer (LINKS["pcie"]) every byte goes through host memory, whose bandwidth the N
      GPUs share (each collective costs N times one rank's bytes);
  Ring: r-1 K/V passes per attention layer of (S/r x hidden/u) each, at the per-peer bandwidth,
      overlapped with the attention of the previous chunk (a step costs the larger of the two),
      plus the log-sum-exp merge of each block (four fp32 passes over the output in device memory)
      and a fixed latency per pass;
  CFG: with cfg_degree 2 the two passes run on the two halves of the group at once.
The sidecar's own overhead per step (measured by benchmarks/cpu_bench.py) is a few milliseconds
and is left out. Link bandwidths are stated assumptions, listed in LINKS.

The models are the families' (ModelFamily.plan_variants: their shapes, from the configs each family
carries); a model's tokens come from its family's VAE compression and its DiT's patch.

Memory per GPU (what decides whether a plan fits a 24, 48 or 80 GB card): the bf16 weights of the
expert that runs (a whole copy, or 1/N of it with shard_weights on, plus the two blocks FSDP gathers
around the one that runs), plus one step's activations as the engine's pre-flight predicts them
(memory.py: the tokens per rank, the FFN, the Ulysses and ring buffers). The text encoder and the VAE
are not counted: with the group's placement offload the text encoder leaves the GPU before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import memory
from .models import FAMILIES, ModelFamily
from .models.family import PlanVariant
from .parallel.mesh import valid_factorizations

SUSTAINED_FLOPS = 360e12  # per H100-class GPU, bf16, calibrated on the published 1-GPU figures
MEMORY_BW = 2e12  # bytes/s of device memory actually reached by elementwise kernels (H100: 3.35 TB/s peak)
PASS_LATENCY = 20e-6  # seconds of launch/synchronisation per ring pass and per all-to-all
BYTES = 2  # bf16 activations and weights


@dataclass(frozen=True)
class Link:
    aggregate: float  # bytes/s a GPU can send to all peers at once (all-to-all)
    per_peer: float   # bytes/s to one neighbour (ring)
    note: str
    # without peer-to-peer every byte is staged through host memory: the GPUs share that path, so when all ranks
    # send at once (every all-to-all, every ring pass) each gets 1/N of it
    through_host: bool = False

    def seconds(self, bytes_per_rank: float, senders: int, bandwidth: float) -> float:
        """The time of a collective in which `senders` ranks each send bytes_per_rank at once."""
        return bytes_per_rank * (senders if self.through_host else 1) / bandwidth


LINKS = {
    "nvlink": Link(450e9, 450e9, "NVLink 4 + NVSwitch (H100/H800 SXM): ~450 GB/s per GPU"),
    "xgmi": Link(7 * 48e9, 48e9, "AMD MI300X Infinity Fabric: 48 GB/s per peer link, 7 links"),
    "pcie-p2p": Link(25e9, 25e9, "PCIe 4.0 x16 with peer-to-peer (workstation/data-centre cards): ~25 GB/s per GPU"),
    "pcie": Link(12e9, 12e9, "PCIe without peer-to-peer (consumer cards, L20/L40 servers with P2P off): ~12 GB/s "
                             "through host memory, shared by the GPUs", through_host=True),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    heads: int
    hidden: int
    attention_layers: int
    params: float
    text_tokens: int
    joint_text: bool  # text tokens join the video tokens in self-attention (HunyuanVideo)
    default_cfg: float
    ffn: int = 0  # the FFN's width as memory.py counts it (HunyuanVideo: its single blocks' MLP, 1.5x)
    pixel_multiple: int = 16  # width and height of a video must be multiples of this
    pixels_per_token: tuple[int, int] = (16, 16)  # rows, columns: the VAE's compression times the DiT's patch
    frames_per_token: int = 4  # the VAE's 4x in time (1 + 4k frames -> 1 + k) times the DiT's time patch

    def passes(self, cfg: float | None) -> int:
        return 2 if (self.default_cfg if cfg is None else cfg) != 1.0 else 1

    def video_tokens(self, width: int, height: int, frames: int) -> int:
        """Tokens of the DiT for a video of this size."""
        return (((frames - 1) // self.frames_per_token + 1) * (height // self.pixels_per_token[0])
                * (width // self.pixels_per_token[1]))


def model_spec(family: ModelFamily, variant: PlanVariant) -> ModelSpec:
    """A family's released model as the cost model sees it."""
    s = family.spatial_compression
    t, h, w = variant.patch
    return ModelSpec(variant.label, variant.heads, variant.hidden, variant.attention_layers, variant.params,
                     variant.text_tokens, variant.joint_text, family.defaults.cfg_list()[0], variant.ffn,
                     family.pixel_multiple, (s * h, s * w), 4 * t)


def _plannable() -> tuple[dict[str, ModelSpec], dict[str, str], dict[tuple[str, str], dict[int, float]]]:
    """Every family's plan variants by name, the other names they go by (a family's short_name, where it
    has one variant) and their published times; the families say all of it (models/family.py)."""
    specs, aliases, published = {}, {}, {}
    for family in FAMILIES.values():
        for key, variant in family.plan_variants.items():
            if key in specs:
                raise ValueError(f"plan model {key!r} is given by two families")
            specs[key] = model_spec(family, variant)
        if len(family.plan_variants) == 1 and family.short_name not in family.plan_variants:
            aliases[family.short_name] = next(iter(family.plan_variants))
        published.update(family.reference_times)
    return specs, aliases, published


# MODELS: the models `usp-video plan` offers. PUBLISHED: seconds for one video on 1/2/4/8 GPUs, for the
# calibration and the comparison table (each family names its sources).
MODELS, ALIASES, PUBLISHED = _plannable()


def parse_size(size: str, multiple: int) -> tuple[int, int, int]:
    try:
        width, height, frames = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHTxFRAMES, e.g. 1280x720x81, got {size!r}") from None
    if width % multiple or height % multiple or (frames - 1) % 4 or min(width, height, frames) < 1:
        raise ValueError(f"--size {size}: width and height must be multiples of {multiple} and frames 4k+1")
    return width, height, frames


@dataclass
class Plan:
    ulysses: int
    ring: int
    cfg_degree: int
    step_seconds: float
    compute_seconds: float
    ulysses_seconds: float
    ring_seconds: float
    comm_bytes_per_step: float
    weight_gb: float      # per GPU
    activation_gb: float  # per GPU, one step's peak (memory.py)

    @property
    def memory_gb(self) -> float:
        return self.weight_gb + self.activation_gb

    @property
    def label(self) -> str:
        cfg = f" x cfg {self.cfg_degree}" if self.cfg_degree > 1 else ""
        return f"ulysses {self.ulysses} x ring {self.ring}{cfg}"


def plan_one(model: ModelSpec, gpus: int, tokens: int, ulysses: int, ring: int, cfg_degree: int, link: Link,
             cfg: float | None = None, flops: float = SUSTAINED_FLOPS, shard: bool = False) -> Plan:
    seq = tokens + (model.text_tokens if model.joint_text else 0)
    sp = ulysses * ring
    passes = model.passes(cfg)
    forward_flops = 2 * seq * model.params + 4 * model.attention_layers * seq * seq * model.hidden
    attn_flops_layer = 4 * seq * seq * model.hidden
    # each SP group runs passes / cfg_degree forwards per step, split over sp ranks
    forwards = passes / cfg_degree
    compute = forwards * forward_flops / sp / flops
    local = seq / sp * model.hidden * BYTES  # one rank's share of a (tokens x hidden) tensor
    ulysses_bytes = 4 * (ulysses - 1) / ulysses * local * model.attention_layers * forwards
    ulysses_s = (link.seconds(ulysses_bytes, gpus, link.aggregate) + 4 * PASS_LATENCY * model.attention_layers
                 * forwards if ulysses > 1 else 0.0)
    ring_bytes = 2 * (ring - 1) * (seq / ring) * (model.hidden / ulysses) * BYTES * model.attention_layers * forwards
    ring_s = 0.0
    if ring > 1:
        # each of the r-1 passes overlaps with the attention over the chunk in hand
        per_pass_comm = link.seconds(2 * (seq / ring) * (model.hidden / ulysses) * BYTES, gpus, link.per_peer)
        per_pass_attn = attn_flops_layer / sp / ring / flops
        merge = 4 * (seq / sp) * model.hidden * 4 / MEMORY_BW
        ring_s = ((ring - 1) * (max(0.0, per_pass_comm - per_pass_attn) + merge + PASS_LATENCY)
                  * model.attention_layers * forwards)
    step = compute + ulysses_s + ring_s
    weights = model.params * BYTES
    if shard and gpus > 1:  # 1/N each, plus the block that runs and the next, gathered whole
        weights = weights / gpus + 2 * weights / model.attention_layers
    act = memory.step_activation_bytes(seq, model.hidden, model.ffn, passes // cfg_degree, BYTES, sp, ulysses, ring)
    return Plan(ulysses, ring, cfg_degree, step, compute, ulysses_s, ring_s, ulysses_bytes + ring_bytes,
                weights / 1e9, act / 1e9)


def candidates(model: ModelSpec, gpus: int, tokens: int, link: Link, cfg: float | None = None,
               allow_cfg_parallel: bool = False, shard: bool = False) -> list[Plan]:
    """Every valid plan: ulysses divides the heads, ulysses x ring x cfg == gpus, and the
    sequence has at least one token per rank."""
    plans = []
    cfg_degrees = [1]
    if allow_cfg_parallel and model.passes(cfg) == 2 and gpus % 2 == 0:
        cfg_degrees.append(2)
    for cfg_degree in cfg_degrees:
        sp = gpus // cfg_degree
        if tokens < sp:
            continue
        for ulysses, ring in valid_factorizations(sp, model.heads):
            plans.append(plan_one(model, gpus, tokens, ulysses, ring, cfg_degree, link, cfg, shard=shard))
    return plans


def recommend(plans: list[Plan]) -> Plan:
    """The fastest plan; within 2% of it, the one with the largest Ulysses degree (fewest
    sequential ring passes), then without CFG-parallel (less memory per GPU for activations)."""
    best = min(p.step_seconds for p in plans)
    near = [p for p in plans if p.step_seconds <= best * 1.02]
    return max(near, key=lambda p: (p.ulysses, -p.cfg_degree))


def auto_degrees(world_size: int, heads: int, hidden: int, layers: int, params: float,
                 link: str = "nvlink", tokens: int = 32760) -> tuple[int, int]:
    """The (ulysses, ring) the group uses for "auto". On fast all-to-all links (nvlink, xgmi)
    that is Ulysses as large as the heads and ranks allow, Ring for the rest, which is also what
    the cost model recommends there (tests check it for the released models); on pcie the cost
    model decides. CFG-parallel is the user's choice (the group's cfg_parallel option)."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
    if link in ("nvlink", "xgmi"):
        return valid_factorizations(world_size, heads)[0]
    spec = ModelSpec("loaded model", heads, hidden, layers, params, 0, False, 1.0)
    plan = recommend(candidates(spec, world_size, max(tokens, world_size), LINKS[link], cfg=1.0))
    return plan.ulysses, plan.ring


CARD_HEADROOM = 0.9  # of a card's memory a plan may use (CUDA context, allocator fragmentation)


def format_table(model_key: str, gpus: int, size: str, link_name: str, cfg: float | None = None,
                 cfg_parallel: bool = False, card_gb: float | None = None, shard: bool = False) -> str:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if card_gb is not None and not card_gb > 0:
        raise ValueError(f"--card-gb must be > 0 (the GPUs' memory, e.g. 24, 48 or 80), got {card_gb}")
    model_key = ALIASES.get(model_key, model_key)
    model, link = MODELS[model_key], LINKS[link_name]
    width, height, frames = parse_size(size, model.pixel_multiple)
    tokens = model.video_tokens(width, height, frames)
    plans = candidates(model, gpus, tokens, link, cfg, cfg_parallel, shard)
    if not plans:
        return f"no valid plan: {model.name} on {gpus} GPUs with {tokens} tokens"
    usable = None if card_gb is None else card_gb * CARD_HEADROOM
    fitting = [p for p in plans if usable is None or p.memory_gb <= usable]
    choice = recommend(fitting) if fitting else None
    lines = [f"{model.name}, {size} ({tokens} tokens), {gpus} GPU(s), link: {link.note}"
             + (f", {card_gb:g} GB cards" if card_gb is not None else ""),
             f"{'plan':<26}{'step s':>8}{'compute':>9}{'ulysses':>9}{'ring':>7}{'GB/step':>9}"
             f"{'weights GB':>11}{'act GB':>8}{'GB/GPU':>8}"]
    for p in sorted(plans, key=lambda p: p.step_seconds):
        mark = " <- recommended" if p is choice else ""
        if usable is not None and p.memory_gb > usable:
            mark = f" does not fit ({p.memory_gb:.1f} > {usable:.1f} GB usable)"
        lines.append(f"{p.label:<26}{p.step_seconds:>8.2f}{p.compute_seconds:>9.2f}{p.ulysses_seconds:>9.2f}"
                     f"{p.ring_seconds:>7.2f}{p.comm_bytes_per_step / 1e9:>9.1f}{p.weight_gb:>11.1f}"
                     f"{p.activation_gb:>8.1f}{p.memory_gb:>8.1f}{mark}")
    if choice is None:
        smallest = min(plans, key=lambda p: p.memory_gb)
        fixes = []
        if not shard and gpus > 1:
            fixes.append("sharding the weights (--shard-weights; the group's shard_weights on)")
        fixes += ["more GPUs", "a smaller size or fewer frames", "an fp8 model file (about half the weights)",
                  "the group's dit_offload (the weights wait in host memory; not modelled here)"]
        lines.append(f"no plan fits {card_gb:g} GB cards: the smallest needs {smallest.memory_gb:.1f} GB per GPU "
                     f"({smallest.label}: {smallest.weight_gb:.1f} GB of weights, {smallest.activation_gb:.1f} GB of "
                     f"activations). What would help: " + "; ".join(fixes) + ".")
        return "\n".join(lines)
    why = [f"recommended: {choice.label}"]
    if choice.ulysses > 1:
        why.append(f"Ulysses all-to-all costs {choice.ulysses_seconds:.2f} s/step on this link")
    if choice.ring > 1:
        why.append(f"ring {choice.ring} is needed because {model.heads} heads do not split {gpus // choice.cfg_degree} ways"
                   if model.heads % (gpus // choice.cfg_degree) else
                   f"ring passes hide behind attention ({choice.ring_seconds:.2f} s/step exposed)")
    if choice.cfg_degree > 1:
        why.append("CFG-parallel runs the two guidance passes on the two halves of the GPUs "
                   "(the group's cfg_parallel option)")
    lines.append("; ".join(why) + ".")
    lines.append(f"weights sharded over the {gpus} GPUs: each holds {choice.weight_gb:.1f} GB of bf16 weights "
                 "(its share and two gathered blocks)" if shard and gpus > 1 else
                 f"weights are not sharded: each GPU holds {choice.weight_gb:.1f} GB of bf16 weights")
    published = PUBLISHED.get((model_key, f"{width}x{height}x{frames}"))
    if published:
        lines += _compared(published, model, tokens, link, cfg, cfg_parallel)
    return "\n".join(lines)


def _compared(published: dict[int, float], model: ModelSpec, tokens: int, link: Link, cfg: float | None,
              cfg_parallel: bool) -> list[str]:
    """The plan table's lines that set the predictions beside the published seconds per video."""
    lines = ["predicted vs published seconds per video (50 steps, best plan per GPU count):"]
    for n, seconds in published.items():
        best = recommend(candidates(model, n, tokens, link, cfg, cfg_parallel))
        lines.append(f"  {n} GPU(s): predicted {best.step_seconds * 50:7.0f} s ({best.label}), published {seconds} s")
    lines.append("  (the model keeps per-GPU kernel efficiency constant as shards shrink, so it is optimistic "
                 "at 8 GPUs)")
    return lines


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="list valid ulysses x ring (x cfg) plans with predicted step times")
    p.add_argument("--model", required=True, choices=sorted({*MODELS, *ALIASES}))
    p.add_argument("--gpus", required=True, type=int)
    p.add_argument("--size", default="1280x720x81", help="WIDTHxHEIGHTxFRAMES")
    p.add_argument("--link", default="nvlink", choices=sorted(LINKS))
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (1.0 means one pass per step)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="also list plans that split the two CFG passes across GPU halves (the group's cfg_parallel)")
    p.add_argument("--card-gb", type=float, default=None,
                   help="each GPU's memory in GB (24, 48, 80, ...): plans that do not fit are marked, and the "
                        "recommendation is the fastest that fits")
    p.add_argument("--shard-weights", action="store_true", help="the weights sharded over the GPUs (FSDP)")
    p.set_defaults(func=lambda a: print(format_table(a.model, a.gpus, a.size, a.link, a.cfg, a.cfg_parallel,
                                                     a.card_gb, a.shard_weights)))


__all__ = ["MODELS", "ALIASES", "PUBLISHED", "LINKS", "model_spec", "candidates", "recommend", "auto_degrees",
           "format_table", "add_parser"]

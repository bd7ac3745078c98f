"""Published multi-GPU figures, and the planner's predictions for them calibrated on each series' 1-GPU figure alone.

Each series is one publication's times for one model, size and GPU on 1..N GPUs, with the plan it ran (where the
publication says, else the assumption is stated) and the link between its GPUs. The planner's throughput for a
series is the one that reproduces its 1-GPU figure (planner.plan_one on one GPU has no communication, so its time is
inversely proportional to the throughput); every other figure of the series is then predicted, never fitted: the
link bandwidths are planner.LINKS' stated assumptions. `benchmarks/planner_check.py` prints the comparison;
tests/test_planner.py holds the bounds. Per-video figures are compared with steps x the predicted step: the text
encoders and the VAE decode are left out (both run once per video).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import planner


@dataclass(frozen=True)
class Series:
    label: str
    model: str  # a planner.MODELS key
    size: str  # WIDTHxHEIGHTxFRAMES
    gpu: str
    link: str  # a planner.LINKS key
    steps: int
    per: str  # "video" (seconds for one video of `steps` steps) or "step" (seconds per step)
    figures: dict[int, float]  # GPUs -> seconds
    source: str
    cfg: float | None = None  # None: the model's default
    cfg_parallel: bool = False  # the multi-GPU runs split the two CFG passes over two halves of the GPUs
    out_of_sample: tuple[int, ...] = ()  # the GPU counts the issue (#33) names as out-of-sample points
    note: str = ""

    def plan(self, gpus: int) -> tuple[int, int, int]:
        """(ulysses, ring, cfg_degree) the publication ran on `gpus` GPUs: Ulysses over all of them (over each half
        with CFG-parallel)."""
        cfg_degree = 2 if self.cfg_parallel and gpus > 1 else 1
        return gpus // cfg_degree, 1, cfg_degree


SERIES = (
    Series("xDiT HunyuanVideo, H100", "hunyuan", "1280x720x129", "H100 SXM", "nvlink", 50, "video",
           {1: 1904.08, 2: 925.04, 4: 514.08, 8: 337.58},
           "xDiT (xdit-project/xDiT) docs/performance/hunyuanvideo.md, '1280x720 Resolution (129 frames, 50 steps) - "
           "Ulysses Latency'; H100 runs with the official HunyuanVideo repository", out_of_sample=(8,)),
    Series("xDiT HunyuanVideo, H20", "hunyuan", "1280x720x129", "H20", "nvlink", 50, "video",
           {1: 6639.17, 2: 3400.55, 4: 1762.86, 8: 940.97}, "the same xDiT table, H20 row (official HunyuanVideo code)",
           note="not one of the issue's points: the same table's slower card, for comparison"),
    Series("xDiT HunyuanVideo (diffusers implementation), L20", "hunyuan", "1280x720x129", "L20 (PCIe)", "pcie", 50,
           "video", {1: 6043.88, 2: 3271.44, 4: 2080.05},
           "the same xDiT table, L20 row; runs with the diffusers implementation and flash-attn 2.7.2", out_of_sample=(2, 4),
           note="L20 servers: PCIe without NVLink; peer-to-peer assumed off (through host memory)"),
    Series("LightX2V Wan 2.1 I2V 14B 480p, H100", "wan-14b", "832x480x81", "H100 SXM", "nvlink", 40, "step",
           {1: 5.18, 8: 0.75}, "LightX2V (ModelTC/LightX2V), as quoted in issue #33 (per step, 40 steps, with CFG); "
           "not found in the copies of LightX2V's benchmark pages searched here (they list H200 per-video times)", cfg=5.0,
           cfg_parallel=True, out_of_sample=(8,),
           note="I2V costed as the T2V 14B architecture (its image cross-attention adds about 1%); 8 GPUs assumed "
                "CFG-parallel 2 x Ulysses 4"),
    Series("Wan 2.1 T2V 14B 720p, H800/H100", "wan-14b", "1280x720x81", "H800/H100", "nvlink", 50, "video",
           {1: 1838, 2: 945, 4: 497, 8: 288}, "Wan 2.1 repository (Wan-Video/Wan2.1), computational efficiency table, "
           "USP + FSDP"),
)


@dataclass
class Row:
    series: Series
    gpus: int
    published: float
    predicted: float
    plan: str
    best: float = field(default=0.0)  # the planner's fastest plan's prediction
    best_plan: str = ""

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def predict(series: Series) -> tuple[float, list[Row]]:
    """(the throughput calibrated on the series' 1-GPU figure, every figure beside the planner's prediction)."""
    model, link = planner.MODELS[series.model], planner.LINKS[series.link]
    width, height, frames = planner.parse_size(series.size, model.pixel_multiple)
    tokens = model.video_tokens(width, height, frames)
    scale = series.steps if series.per == "video" else 1

    def seconds(gpus, ulysses, ring, cfg_degree, flops):
        plan = planner.plan_one(model, gpus, tokens, ulysses, ring, cfg_degree, link, series.cfg, flops=flops)
        return plan.step_seconds * scale, plan.label

    flops = planner.SUSTAINED_FLOPS * seconds(1, 1, 1, 1, planner.SUSTAINED_FLOPS)[0] / series.figures[1]
    rows = []
    for gpus, published in series.figures.items():
        predicted, label = seconds(gpus, *series.plan(gpus), flops)
        best = planner.recommend(planner.candidates(model, gpus, tokens, link, series.cfg, series.cfg_parallel))
        best_seconds, best_label = seconds(gpus, best.ulysses, best.ring, best.cfg_degree, flops)
        rows.append(Row(series, gpus, published, predicted, label, best_seconds, best_label))
    return flops, rows


def verdict(row: Row) -> str:
    if row.gpus == 1:
        return "calibration"
    if row.gpus not in row.series.out_of_sample:
        return ""
    return "out of sample: " + ("within 10%" if abs(row.error) <= 0.10 else "MISSED (outside 10%)")


def table() -> str:
    """The comparison as text: each series' figures, predictions and errors; the issue's out-of-sample points marked."""
    lines = []
    for series in SERIES:
        flops, rows = predict(series)
        lines.append(f"{series.label}: {planner.MODELS[series.model].name} {series.size}, {series.steps} steps, "
                     f"seconds per {series.per}, link {series.link}; its 1-GPU figure gives {flops / 1e12:.0f} "
                     "TFLOP/s sustained")
        lines.append(f"  source: {series.source}" + (f" ({series.note})" if series.note else ""))
        for row in rows:
            lines.append(f"  {row.gpus} GPU(s): published {row.published:8.2f}  predicted {row.predicted:8.2f} "
                         f"({row.error:+6.1%}, {row.plan}); planner's best {row.best:8.2f} ({row.best_plan})"
                         f"  {verdict(row)}".rstrip())
    return "\n".join(lines)

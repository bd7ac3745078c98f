"""`usp-video plan`: only valid factorizations, for every model and 1-8 GPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from usp_video.distributed import planner

SIZES = ["832x480x81", "1280x720x81", "1280x720x129", "64x48x5", "16x16x1"]


@pytest.mark.parametrize("model_key", sorted(planner.MODELS))
@pytest.mark.parametrize("gpus", range(1, 9))
@pytest.mark.parametrize("link", sorted(planner.LINKS))
@pytest.mark.parametrize("cfg_parallel", [False, True])
def test_recommendation_is_always_valid(model_key, gpus, link, cfg_parallel):
    model = planner.MODELS[model_key]
    for size in SIZES:
        tokens = model.video_tokens(*planner.parse_size(size, 16))
        plans = planner.candidates(model, gpus, tokens, planner.LINKS[link], allow_cfg_parallel=cfg_parallel)
        for plan in plans:
            sp = plan.ulysses * plan.ring
            assert plan.ulysses * plan.ring * plan.cfg_degree == gpus
            assert model.heads % plan.ulysses == 0
            assert tokens >= sp
            assert plan.cfg_degree == 1 or (cfg_parallel and model.passes(None) == 2)
        if tokens >= gpus:
            choice = planner.recommend(plans)
            assert choice in plans and choice.step_seconds <= min(p.step_seconds for p in plans) * 1.02


def test_heads_rule_out_degrees():
    tokens = planner.MODELS["wan-14b"].video_tokens(1280, 720, 81)
    ulysses = {p.ulysses for p in planner.candidates(planner.MODELS["wan-1.3b"], 8, tokens, planner.LINKS["nvlink"])}
    assert 8 not in ulysses and 4 in ulysses  # 12 heads
    ulysses = {p.ulysses for p in planner.candidates(planner.MODELS["hunyuan"], 5, tokens, planner.LINKS["nvlink"])}
    assert ulysses == {1}  # 24 heads: 5 is out, so ring 5
    assert {p.ulysses for p in planner.candidates(planner.MODELS["wan-14b"], 6, tokens,
                                                  planner.LINKS["nvlink"])} == {2, 1}  # 40 heads: 3 and 6 out


def test_prediction_tracks_the_published_single_gpu_figures():
    """SUSTAINED_FLOPS was calibrated on the 1-GPU times: each is within 5% of its model's."""
    for (model_key, size), published in planner.PUBLISHED.items():
        tokens = planner.MODELS[model_key].video_tokens(*planner.parse_size(size, 16))
        one = planner.recommend(planner.candidates(planner.MODELS[model_key], 1, tokens, planner.LINKS["nvlink"]))
        assert abs(one.step_seconds * 50 / published[1] - 1) < 0.05


def _best_seconds(model, gpus, tokens, flops):
    from usp_video.distributed.parallel.mesh import valid_factorizations

    plans = [planner.plan_one(model, gpus, tokens, u, r, 1, planner.LINKS["nvlink"], flops=flops)
             for u, r in valid_factorizations(gpus, model.heads)]
    return 50 * planner.recommend(plans).step_seconds


@pytest.mark.parametrize("key", sorted(planner.PUBLISHED))
def test_calibrated_on_one_gpu_it_predicts_2_and_4_gpus_within_10_percent(key):
    """Calibrated on the published 1-GPU time of each model alone (the throughput that reproduces it), the
    model predicts the published 2- and 4-GPU times, which it never saw, within 10% (docs/reference.md), and is
    optimistic at 8 GPUs, as the planner's table says (it keeps kernel efficiency constant as shards shrink)."""
    model_key, size = key
    published = planner.PUBLISHED[key]
    model = planner.MODELS[model_key]
    tokens = model.video_tokens(*planner.parse_size(size, model.pixel_multiple))
    flops = planner.SUSTAINED_FLOPS * _best_seconds(model, 1, tokens, planner.SUSTAINED_FLOPS) / published[1]
    # the throughput that reproduces this model's 1-GPU time is the one the planner ships, within 5%
    assert flops == pytest.approx(planner.SUSTAINED_FLOPS, rel=0.05)
    for gpus in (2, 4):
        assert abs(_best_seconds(model, gpus, tokens, flops) / published[gpus] - 1) < 0.10, gpus
    assert _best_seconds(model, 8, tokens, flops) < published[8]


@pytest.mark.parametrize("link", ["nvlink", "xgmi"])
def test_fast_links_recommend_the_largest_ulysses_like_auto(link):
    from usp_video.distributed.parallel.mesh import valid_factorizations

    for key, model in planner.MODELS.items():
        for size in ("832x480x81", "1280x720x81", "1280x720x129"):
            tokens = model.video_tokens(*planner.parse_size(size, 16))
            for gpus in range(1, 9):
                choice = planner.recommend(planner.candidates(model, gpus, tokens, planner.LINKS[link]))
                assert (choice.ulysses, choice.ring) == valid_factorizations(gpus, model.heads)[0], (key, size, gpus)
                u, r = planner.auto_degrees(gpus, model.heads, model.hidden, model.attention_layers, model.params, link)
                assert (u, r) == (choice.ulysses, choice.ring)


def test_auto_degrees_on_pcie_is_valid():
    for world in range(1, 9):
        u, r = planner.auto_degrees(world, 12, 1536, 30, 1.4e9, link="pcie")
        assert u * r == world and 12 % u == 0


def test_cli_prints_a_table_and_refuses_bad_sizes():
    ok = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "plan", "--model", "wan-14b",
                         "--gpus", "8", "--size", "1280x720x81"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "<- recommended" in ok.stdout and "published 288 s" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "plan", "--model", "wan-14b",
                          "--gpus", "8", "--size", "1280x721x81"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr


def test_card_memory_marks_the_plans_that_do_not_fit_and_says_what_would_help():
    unsharded = planner.format_table("wan-14b", 2, "832x480x81", "pcie", card_gb=24)
    assert "no plan fits 24 GB cards" in unsharded and "<- recommended" not in unsharded
    assert "sharding the weights" in unsharded and "28.0 GB of weights" in unsharded
    sharded = planner.format_table("wan-14b", 2, "832x480x81", "pcie", card_gb=24, shard=True)
    assert "<- recommended" in sharded and "does not fit" not in sharded
    assert "no plan fits" in planner.format_table("wan-14b", 1, "832x480x81", "pcie", card_gb=24)
    # at 720p the activations decide: the sharded weights alone (15.4 GB) would fit 24 GB cards
    assert "no plan fits 24 GB cards" in planner.format_table("wan-14b", 2, "1280x720x81", "pcie", card_gb=24,
                                                               shard=True)
    roomy = planner.format_table("wan-14b", 2, "832x480x81", "pcie", card_gb=80)
    assert "<- recommended" in roomy and "does not fit" not in roomy
    with pytest.raises(ValueError, match="--card-gb must be > 0"):
        planner.format_table("wan-14b", 2, "832x480x81", "pcie", card_gb=0)


def test_a_plans_memory_is_the_engines_activation_prediction_plus_its_weights():
    from usp_video.distributed.memory import step_activation_bytes

    model = planner.MODELS["wan-14b"]
    tokens = model.video_tokens(1280, 720, 81)
    plan = planner.plan_one(model, 4, tokens, 2, 2, 1, planner.LINKS["nvlink"], cfg=5.0, shard=True)
    assert plan.activation_gb * 1e9 == step_activation_bytes(tokens, 5120, 13824, 2, 2, 4, 2, 2)
    assert plan.weight_gb == pytest.approx(14.0e9 * 2 / 4 / 1e9 + 2 * 28.0 / 40)
    whole = planner.plan_one(model, 4, tokens, 2, 2, 1, planner.LINKS["nvlink"], cfg=5.0)
    assert whole.weight_gb == pytest.approx(28.0) and whole.memory_gb > plan.memory_gb


def test_every_family_is_offered_with_its_own_tokens():
    """`usp-video plan` offers every family's released models (the families say which); TI2V-5B's video is
    32 pixels per token (the Wan 2.2 VAE's 16x16, 2x2 patches), the others' 16; old names keep working."""
    from usp_video.distributed.models import FAMILIES

    offered = {*planner.MODELS, *planner.ALIASES}
    for family in FAMILIES.values():
        assert family.plan_variants and set(family.plan_variants) <= offered, family.name
    assert {"wan-1.3b", "wan-14b", "wan2.2-a14b", "hunyuan", "wan2.2-5b", "wan2.2"} <= offered
    assert planner.MODELS["wan2.2-5b"].video_tokens(1280, 704, 121) == 31 * 22 * 40
    assert planner.MODELS["wan-14b"].video_tokens(1280, 720, 81) == 21 * 45 * 80
    table = planner.format_table("wan2.2-5b", 4, "1280x704x121", "nvlink")
    assert table.startswith("Wan 2.2 TI2V-5B, 1280x704x121 (27280 tokens)") and "<- recommended" in table
    assert planner.format_table("wan2.2", 2, "832x480x81", "pcie") == planner.format_table("wan2.2-a14b", 2,
                                                                                            "832x480x81", "pcie")
    with pytest.raises(ValueError, match="multiples of 32"):
        planner.format_table("wan2.2-5b", 4, "1280x720x121", "nvlink")
    ok = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "plan", "--model", "wan2.2-5b",
                         "--gpus", "2", "--size", "1280x704x121"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "27280 tokens" in ok.stdout, ok.stderr


def test_the_issues_out_of_sample_points_calibrated_on_one_gpu_each(tmp_path):
    """Each published series (distributed/published.py) is calibrated on its own 1-GPU figure alone; the issue's (#33)
    out-of-sample points are predicted, not fitted. Within 10%: xDiT HunyuanVideo on L20 at 2 and 4 GPUs (PCIe without
    peer-to-peer: the host's bandwidth shared by the GPUs; with a per-GPU PCIe link the 4-GPU point is -24%).
    Missed, and printed as missed: the H100 8-GPU points (HunyuanVideo -29%, LightX2V Wan I2V -10.3%): the model
    has no term for what makes 8 NVLink GPUs 70-86% efficient in those publications. benchmarks/planner_check.py
    prints the table and writes its JSON."""
    from usp_video.distributed import published

    within, missed = set(), set()
    for series in published.SERIES:
        flops, rows = published.predict(series)
        assert rows[0].gpus == 1 and rows[0].error == pytest.approx(0, abs=1e-9)
        for row in rows:
            if row.gpus in series.out_of_sample:
                (within if abs(row.error) <= 0.10 else missed).add((series.gpu, series.model, row.gpus))
    assert within == {("L20 (PCIe)", "hunyuan", 2), ("L20 (PCIe)", "hunyuan", 4)}
    assert missed == {("H100 SXM", "hunyuan", 8), ("H100 SXM", "wan-14b", 8)}
    text = published.table()
    assert text.count("out of sample: within 10%") == 2 and text.count("out of sample: MISSED (outside 10%)") == 2
    assert "published  6043.88  predicted  6043.88" in text  # the 1-GPU figure is the calibration
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "planner_check.py"),
                             "--out", str(tmp_path / "planner.json")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "planner.json").read_text())
    l20 = report["xDiT HunyuanVideo (diffusers implementation), L20"]["rows"]
    assert [r["published"] for r in l20] == [6043.88, 3271.44, 2080.05] and abs(l20[2]["error"]) <= 0.10


def test_pcie_without_peer_to_peer_shares_the_hosts_bandwidth():
    """Through host memory, an all-to-all of N ranks costs N times one rank's bytes; NVLink and PCIe P2P do not."""
    model = planner.MODELS["hunyuan"]
    tokens = model.video_tokens(1280, 720, 129)
    through = [planner.plan_one(model, n, tokens, n, 1, 1, planner.LINKS["pcie"]).ulysses_seconds for n in (2, 4)]
    p2p = [planner.plan_one(model, n, tokens, n, 1, 1, planner.LINKS["pcie-p2p"]).ulysses_seconds for n in (2, 4)]
    assert through[1] / through[0] == pytest.approx(1.5, rel=0.01)  # (3/4 x 4) / (1/2 x 2): the bytes of all ranks
    assert p2p[1] / p2p[0] == pytest.approx(0.75, rel=0.02)  # (3/4 x 1/4) / (1/2 x 1/2): one rank's bytes

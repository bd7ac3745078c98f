"""The benchmark scripts run, and the communication they count matches the analytic volumes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from usp_video.distributed.testing.spawn import run_ranks

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

SMALL = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=8, in_channels=16, out_channels=16,
             text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
             eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


@pytest.mark.parametrize("world,ulysses,ring,shape", [(2, 2, 1, (3, 4, 8)), (2, 1, 2, (3, 4, 8)),
                                                      (4, 2, 2, (5, 2, 14)), (3, 1, 3, (5, 2, 14))])
def test_counted_bytes_equal_the_analytic_volumes(world, ulysses, ring, shape):
    from cpu_bench import analytic_bytes, tokens

    ranks = run_ranks(f"{BENCH / 'bench_targets.py'}:bytes_rank", world,
                      dict(config=SMALL, shape=shape, text_len=7, ulysses=ulysses, ring=ring), timeout=180)
    expected = analytic_bytes(world, ulysses, ring, tokens(shape), 96, 2, 64)
    for rank in ranks:
        assert {k: int(v) for k, v in rank.items()} == expected


# What may be skipped on a CPU, each with its reason: the kernels that need a CUDA GPU, and ComfyUI's own model
# without a ComfyUI checkout (or its requirements). Anything else skipped (a time budget, compile, fp8 compute)
# means a section did not measure what it can measure here.
CPU_SKIPS = re.compile(r"skipped: attention '\w+': needs a CUDA GPU|skipped: ComfyUI's own Wan model: "
                       r"(COMFYUI_DIR is not set|its requirements are not installed)")


def assert_gpu_check_smoke_run(stdout: str, report: dict) -> None:
    """Every section that can run on a CPU produced its numbers; only the GPU-only parts skipped, saying why."""
    assert "errors" not in report, report.get("errors")
    skips = [line for line in stdout.splitlines() if "skipped" in line]
    assert all(CPU_SKIPS.match(line) for line in skips), skips
    # 1. kernels: sdpa and math in fp32 and bf16 against the fp64 reference, the ring merge included
    kernels = report["kernels"]
    assert {(r["backend"], r["dtype"]) for r in kernels} == {(b, d) for b in ("sdpa", "math")
                                                             for d in ("float32", "bfloat16")}
    assert all(r["out_rel_err"] < (1e-5 if r["dtype"] == "float32" else 2e-2) and r["lse_max_abs_err"] < 1e-2
               and r["ring_merge_rel_err"] < (1e-5 if r["dtype"] == "float32" else 2e-2) for r in kernels), kernels
    # 2. one forward: stock diffusers and ours with each CPU backend, the same output
    assert [r["model"] for r in report["step"]] == ["stock diffusers", "ours (sdpa)", "ours (math)"]
    assert all(r["forward_s"] > 0 and r["rel_err_vs_stock"] < 1e-5 for r in report["step"]), report["step"]
    # 3. fp8 storage: the same result in fewer bytes
    fp8 = report["fp8"]
    assert fp8["fp8_forward_s"] > 0 and fp8["rel_err"] < 1e-6 and fp8["bytes_ratio"] < 0.9, fp8
    # 4. the 14B fit: 2 models x 2 file dtypes x 2 rank counts, fp8 files lighter than bf16 ones
    fit = report["fit"]
    assert len(fit) == 8 and all(r["weights_gib"] > 0 and r["activations_gib"] > 0 for r in fit), fit
    weights = {(r["model"], r["file"], r["ranks"]): r["weights_gib"] for r in fit}
    assert all(weights[m, "fp8", n] < weights[m, "bf16", n] for m, _, n in weights), weights
    # 5. memory through the engine: predictions at three sizes (a CPU has no device peak to measure: 0)
    memory = report["memory"]
    assert len(memory["activations"]) == 3 and all(r["predicted_gib"] > 0 for r in memory["activations"]), memory
    assert set(memory["experts_held_gib"]) == {"keep", "offload"}
    # 6. kernels and compile (#22): every row measured, compiled blocks exact, fp8 compute near the cast path
    timing = report["kernel_timing"]
    assert len(timing) == 8 and all("forward_s" in r for r in timing), timing
    compiled = [r for r in timing if r["compile"] != "off"]
    assert len(compiled) == 2 and all(r["rel_err_vs_sdpa"] < 1e-6 for r in compiled)
    fp8_rows = [r for r in timing if r["kind"] == "fp8 compute"]
    assert fp8_rows and all(r["fp8_compute_layers"] > 0 and r["rel_err_vs_fp8 weights, cast"] < 1e-2 for r in fp8_rows)
    # 7. ComfyUI's WanModel beside ours where its requirements import, else skipped with the reason (above)
    assert "ours_forward_s" in report["comfyui"] or "skipped" in report["comfyui"], report["comfyui"]
    # 8. ranks sharing the device through gloo: 2 ranks (Ulysses 2, FSDP2) give the one-process output, and their
    # split VAE decode the whole decode
    assert [(r["ranks"], r["ulysses"], r["ring"], r["fsdp"]) for r in report["ranks"]] == [(2, 2, 1, True)]
    assert all("error" not in r and r["within"] and r["rel_err_vs_one_rank"] < 1e-5 and r["vae_split_rel_err"] < 1e-5
               for r in report["ranks"]), report["ranks"]
    for table in ("ranks sharing one device", "ring err", "ours (sdpa)", "fp8 weights (", "GiB/rank", "measured peak", "kernels and compile",
                  "ComfyUI's WanModel"):
        assert table in stdout, table


def test_gpu_check_script_runs_in_smoke_mode(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--small",
                             "--repeats", "1", "--out", str(tmp_path / "gpu.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_gpu_check_smoke_run(result.stdout, json.loads((tmp_path / "gpu.json").read_text()))


def test_memory_bench_runs_and_meets_the_sharding_target(tmp_path):
    import json

    # the load of the Wan DiT only (the HunyuanVideo and Llama loads add 45 s; their loaders are tested in
    # test_streamed.py and test_sharding.py)
    result = subprocess.run([sys.executable, str(BENCH / "memory_bench.py"), "--small", "--load-models", "wan",
                             "--out", str(tmp_path / "memory.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "weights/rank MiB" in result.stdout
    report = json.loads((tmp_path / "memory.json").read_text())
    for run in report["runs"]:
        assert max(run["fraction_of_full"]) <= 1 / run["ranks"] + 0.05
        for vae in ("wan", "hunyuan"):
            assert run[vae]["max_abs_diff_vs_one_rank"] <= 1e-4  # the split VAE decode is exact

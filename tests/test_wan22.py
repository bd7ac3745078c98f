"""Wan 2.2 A14B: two experts of the Wan 2.1 14B architecture, the high-noise one above the boundary.

The one-process run against diffusers' stock
WanTransformer3DModel in a sampling loop written here; the two-sampler layout (USP Sampler Advanced)
against the one-node switch; the loader's checks; the shipped workflows; the CLI. The comparison with
ComfyUI's own Wan model and KSamplerAdvanced is in test_comfyui_native.py (comfyui_reference/wan22.py).
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import rel_error
from parity_targets import forward, inputs, make_engine, wan22_request
from usp_video.distributed.models import FAMILIES
from usp_video.distributed.formats.checkpoint import CheckpointError

FAMILY = FAMILIES["wan2.2-a14b"]
UNEVEN = (5, 2, 14)  # 35 tokens


# -- one process against diffusers' stock classes --------------------------------------------------

def stock_switch_run(experts, request):
    """The switch written out with diffusers' WanTransformer3DModel and its own attention: ComfyUI's
    schedule and noise, the high-noise expert while sigma >= the boundary (timestep >= boundary * 1000,
    as diffusers' WanPipeline decides), Euler steps, CFG per expert."""
    from usp_video.distributed.sampling.denoiser import make_noise
    from usp_video.distributed.models.wan21.dit import load_wan_transformer
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    models = [load_wan_transformer(p) for p in experts]
    sigmas = sampling_sigmas(request.steps, request.shift)
    x = make_noise(tuple(request.latent.shape), request.seed)  # sigma 1: all noise
    pos, neg = request.positive["tokens"], request.negative["tokens"]
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = float(sigmas[i]) * 1000
            which = 0 if t >= request.boundaries[0] * 1000 else 1
            model, cfg = models[which], request.cfg[which]
            v_pos = model(x, torch.tensor([t]), pos, return_dict=False)[0]
            v_neg = model(x, torch.tensor([t]), neg, return_dict=False)[0]
            v = v_neg + cfg * (v_pos - v_neg)
            x = x + v * (sigmas[i + 1] - sigmas[i])  # euler on the flow: x0 = x - sigma * v
    return FAMILY.process_out(x)


def test_one_process_switch_matches_stock_diffusers(experts):
    request = wan22_request(experts, UNEVEN, "euler")
    ours = make_engine().sample(request).latent
    expected = stock_switch_run(experts, request)
    assert rel_error(ours, expected) <= 1e-5
    # both experts shaped it: the run of either one alone is far from it
    for path in experts:
        alone = wan22_request([path], UNEVEN, "euler")
        assert rel_error(make_engine().sample(alone).latent, expected) > 1e-3


def test_forward_of_each_expert_matches_stock_diffusers(experts):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    engine = make_engine()
    for path in experts:
        with torch.no_grad():
            expected = load_wan_transformer(path)(*inputs(FAMILY.name, UNEVEN), return_dict=False)[0]
        assert rel_error(forward(engine, FAMILY.name, path, UNEVEN), expected) <= 1e-6


# -- the two-sampler layout --------------------------------------------------------------------------

def first_step_below(boundary, steps, shift):
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    sigmas = sampling_sigmas(steps, shift)
    return next(i for i in range(steps) if float(sigmas[i]) < boundary)


def test_two_advanced_samplers_equal_the_switch_with_euler(experts):
    from dataclasses import replace

    engine = make_engine()
    whole = engine.sample(wan22_request(experts, UNEVEN, "euler")).latent
    request = wan22_request(experts, UNEVEN, "euler")
    k = first_step_below(request.boundaries[0], request.steps, request.shift)
    assert 0 < k < request.steps
    high = replace(request, experts=[experts[0]], boundaries=[], cfg=request.cfg[0], keep=[experts[1]], end_step=k,
                   leftover_noise=True)
    first = engine.sample(high).latent
    low = replace(request, experts=[experts[1]], boundaries=[], cfg=request.cfg[1], keep=[experts[0]], start_step=k,
                  add_noise=False, latent=first)
    assert rel_error(engine.sample(low).latent, whole) <= 1e-5
    engine.sample(high).latent, engine.sample(replace(low, latent=first)).latent  # the next prompt
    assert engine.load_counts["dit"] == 2  # the layout keeps both experts loaded: no reload between samplers
    # a split one step off the boundary is not the switch
    off = engine.sample(replace(low, start_step=k - 1, latent=engine.sample(replace(high, end_step=k - 1)).latent)).latent
    assert rel_error(off, whole) > 1e-4


def test_shipped_two_sampler_workflow_splits_at_the_boundary():
    from usp_video.workflows import make_workflows

    prompt = json.loads((make_workflows.API_DIR / "wan22_t2v_usp_two_samplers_api.json").read_text())
    high, low = prompt["7"]["inputs"], prompt["11"]["inputs"]
    steps, shift, end, start = high["steps"], high["shift"], high["end_at_step"], low["start_at_step"]
    assert end == start == first_step_below(FAMILY.defaults.boundaries[0], steps, shift)


# -- the loader's checks ------------------------------------------------------------------------------

def _variant(tmp_path, name, **config):
    """A tiny Wan DiT file with some of its config changed."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import save_safetensors
    from usp_video.distributed.models.wan21 import dit as wan
    from usp_video.distributed.models.wan21.tiny import TINY_WAN_CONFIG, wan_to_original_keys

    config = dict(TINY_WAN_CONFIG, **config)
    path = tmp_path / name
    save_safetensors(wan_to_original_keys(WanTransformer3DModel(**config).state_dict()), path,
                     {wan.CONFIG_METADATA_KEY: json.dumps(config)})
    return str(path)


def check(paths):
    from usp_video.distributed import api

    return api.check_model_files(paths, FAMILY.name)


def test_the_experts_load_without_warnings(experts):
    family, warnings = check(experts)
    assert family is FAMILY and warnings == []


@pytest.mark.parametrize("what,make,message", [
    ("swapped", lambda e, t: e[::-1], "is in the high-noise slot but its name says low-noise: swap the two experts"),
    ("same file", lambda e, t: [e[0], e[0]], "the same file is in both expert slots"),
    ("different architectures", lambda e, t: [e[0], _variant(t, "wan2.2_low_noise_wide.safetensors", num_layers=3)],
     "the experts are of different architectures .* differ in num_layers"),
    ("a T2V and an I2V expert", lambda e, t: [e[0], _variant(t, "wan2.2_i2v_low_noise.safetensors", in_channels=36)],
     "differ in in_channels.*both text-to-video, or both image-to-video"),
    ("a 5B file", lambda e, t: [_variant(t, "wan2.2_ti2v_5B.safetensors", in_channels=48, out_channels=48), e[1]],
     "is a Wan 2.2 TI2V-5B model, not Wan 2.2 A14B; load it with the USP Wan 2.2 TI2V-5B loader"),
    ("one file", lambda e, t: e[:1], "two experts \\(high noise, low noise\\); got 1 file"),
])
def test_bad_expert_pairs_are_refused_before_anything_runs(experts, tmp_path, what, make, message):
    with pytest.raises((CheckpointError, ValueError), match=message):
        check(make(experts, tmp_path))


def test_a_hunyuan_file_is_named(experts, tiny_hunyuan):
    with pytest.raises(ValueError, match="is a HunyuanVideo model, not Wan 2.2 A14B"):
        check([experts[0], tiny_hunyuan["dit"]])


def test_names_that_do_not_say_give_a_warning(experts, tmp_path):
    import shutil

    plain = [str(shutil.copy(p, tmp_path / f"expert_{i}.safetensors")) for i, p in enumerate(experts)]
    _, warnings = check(plain)
    assert len(warnings) == 2 and "does not say which expert it is; it runs as the high-noise expert" in warnings[0]
    wan21 = str(shutil.copy(experts[1], tmp_path / "wan2.1_t2v_14B_fp16.safetensors"))
    _, warnings = check([experts[0], wan21])
    assert warnings == ["wan2.1_t2v_14B_fp16.safetensors is named as a Wan 2.1 model; it runs as the Wan 2.2 "
                        "low-noise expert (their tensors look alike)"]


def test_a_diffusers_pipeline_says_which_expert_is_which(experts, tmp_path):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    for sub, path in (("transformer", experts[0]), ("transformer_2", experts[1])):
        load_wan_transformer(path).save_pretrained(tmp_path / "Wan2.2-T2V-A14B-Diffusers" / sub)
    root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    assert check([str(root / "transformer"), str(root / "transformer_2")])[1] == []
    with pytest.raises(CheckpointError, match="swap the two experts"):
        check([str(root / "transformer_2"), str(root / "transformer")])


def test_a_wan22_expert_alone_is_not_taken_for_a_family_of_its_own(experts):
    """Detected from the file alone, an expert is a Wan 2.1 14B-shaped DiT (the Wan 2.1 loader runs it)."""
    from usp_video.distributed import models

    assert models.detect_dit(experts[0]).name == "wan2.1"
    assert models.detect_dit(experts[0], "wan2.2-a14b") is FAMILY


# -- the shipped workflows, through the nodes ----------------------------------------------------------

def tiny_wan22_prompt(name, tiny_wan22, steps=6):
    from usp_video.workflows import make_workflows

    prompt = json.loads((make_workflows.API_DIR / f"{name}_api.json").read_text())
    prompt["1"]["inputs"].update(device="cpu", cpu_ranks=2)
    prompt["2"]["inputs"].update(model_name=Path(tiny_wan22["high_noise"]).name,
                                 low_noise_model_name=Path(tiny_wan22["low_noise"]).name)
    prompt["3"]["inputs"]["text_encoder_name"] = Path(tiny_wan22["text_encoder"]).name
    prompt["8"]["inputs"]["vae_name"] = Path(tiny_wan22["vae"]).name
    prompt["6"]["inputs"].update(width=64, height=48, length=9)
    return prompt


def with_deprecated_nodes(prompt):
    """A shipped Wan 2.2 prompt as an earlier release saved it: the Wan 2.2 loader (expert outputs 1 and 2), the
    UMT5 loader, the Wan 2.2 sampler and the Wan sampler advanced on one expert each."""
    prompt = json.loads(json.dumps(prompt))
    loader = prompt["2"]["inputs"]
    prompt["2"] = {"class_type": "UspWan22ModelLoader", "inputs": {
        "group": loader["group"], "high_noise_model": loader["model_name"],
        "low_noise_model": loader["low_noise_model_name"]}}
    prompt["3"]["class_type"] = "UspTextEncoderLoader"
    prompt["3"]["inputs"] = {k: prompt["3"]["inputs"][k] for k in ("group", "text_encoder_name")}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "UspSampler":
            node["class_type"] = "UspWan22Sampler"
            inputs["cfg_high_noise"] = inputs.pop("cfg")
        elif node["class_type"] == "UspSamplerAdvanced":
            node["class_type"] = "UspWanSamplerAdvanced"
            inputs["model"] = ["2", 1 if inputs.pop("expert") == "high_noise" else 2]
            del inputs["cfg_low_noise"], inputs["boundary"]
    return prompt


def test_workflows_one_switch_equals_two_samplers(tiny_wan22, tmp_path, monkeypatch):
    """The one-node switch and ComfyUI's two-sampler layout (USP Sampler Advanced x2) give the same
    latent with euler, on one group that keeps both experts loaded across the prompts; so do both layouts
    saved with the deprecated Wan 2.2 nodes of earlier releases."""
    from comfy_executor import execute
    from usp_video.distributed.registry import GROUPS, free_group

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_wan22["high_noise"]).parents[1]))
    steps, shift, cfg = 6, 8.0, 3.5
    k = first_step_below(0.875, steps, shift)
    one = tiny_wan22_prompt("wan22_t2v_usp", tiny_wan22)
    one["7"]["inputs"].update(steps=steps, shift=shift, cfg=cfg, cfg_low_noise=cfg, boundary=0.875,
                              sampler_name="euler")
    two = tiny_wan22_prompt("wan22_t2v_usp_two_samplers", tiny_wan22)
    two["7"]["inputs"].update(steps=steps, shift=shift, cfg=cfg, end_at_step=k)
    two["11"]["inputs"].update(steps=steps, shift=shift, cfg=cfg, start_at_step=k)
    try:
        a = execute(one, tmp_path)
        b = execute(two, tmp_path)
        assert rel_error(b["11"][0]["samples"], a["7"][0]["samples"]) <= 1e-5
        old_one = execute(with_deprecated_nodes(one), tmp_path)
        old_two = execute(with_deprecated_nodes(two), tmp_path)
        assert rel_error(old_one["7"][0]["samples"], a["7"][0]["samples"]) <= 1e-5
        assert rel_error(old_two["11"][0]["samples"], a["7"][0]["samples"]) <= 1e-5
        assert b["11"][0]["usp_family"] == "wan2.2-a14b"
        assert a["9"][0].shape == (9, 48, 64, 3) and (tmp_path / "usp_video" / "wan22_00001_.webp").is_file()
        status, _ = GROUPS.current.request({"type": "ping"})
        assert status["load_counts"]["dit"] == 2  # two experts, each loaded once for both prompts
        assert "does not say" not in a["2"][1]  # the loader's info: the tiny names say which expert is which
    finally:
        free_group()


def test_sampler_node_needs_both_experts(tiny_wan22):
    """The deprecated Wan 2.2 sampler refuses one expert (an expert output connected to it); the generic sampler
    refuses the two-expert settings on a one-expert socket."""
    from comfy_executor import call

    with pytest.raises(ValueError, match="needs both experts; connect the 'model' output"):
        call("UspWan22Sampler", model={"experts": ["x"], "info": {}}, positive=None, negative=None, latent_image={},
             seed=0, steps=4, cfg_high_noise=4.0, cfg_low_noise=3.0, shift=12.0, boundary=0.875,
             sampler_name="euler", denoise=1.0)
    one_expert = {"group": None, "path": "x", "experts": ["x"], "info": {"family": "wan2.2-a14b", "model": "x"}}
    with pytest.raises(ValueError, match="cfg_low_noise: x runs one model, not experts"):
        call("UspSampler", model=one_expert, seed=0, steps=4, cfg=4.0, sampler_name="euler", positive=None,
             negative=None, latent_image={}, denoise=1.0, shift=12.0, cfg_low_noise=3.0)


# -- the command line -----------------------------------------------------------------------------------

def test_cli_demo_and_generate_with_both_experts(tmp_path, tiny_wan22):
    import subprocess
    import sys

    demo = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "demo", "--model", "wan2.2",
                           "--models-dir", str(Path(tiny_wan22["vae"]).parents[1]), "--out", str(tmp_path / "d.webp")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "model: Wan 2.2 A14B" in demo.stdout and (tmp_path / "d.webp").stat().st_size > 0
    missing = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "generate", "--model", "wan2.2",
                              "--high-noise", tiny_wan22["high_noise"], "--text-encoder", tiny_wan22["text_encoder"],
                              "--prompt", "a cat"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "Wan 2.2 A14B is made of 2 experts: give --high-noise and --low-noise (missing: --low-noise)" in missing.stderr


def test_boundary_is_compared_as_a_timestep():
    """sigma >= boundary picks the high-noise expert, with a float32 sigma of 0.9 counting as 0.9 (Wan
    compares integer timesteps: 900 >= 900)."""
    from usp_video.distributed.requests import SampleRequest

    request = SampleRequest(experts=["a", "b"], boundaries=[0.9], positive={"tokens": torch.zeros(1, 1, 1)},
                            negative=None, latent=torch.zeros(1), seed=0, steps=1, cfg=1.0, shift=1.0)
    assert float(torch.tensor(0.9, dtype=torch.float32)) < 0.9
    assert request.expert_at(torch.tensor(0.9, dtype=torch.float32)) == 0
    assert request.expert_at(0.8999) == 1 and request.expert_at(0.95) == 0

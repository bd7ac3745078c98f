"""Wan 2.2 TI2V-5B (text to video) and the Wan 2.2 VAE.

The one-process forward (and per-token timesteps) against diffusers' stock model; the start image kept; the
files told apart from Wan 2.1's; bad input; the shipped workflow and the CLI. N ranks against one process:
test_parity.py; the split Wan 2.2 VAE decode: test_vae_split.py.
The comparison with ComfyUI's own Wan 2.2 model, KSampler and VAE is in test_comfyui_native.py.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import rel_error
from parity_targets import forward, inputs, make_engine, masked_forward, request, token_timesteps
from usp_video.distributed.models import FAMILIES
from usp_video.distributed.models.wan22_5b.tiny import tiny_start_image

FAMILY = FAMILIES["wan2.2-ti2v-5b"]
UNEVEN = (5, 2, 14)  # 35 tokens


def ti2v_start_image(shape, batch=1):
    return tiny_start_image(shape, FAMILY.process_out, batch)


def test_files_are_told_apart_from_wan21(tiny_5b, tiny_models):
    from usp_video.distributed import models

    assert models.detect_dit(tiny_5b["dit"]) is FAMILY and models.detect_vae(tiny_5b["vae"]) is FAMILY
    assert models.detect_dit(tiny_models["dit"]).name == "wan2.1"
    assert models.detect_vae(tiny_models["vae"]).name == "wan2.1"


def test_forward_matches_stock_diffusers(tiny_5b):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    with torch.no_grad():
        expected = load_wan_transformer(tiny_5b["dit"])(*inputs(FAMILY.name, UNEVEN), return_dict=False)[0]
    assert expected.shape[1] == 48
    assert rel_error(forward(make_engine(), FAMILY.name, tiny_5b["dit"], UNEVEN), expected) <= 1e-6


def test_per_token_timesteps_match_stock_diffusers(tiny_5b):
    """Under a noise mask the 5B takes a timestep per token (ComfyUI's WAN22.process_timestep: per frame, t x the
    frame's mean mask); our parallelized model gives diffusers' stock one's output for them."""
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    x, _, context = inputs(FAMILY.name, UNEVEN)
    stock = load_wan_transformer(tiny_5b["dit"])
    timesteps = token_timesteps(stock, UNEVEN)
    assert timesteps.shape == (2, 35) and timesteps[0, :7].unique().numel() == 1 and timesteps[0, 6] != timesteps[0, 7]
    with torch.no_grad():
        expected = stock(x, timesteps, context, return_dict=False)[0]
    assert rel_error(masked_forward(make_engine(), tiny_5b["dit"], UNEVEN), expected) <= 1e-6


def test_start_image_frame_is_kept(tiny_5b):
    """Wan22ImageToVideoLatent's LATENT: the first frame (noise_mask 0) comes back as the image's latent, the
    others are sampled, and differ from the text-to-video run."""
    latent, _ = ti2v_start_image(UNEVEN)
    engine = make_engine()
    out = engine.sample(request(FAMILY.name, [tiny_5b["dit"]], UNEVEN, sampler="euler", start_image=True)).latent
    text_only = engine.sample(request(FAMILY.name, [tiny_5b["dit"]], UNEVEN, sampler="euler")).latent
    assert (out[:, :, :1] - latent[:, :, :1]).abs().max() <= 1e-5
    assert (out[:, :, 1:] - text_only[:, :, 1:]).abs().max() > 1e-3


# -- bad input -----------------------------------------------------------------------------------------

def test_wrong_vae_and_sizes_are_named(tiny_5b, tiny_models):
    from usp_video.distributed import api
    from usp_video.distributed.validation import check_latent

    with pytest.raises(ValueError, match="made by a Wan 2.2 TI2V-5B model, but tiny_wan_2.1_vae.safetensors is the "
                                         "Wan 2.1 VAE; pick the Wan 2.2 TI2V-5B VAE"):
        api.decode(None, tiny_models["vae"], torch.zeros(1, 48, 2, 4, 4), family=FAMILY.name)
    with pytest.raises(ValueError, match="made by a Wan 2.1 model, but tiny_wan2.2_vae.safetensors is the "
                                         "Wan 2.2 TI2V-5B VAE"):
        api.decode(None, tiny_5b["vae"], torch.zeros(1, 16, 2, 4, 4), family="wan2.1")
    with pytest.raises(ValueError, match="samples has 16 channels; Wan 2.2 TI2V-5B latents have 48"):
        api.decode(None, tiny_5b["vae"], torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="is 48x32 pixels; width and height must be multiples of 32"):
        check_latent(torch.zeros(1, 48, 2, 2, 3), "latent_image", FAMILY)
    with pytest.raises(ValueError, match="is a Wan 2.2 TI2V-5B model, not Wan 2.1; load it with the USP Wan 2.2 "
                                         "TI2V-5B loader"):
        api.check_model_files([tiny_5b["dit"]], "wan2.1")
    with pytest.raises(ValueError, match="predicts 48 latent channels; a Wan 2.1 DiT predicts 16 .*load it as Wan 2.2 TI2V-5B"):
        api.check_dit_file(tiny_5b["dit"], "wan2.1")  # what the ranks say when asked to load it as Wan 2.1
    with pytest.raises(ValueError, match="tiny_wan2.1_t2v.safetensors is a Wan 2.1 model, not Wan 2.2 TI2V-5B"):
        api.check_model_files([tiny_models["dit"]], FAMILY.name)


def test_bad_noise_masks_are_refused_before_sampling(tiny_5b, tiny_models):
    from usp_video.distributed import api
    from usp_video.nodes.sampler_run import run_sampler

    def request(dit, mask, channels=48):
        return api.SampleRequest(experts=[dit], positive=torch.zeros(1, 4, 32), negative=None, seed=1, steps=2,
                                 cfg=1.0, shift=5.0, latent=torch.zeros(1, channels, 2, 2, 2), noise_mask=mask)

    with pytest.raises(ValueError, match="has a noise_mask .*, and Wan 2.1 samplers do not take one .*use "
                                         "WanImageToVideo.* with an image-to-video model"):
        api.sample(None, request(tiny_models["dit"], torch.ones(1, 1, 2, 2, 2), channels=16))
    with pytest.raises(ValueError, match=r"noise_mask is \(1, 1, 2, 32, 32\) for a latent of \(1, 48, 2, 2, 2\): .* "
                                         r"\[1 or 1, 1 or 48, 2, 2, 2\] .*Wan22ImageToVideoLatent"):
        api.sample(None, request(tiny_5b["dit"], torch.ones(1, 1, 2, 32, 32)))
    with pytest.raises(ValueError, match="noise_mask must hold values in 0..1 .*got 0..2"):
        api.sample(None, request(tiny_5b["dit"], torch.tensor([0.0, 2.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)))
    sent = request(tiny_5b["dit"], ti2v_start_image((2, 2, 2))[1])  # the mask crosses to the ranks
    assert torch.equal(api.SampleRequest.from_frame(*sent.to_frame()).noise_mask, sent.noise_mask)
    # the node passes the LATENT's mask on, so the same refusal reaches the user from a Wan 2.1 sampler
    model = {"group": None, "path": tiny_models["dit"], "info": {"family": "wan2.1", "latent_format": "Wan21"}}
    with pytest.raises(ValueError, match="Wan 2.1 samplers do not take one"):
        run_sampler(model, {"samples": torch.zeros(1, 16, 2, 2, 2), "noise_mask": torch.ones(1, 1, 2, 2, 2)}, None,
                    positive={"tokens": torch.zeros(1, 4, 32)}, negative=None, seed=1, steps=2, cfg=1.0, shift=5.0)


def test_empty_latent_node_checks_sizes():
    """The deprecated empty-latent node and the image-to-video latent node without a start image (its
    replacement, which needs no VAE then): the 5B latent's shape, and sizes it cannot take refused by name."""
    from comfy_executor import call

    latent = call("UspEmptyWan22Latent", width=1280, height=704, length=121)[0]["samples"]
    assert latent.shape == (1, 48, 31, 44, 80)
    with pytest.raises(ValueError, match="width 1000 must be a positive multiple of 32; length 120 must be 4k"):
        call("UspEmptyWan22Latent", width=1000, height=704, length=120)
    (latent,) = call("UspWan22ImageToVideoLatent", vae=None, width=1280, height=704, length=121, batch_size=1)
    assert latent["samples"].shape == (1, 48, 31, 44, 80) and "noise_mask" not in latent
    with pytest.raises(ValueError, match=r"multiples of 32 and length 1 \+ 4k, got 1000x704x120"):
        call("UspWan22ImageToVideoLatent", vae=None, width=1000, height=704, length=120, batch_size=1)


# -- the shipped workflow and the CLI ----------------------------------------------------------------

def test_workflow_runs_through_the_nodes(tiny_5b, tmp_path, monkeypatch):
    from comfy_executor import execute
    from usp_video.distributed.registry import free_group
    from usp_video.workflows import make_workflows

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_5b["dit"]).parents[1]))
    prompt = json.loads((make_workflows.API_DIR / "wan22_ti2v_5b_usp_api.json").read_text())
    prompt["1"]["inputs"].update(device="cpu", cpu_ranks=2)
    prompt["2"]["inputs"]["model_name"] = Path(tiny_5b["dit"]).name
    prompt["3"]["inputs"]["text_encoder_name"] = Path(tiny_5b["text_encoder"]).name
    prompt["8"]["inputs"]["vae_name"] = Path(tiny_5b["vae"]).name
    prompt["6"]["inputs"].update(width=64, height=96, length=5)
    prompt["7"]["inputs"]["steps"] = 3
    # the same graph as an earlier release saved it, with the deprecated TI2V-5B nodes
    old = json.loads(json.dumps(prompt))
    old["2"]["class_type"] = "UspWan22TI2V5BModelLoader"
    del old["2"]["inputs"]["low_noise_model_name"]
    old["3"] = {"class_type": "UspTextEncoderLoader", "inputs": {k: prompt["3"]["inputs"][k]
                                                                 for k in ("group", "text_encoder_name")}}
    old["6"] = {"class_type": "UspEmptyWan22Latent", "inputs": dict(width=64, height=96, length=5, batch_size=1)}
    old["7"]["class_type"] = "UspWan22TI2V5BSampler"
    del old["7"]["inputs"]["cfg_low_noise"], old["7"]["inputs"]["boundary"]
    try:
        results = execute(prompt, tmp_path)
        assert results["7"][0]["samples"].shape == (1, 48, 2, 6, 4)
        assert results["9"][0].shape == (5, 96, 64, 3)
        assert (tmp_path / "usp_video" / "wan22_5b_00001_.webp").is_file()
        assert torch.equal(execute(old, tmp_path)["7"][0]["samples"], results["7"][0]["samples"])
    finally:
        free_group()


def test_cli_demo(tmp_path, tiny_5b):
    import subprocess
    import sys

    demo = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "demo", "--model", "wan2.2-5b",
                           "--models-dir", str(Path(tiny_5b["vae"]).parents[1]), "--out", str(tmp_path / "d.webp")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "model: Wan 2.2 TI2V-5B" in demo.stdout and (tmp_path / "d.webp").stat().st_size > 0


def test_diffusers_folders_are_told_apart_and_load(tiny_5b, tiny_models, tmp_path):
    """A diffusers Wan 2.2 pipeline's transformer/ (48 input channels) and vae/ (the residual Wan 2.2 VAE)
    are this family's; Wan 2.1's folders are not; the folder VAE decodes as the file does."""
    from usp_video.distributed import models
    from usp_video.distributed.models.video import decode_video
    from usp_video.distributed.models.wan21.dit import load_wan_transformer
    from usp_video.distributed.models.wan21.vae import load_wan_vae
    from usp_video.distributed.models.wan22_5b.vae import load_wan22_vae

    load_wan_transformer(tiny_5b["dit"]).save_pretrained(tmp_path / "5b" / "transformer")
    load_wan22_vae(tiny_5b["vae"]).save_pretrained(tmp_path / "5b" / "vae")
    load_wan_transformer(tiny_models["dit"]).save_pretrained(tmp_path / "21" / "transformer")
    load_wan_vae(tiny_models["vae"]).save_pretrained(tmp_path / "21" / "vae")
    assert models.detect_dit(tmp_path / "5b" / "transformer") is FAMILY
    assert models.detect_vae(tmp_path / "5b" / "vae") is FAMILY
    assert models.detect_dit(tmp_path / "21" / "transformer").name == "wan2.1"
    assert models.detect_vae(tmp_path / "21" / "vae").name == "wan2.1"
    z = torch.randn(1, 48, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    folder = decode_video(FAMILY.load_vae(str(tmp_path / "5b" / "vae"), torch.float32, "cpu"), z)
    assert torch.equal(folder, decode_video(load_wan22_vae(tiny_5b["vae"]), z))


def test_usp_image_to_video_latent_node(tiny_5b):
    """USP Wan 2.2 Image To Video Latent on a 2-rank group: the start image (another size and aspect) resized as
    Wan22ImageToVideoLatent does and encoded by the split Wan 2.2 VAE encode (== one process) as the first latent
    frame, the rest the latent format's empty value, the noise_mask 0 there; the 5B sampler keeps that frame."""
    from usp_video.distributed import api
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.models.video import comfy_upscale
    from usp_video.distributed.registry import free_group
    from comfy_executor import call

    image = torch.rand(1, 40, 70, 3, generator=torch.Generator().manual_seed(13))
    group = GroupConfig(ranks=2)
    try:
        (latent,) = call("UspWan22ImageToVideoLatent", vae={"group": group, "path": tiny_5b["vae"]}, width=64,
                         height=32, length=9, batch_size=2, start_image=image)
    finally:
        free_group()
    engine = make_engine()
    start = engine.encode_video(tiny_5b["vae"], comfy_upscale(image.movedim(-1, 1), 64, 32).movedim(1, -1))
    samples, mask = latent["samples"], latent["noise_mask"]
    assert samples.shape == (2, 48, 3, 2, 4) and mask.shape == (2, 1, 3, 2, 4) and latent["usp_family"] == FAMILY.name
    assert float((samples[:, :, :1] - start).abs().max()) <= 1e-4
    assert torch.allclose(samples[:, :, 1:], FAMILY.process_out(torch.zeros(2, 48, 2, 2, 4)))
    assert mask[:, :, 0].max() == 0 and mask[:, :, 1:].min() == 1
    req = request(FAMILY.name, [tiny_5b["dit"]], (3, 2, 4), sampler="euler", steps=2)
    req.latent, req.noise_mask = samples[:1], mask[:1]
    out = engine.sample(req).latent
    assert float((out[:, :, :1] - samples[:1, :, :1]).abs().max()) <= 1e-4  # the start frame stays

"""Wan 2.2 TI2V-5B (text to video) and the Wan 2.2 VAE.

Parity of N ranks against one process (forward and a 4-step run, every degree factorization of 2-4
ranks, uneven tokens); the one-process forward against diffusers' stock model; the split Wan 2.2 VAE
decode against one process; the files told apart from Wan 2.1's; the shipped workflow and the CLI.
The comparison with ComfyUI's own Wan 2.2 model, KSampler and VAE is in test_comfyui_native.py.
"""

import json
from pathlib import Path

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import (make_engine, ti2v_forward, ti2v_image_request, ti2v_inputs, ti2v_masked_forward,
                             ti2v_request, ti2v_start_image, ti2v_token_timesteps)
from usp_video.distributed.models import FAMILIES
from usp_video.distributed.parallel.mesh import valid_factorizations
from usp_video.distributed.parallel.spawn import run_ranks

FAMILY = FAMILIES["wan2.2-ti2v-5b"]
CASES = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, 12)]
UNEVEN = (5, 2, 14)  # 35 tokens: divides none of 2, 3, 4


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory) -> dict:
    return {k: str(v) for k, v in FAMILY.make_tiny(tmp_path_factory.mktemp("wan22_5b")).items()}


def sampler_of(world_size, ulysses):
    return "unipc" if (world_size + ulysses) % 2 else "euler"


def test_files_are_told_apart_from_wan21(tiny_5b, tiny_models):
    from usp_video.distributed import models

    assert models.detect_dit(tiny_5b["dit"]) is FAMILY and models.detect_vae(tiny_5b["vae"]) is FAMILY
    assert models.detect_dit(tiny_models["dit"]).name == "wan2.1"
    assert models.detect_vae(tiny_models["vae"]).name == "wan2.1"


def test_forward_matches_stock_diffusers(tiny_5b):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    x, t, context = ti2v_inputs(UNEVEN)
    with torch.no_grad():
        expected = load_wan_transformer(tiny_5b["dit"])(x, t, context, return_dict=False)[0]
    assert expected.shape[1] == 48
    assert rel_error(ti2v_forward(make_engine(), tiny_5b["dit"], UNEVEN), expected) <= 1e-6


def test_per_token_timesteps_match_stock_diffusers(tiny_5b):
    """Under a noise mask the 5B takes a timestep per token (ComfyUI's WAN22.process_timestep: per frame, t x the
    frame's mean mask); our parallelized model gives diffusers' stock one's output for them."""
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    x, _, context = ti2v_inputs(UNEVEN)
    stock = load_wan_transformer(tiny_5b["dit"])
    timesteps = ti2v_token_timesteps(stock, UNEVEN)
    assert timesteps.shape == (2, 35) and timesteps[0, :7].unique().numel() == 1 and timesteps[0, 6] != timesteps[0, 7]
    with torch.no_grad():
        expected = stock(x, timesteps, context, return_dict=False)[0]
    assert rel_error(ti2v_masked_forward(make_engine(), tiny_5b["dit"], UNEVEN), expected) <= 1e-6


def test_start_image_frame_is_kept(tiny_5b, reference):
    """Wan22ImageToVideoLatent's LATENT: the first frame (noise_mask 0) comes back as the image's latent, the
    others are sampled, and differ from the text-to-video run."""
    latent, _ = ti2v_start_image(UNEVEN)
    out = reference["image_euler"]
    assert (out[:, :, :1] - latent[:, :, :1]).abs().max() <= 1e-5
    assert (out[:, :, 1:] - reference["euler"][:, :, 1:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def reference(tiny_5b):
    return {"forward": ti2v_forward(make_engine(), tiny_5b["dit"], UNEVEN),
            "masked_forward": ti2v_masked_forward(make_engine(), tiny_5b["dit"], UNEVEN),
            **{s: make_engine().sample(ti2v_request(tiny_5b["dit"], UNEVEN, s)) for s in ("unipc", "euler")},
            **{f"image_{s}": make_engine().sample(ti2v_image_request(tiny_5b["dit"], UNEVEN, s))
               for s in ("unipc", "euler")}}


@pytest.fixture(scope="module")
def runs(tests_dir, tiny_5b):
    return Batched(tests_dir, "ti2v_rank", [
        (n, dict(ulysses=u, ring=r, dit_path=tiny_5b["dit"], shape=UNEVEN, sampler=sampler_of(n, u)))
        for n, u, r in CASES], timeout_per_case=120)


@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
def test_parity(runs, tiny_5b, reference, world_size, ulysses, ring):
    sampler = sampler_of(world_size, ulysses)
    results = runs(world_size, ulysses=ulysses, ring=ring, dit_path=tiny_5b["dit"], shape=UNEVEN, sampler=sampler)
    assert torch.isfinite(reference[sampler]).all() and reference[sampler].abs().max() > 0
    for rank, result in enumerate(results):
        err = rel_error(result["forward"], reference["forward"])
        assert err <= 1e-5, f"rank {rank} forward: relative error {err:.2e}"
        err = rel_error(result["latent"], reference[sampler])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} ({sampler})"
        err = rel_error(result["masked_forward"], reference["masked_forward"])
        assert err <= 1e-5, f"rank {rank} forward with per-token timesteps: relative error {err:.2e}"
        err = rel_error(result["image_latent"], reference[f"image_{sampler}"])
        assert err <= 1e-5, f"rank {rank} start image: relative error {err:.2e} ({sampler})"


@pytest.mark.parametrize("world_size,shape", [(2, (2, 4, 6)), (3, (3, 5, 4)), (4, (2, 7, 6))],
                         ids=["2-ranks", "3-ranks-uneven", "4-ranks-uneven"])
def test_split_vae_decode_matches_one_process(tests_dir, tiny_5b, world_size, shape):
    from parity_targets import vae_split_rank

    expected = vae_split_rank(0, 1, tiny_5b["vae"], shape, channels=48)["frames"]
    assert expected.shape == (4 * (shape[0] - 1) + 1, shape[1] * 16, shape[2] * 16, 3)
    results = run_ranks(f"{tests_dir}/parity_targets.py:vae_split_rank", world_size,
                        dict(vae_path=tiny_5b["vae"], shape=shape, channels=48), timeout=240)
    err = float((results[0]["frames"] - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"


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
    with pytest.raises(ValueError, match="is Wan 2.2 TI2V-5B .*, not a Wan 2.1 text- or image-to-video model"):
        api.check_dit_file(tiny_5b["dit"], "wan2.1")  # what the ranks say when asked to load it as Wan 2.1
    with pytest.raises(ValueError, match="tiny_wan2.1_t2v.safetensors is a Wan 2.1 model, not Wan 2.2 TI2V-5B"):
        api.check_model_files([tiny_models["dit"]], FAMILY.name)


def test_bad_noise_masks_are_refused_before_sampling(tiny_5b, tiny_models):
    from usp_video.distributed import api
    from usp_video.nodes.common import run_sampler

    def request(dit, mask, channels=48):
        return api.SampleRequest(experts=[dit], positive=torch.zeros(1, 4, 32), negative=None, seed=1, steps=2,
                                 cfg=1.0, shift=5.0, latent=torch.zeros(1, channels, 2, 2, 2), noise_mask=mask)

    with pytest.raises(ValueError, match="has a noise_mask .*, and Wan 2.1 samplers do not take one .*use "
                                         "WanImageToVideo with an image-to-video model"):
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
    from usp_video.nodes import NODE_CLASS_MAPPINGS as N

    latent = N["UspEmptyWan22Latent"]().generate(1280, 704, 121)[0]["samples"]
    assert latent.shape == (1, 48, 31, 44, 80)
    with pytest.raises(ValueError, match="width 1000 must be a positive multiple of 32; length 120 must be 4k"):
        N["UspEmptyWan22Latent"]().generate(1000, 704, 120)


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
    try:
        results = execute(prompt, tmp_path)
        assert results["7"][0]["samples"].shape == (1, 48, 2, 6, 4)
        assert results["9"][0].shape == (5, 96, 64, 3)
        assert (tmp_path / "usp_video" / "wan22_5b_00001_.webp").is_file()
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
    from usp_video.nodes.i2v_nodes import UspWan22ImageToVideoLatent

    image = torch.rand(1, 40, 70, 3, generator=torch.Generator().manual_seed(13))
    group = GroupConfig(ranks=2)
    try:
        (latent,) = UspWan22ImageToVideoLatent().apply({"group": group, "path": tiny_5b["vae"]}, 64, 32, 9, 2, image)
    finally:
        free_group()
    engine = make_engine()
    start = engine.encode_video(tiny_5b["vae"], comfy_upscale(image.movedim(-1, 1), 64, 32).movedim(1, -1))
    samples, mask = latent["samples"], latent["noise_mask"]
    assert samples.shape == (2, 48, 3, 2, 4) and mask.shape == (2, 1, 3, 2, 4) and latent["usp_family"] == FAMILY.name
    assert float((samples[:, :, :1] - start).abs().max()) <= 1e-4
    assert torch.allclose(samples[:, :, 1:], FAMILY.process_out(torch.zeros(2, 48, 2, 2, 4)))
    assert mask[:, :, 0].max() == 0 and mask[:, :, 1:].min() == 1
    request = ti2v_request(tiny_5b["dit"], (3, 2, 4), "euler", steps=2)
    request.latent, request.noise_mask = samples[:1], mask[:1]
    out = engine.sample(request)
    assert float((out[:, :, :1] - samples[:1, :, :1]).abs().max()) <= 1e-4  # the start frame stays

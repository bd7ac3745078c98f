"""Wan 2.2 Animate (models/wan_animate): N ranks == one process, one process == diffusers' stock
WanAnimateTransformer3DModel, its files and its conditioning's errors. (One process == ComfyUI's own
AnimateWanModel through WanAnimateToVideo + KSampler: comfyui_reference/animate.py; the pack's USP Wan Animate To
Video == WanAnimateToVideo: comfyui_reference/animate_node.py.)

The parity cases run parity_targets.family_case (the harness of test_parity.py) in one spawn per world size: every
factorization of 2, 3 and 4 ranks that the tiny DiT's 12 heads allow, on a latent of 5 frames x 7 tokens (35
tokens: divides none of 2, 3, 4, and every rank's run of tokens starts or ends inside a frame, so the face adapter
must find each token's frame from its place in the whole sequence), the reference frame first; a sample with
WanAnimateToVideo's inputs on both sides (the negative's face -1, cfg 2: both passes in one batch), plus pose and
face videos of other lengths than the latent's and neither (ComfyUI's behaviour without them).
"""

import os

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import family_case
from usp_video.distributed.models import FAMILIES, CheckpointError, check_dit_file
from usp_video.distributed.models.wan_animate.tiny import tiny_animate_conditioning
from usp_video.distributed.parallel.mesh import valid_factorizations

FAMILY = FAMILIES["wan2.2-animate"]
SHAPE = (5, 2, 14)  # 5 latent frames (the reference first) x 1 x 7 tokens
FACTORIZATIONS = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, 12)]


def sampler_of(n: int, u: int) -> str:
    return "unipc" if (n + u) % 2 else "euler"


CASES = [((n, u, r), dict(shape=SHAPE, samples=[{"sampler": sampler_of(n, u)}]))
         for n, u, r in FACTORIZATIONS]
# a pose latent two frames short (the last frames get none), a face video of 5 frames (3 encoded frames: zeros after)
# and of 21 (6 encoded: cut), cfg 1 (one pass); neither pose nor face video (ComfyUI runs without them); a latent
# batch of 2 (the conditioning repeated to it)
# the weights sharded over the ranks (FSDP; the streamed load reads each rank's rows: the motion encoder's
# [1, C, 1, 1] biases are one row)
CASES += [((2, 1, 2), dict(shape=SHAPE, shard_weights="on", samples=[{"sampler": "euler"}]))]
CASES += [((n, u, r), dict(shape=SHAPE, samples=[{"pose_frames": 2, "face_frames": 5}, {"face_frames": 21, "cfg": 1.0},
                                                 {"without": ["pose_video_latent", "face_video_pixels"], "steps": 2},
                                                 {"variant": "batch2", "steps": 2}]))
          for n, u, r in ((3, 3, 1),)]


def case_id(case) -> str:
    (n, u, r), spec = case
    kind = "lengths" if len(spec["samples"]) > 1 else "sharded" if "shard_weights" in spec else "sample"
    return f"{kind}-{n}x{u}x{r}"


@pytest.fixture(scope="module")
def tiny_animate(tmp_path_factory) -> dict:
    return {k: str(v) for k, v in FAMILY.make_tiny(tmp_path_factory.mktemp("animate")).items()}


def with_path(spec: dict, models: dict) -> dict:
    return dict(spec, family=FAMILY.name, experts=[models["dit"]], shape=list(spec["shape"]))


@pytest.fixture(scope="module")
def runs(tests_dir, tiny_animate):
    return Batched(tests_dir, "family_case", [(n, dict(with_path(spec, tiny_animate), ulysses=u, ring=r))
                                              for (n, u, r), spec in CASES], timeout_per_case=150)


@pytest.fixture(scope="module")
def references(tiny_animate):
    made = {}

    def reference(spec):
        spec = {k: v for k, v in spec.items() if k != "shard_weights"}  # against the unsharded one process
        key = repr(spec)
        if key not in made:
            made[key] = family_case(0, 1, **with_path(spec, tiny_animate))
        return made[key]
    return reference


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_n_ranks_equal_one_process(runs, references, tiny_animate, case):
    (n, u, r), spec = case
    expected = references(spec)
    results = runs(n, **with_path(spec, tiny_animate), ulysses=u, ring=r)
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all() and value.abs().max() > 0, key
    for rank, result in enumerate(results):
        for key, value in expected.items():
            if not value.is_floating_point():
                assert torch.equal(result[key], value), f"rank {rank} {key}"
                continue
            err = rel_error(result[key], value)
            assert err <= 1e-5, f"rank {rank} {key}: relative error {err:.2e} ({case_id(case)})"


def test_inputs_change_the_result(references):
    """The pose and face inputs and their lengths count: the length variants differ from the plain sample."""
    plain = references(CASES[0][1])["latent0"]
    lengths = references(CASES[-1][1])
    assert rel_error(lengths["latent0"], plain) > 1e-3


def _stock(path: str, motion_512: bool):
    """diffusers' stock WanAnimateTransformer3DModel holding the file's tensors: through diffusers' own single-file
    conversion (ComfyUI's 512 motion encoder), or ours for the small encoders (diffusers' knows the 512 one only)."""
    import json

    from diffusers import WanAnimateTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    from usp_video.distributed.models.wan_animate import dit

    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()[dit.CONFIG_METADATA_KEY])
    state = load_file(path)
    if motion_512:
        state = {k: v for k, v in convert_wan_transformer_to_diffusers(state).items() if not k.endswith(".kernel")}
    else:
        state = {k: v.reshape(-1) if k.endswith("act_fn.bias") else v for k, v in dit.convert(state).items()}
    model = WanAnimateTransformer3DModel(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("role", ["dit", "dit_comfy"])
def test_one_process_equals_diffusers(tiny_animate, role):
    """Our engine's DiT (ComfyUI's forward over diffusers' modules) == diffusers' stock class on the inputs both
    take: the pose latent one frame shorter than the latent, a face video whose encoded frames (+ the zero frame)
    are the latent's."""
    from parity_targets import make_engine

    path = tiny_animate[role]
    model = make_engine().dit(path, FAMILY.name)
    stock = _stock(path, role == "dit_comfy")
    size, (frames, h, w) = model.config.motion_encoder_size, ((5, 2, 6) if role == "dit" else (2, 2, 4))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 36, frames, h, w, generator=g)
    text = torch.randn(1, 512, model.config.text_dim, generator=g)
    clip = torch.randn(1, 257, 1280, generator=g)
    pose = torch.randn(1, 16, frames - 1, h, w, generator=g)
    face = torch.rand(1, 3, max(4 * (frames - 1) - 3, 1), size, size, generator=g) * 2 - 1
    t = torch.tensor([640.0])
    with torch.no_grad():
        expected = stock(x, t, text, clip, pose, face, return_dict=False)[0]
        ours = model(x, t, text, encoder_hidden_states_image=clip, pose_latents=pose, face_pixel_values=face,
                     return_dict=False)[0]
    assert rel_error(ours, expected) <= 1e-5


def test_files_and_errors(tiny_animate, tiny_models):
    assert check_dit_file(tiny_animate["dit_comfy"])[0] is FAMILY
    with pytest.raises(CheckpointError, match="Wan 2.2 Animate"):
        check_dit_file(tiny_animate["dit"], "wan2.1")
    with pytest.raises(CheckpointError):  # a Wan 2.1 file is not an Animate one
        check_dit_file(tiny_models["dit"], FAMILY.name)
    from usp_video.distributed.validation import check_conditioning

    cond = tiny_animate_conditioning(SHAPE)
    check_conditioning(cond, "positive", FAMILY)
    with pytest.raises(ValueError, match="pose_video_latent come from WanAnimateToVideo"):  # a non-Animate model refuses them
        check_conditioning(cond, "positive", FAMILIES["wan2.1"])
    with pytest.raises(ValueError, match="face_video_pixels"):
        check_conditioning(dict(cond, face_video_pixels=cond["face_video_pixels"][:, :1]), "positive", FAMILY)
    from parity_targets import make_engine

    model = make_engine().dit(tiny_animate["dit"], FAMILY.name)
    latent = (1, 16, *SHAPE)
    with pytest.raises(ValueError, match="CLIPVisionEncode"):
        FAMILY.model_conditioning(model, {k: v for k, v in cond.items() if k != "clip_vision"}, latent, "positive")
    with pytest.raises(ValueError, match="16x16"):
        FAMILY.model_conditioning(model, tiny_animate_conditioning(SHAPE, face_size=32), latent, "positive")
    with pytest.raises(ValueError, match="step caches"):
        FAMILY.step_cache_spec(model, latent)


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: no ComfyUI checkout to compare with")
def test_one_process_equals_comfyui(tiny_animate):
    """ComfyUI 0.3.64's UNETLoader (detected as WAN22_Animate, the file loaded strictly), WanAnimateToVideo (reference,
    pose and face videos; -1 face on the negative) and KSampler (euler, one step, cfg 2), fp32, against our engine
    given the node's tensors; our generic USP Sampler given its conditioning without the face video (the face
    changes ComfyUI's result), TrimVideoLatent on both; our engine without pose and face video; its native MODEL
    maps to our family (comfyui_reference/animate.py)."""
    from test_comfyui_native import run_reference

    result = run_reference("animate", tiny_animate)
    assert result["comfy_model_class"] == "WAN22_Animate" and result["comfy_face_adapter_blocks"] == 2
    assert result["latent_shape"] == [1, 16, 3, 4, 4]  # the reference frame, then (5 - 1) / 4 + 1 frames
    assert result["pose_shape"] == [1, 16, 2, 4, 4] and result["face_shape"] == [1, 3, 5, 512, 512]
    assert result["negative_face_is_minus_one"]
    assert (result["trim_latent"], result["trim_image"], result["offset"]) == (1, 0, 5)
    assert result["trimmed_shape"] == [1, 16, 2, 4, 4]
    assert result["face_changes_result"] > 1e-3
    assert result["native_family"] == FAMILY.name
    for what in ("ksampler_engine", "ksampler_generic_nodes", "trimmed", "no_pose_no_face_engine"):
        assert result[what] <= 1e-5, f"{what}: relative error {result[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def node_comparison(tiny_animate):
    from test_comfyui_native import run_reference

    return run_reference("animate_node", tiny_animate)


ANIMATE_NODE_CASES = ["nothing", "reference_only", "pose_face", "replacement", "offset", "offset_past_the_videos",
                      "continue_motion", "continue_one_frame_one_mask", "two_reference_frames"]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: no ComfyUI checkout to compare with")
@pytest.mark.parametrize("case", ANIMATE_NODE_CASES)
def test_node_equals_comfyuis_wan_animate_to_video(node_comparison, case):
    """The pack's USP Wan Animate To Video (our split VAE encode) == ComfyUI 0.3.64's WanAnimateToVideo (its WanVAE
    built at the tiny width) on the same inputs: both conditionings' every value (VAE latents within 1e-5; masks,
    face pixels, text, CLIP vision equal), the LATENT and trim_latent / trim_image / video_frame_offset; with and
    without pose, face, background video and character mask, offsets into the videos (and past them), continued
    motion (5 frames and 1, a one-frame mask), a batch of 2, a reference of 5 frames; the node's inputs unchanged
    (comfyui_reference/animate_node.py)."""
    assert sorted(node_comparison) == sorted(ANIMATE_NODE_CASES)
    result = node_comparison[case]
    assert result["counts"][0] == result["counts"][1], result["counts"]
    for ours, native in result["keys"]:
        assert ours == native
    assert result["exact"] and result["latent_equal"] and result["inputs_unchanged"]
    assert result["latent_rel"] <= 1e-5, f"{case}: relative error {result['latent_rel']:.2e} against ComfyUI"
    expected = {  # what the cases are there for: the inputs reach the conditioning
        "nothing": (["clip_vision_output", "concat_latent_image", "concat_mask"], [1, 0, 5]),
        "replacement": (["clip_vision_output", "concat_latent_image", "concat_mask", "face_video_pixels",
                         "pose_video_latent"], [1, 0, 9]),
        "offset_past_the_videos": (["clip_vision_output", "concat_latent_image", "concat_mask"], [1, 0, 16]),
        "continue_motion": (None, [1, 5, 13]),
        "continue_one_frame_one_mask": (None, [1, 1, 21]),
        "two_reference_frames": (None, [2, 0, 9]),
    }.get(case)
    if expected:
        keys, counts = expected
        assert keys is None or result["keys"][0][1] == keys
        assert result["counts"][1] == counts, result["counts"]
    if case in ("replacement", "offset", "continue_motion"):
        assert 0.0 < result["mask_mean"] < 1.0  # the character mask is placed


def test_node_on_our_encode_and_its_refusals(tiny_animate, monkeypatch):
    """USP Wan Animate To Video outside ComfyUI (its standin schema), our VAE encode in this process: a pose and a face
    video, continued motion; the LATENT and counts as WanAnimateToVideo's. Refused with what to do: a Wan 2.2 VAE
    (48 channels: load wan_2.1_vae), a size that is no multiple of 16 or a length that is not 1 + 4k."""
    from comfyui_reference.common import run_node
    from parity_targets import make_engine
    from usp_video.distributed import api

    engine = make_engine()
    monkeypatch.setattr(api, "encode_video", lambda group, vae, frames, on_progress=None: (
        engine.encode_video(vae, frames), "wan2.1"))
    g = torch.Generator().manual_seed(3)
    text = [[torch.randn(1, 7, 32, generator=g), {}]]
    inputs = dict(positive=text, negative=text, vae={"group": None, "path": tiny_animate["vae"]}, width=32, height=16,
                  length=9, batch_size=1, continue_motion_max_frames=5, video_frame_offset=6,
                  reference_image=torch.rand(1, 20, 30, 3, generator=g), pose_video=torch.rand(12, 16, 32, 3, generator=g),
                  face_video=torch.rand(12, 24, 24, 3, generator=g), continue_motion=torch.rand(5, 16, 32, 3, generator=g))
    positive, negative, latent, trim_latent, trim_image, offset = run_node("UspWanAnimateToVideo", **inputs)
    assert latent["samples"].shape == (1, 16, 4, 2, 4) and (trim_latent, trim_image, offset) == (1, 5, 10)
    made = positive[0][1]
    assert made["concat_latent_image"].shape == (1, 16, 4, 2, 4) and made["concat_mask"].shape == (1, 4, 4, 2, 4)
    assert made["pose_video_latent"].shape == (1, 16, 3, 2, 4)  # 11 frames from frame 1, 9 used
    assert made["face_video_pixels"].shape == (1, 3, 9, 512, 512) and (negative[0][1]["face_video_pixels"] == -1).all()
    assert text == [[text[0][0], {}]]  # the input conditioning unchanged
    monkeypatch.setattr(api, "encode_video", lambda group, vae, frames, on_progress=None: (
        torch.zeros(1, 48, 1, 1, 2), "wan2.2-ti2v-5b"))
    with pytest.raises(ValueError, match="wan_2.1_vae.safetensors"):
        run_node("UspWanAnimateToVideo", **inputs)
    for bad in (dict(width=40), dict(length=8)):
        with pytest.raises(ValueError, match="multiples of 16 and length 1 \\+ 4k"):
            run_node("UspWanAnimateToVideo", **dict(inputs, **bad))


def test_cli_demo(tmp_path, tiny_animate):
    """`usp-video demo --model wan2.2-animate`: the tiny set on 2 CPU ranks, with synthetic reference, pose and face
    inputs made in code (WanAnimate.demo_conditioning)."""
    import subprocess
    import sys
    from pathlib import Path

    demo = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "demo", "--model", FAMILY.short_name,
                           "--models-dir", str(Path(tiny_animate["vae"]).parents[1]), "--out", str(tmp_path / "d.webp")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "model: Wan 2.2 Animate" in demo.stdout and (tmp_path / "d.webp").stat().st_size > 0


def test_diffusers_folder(tmp_path, tiny_animate):
    """A diffusers WanAnimateTransformer3DModel folder is detected and loads into the same model as the file."""
    from parity_targets import make_engine

    stock = _stock(tiny_animate["dit"], False)
    stock.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    assert check_dit_file(tmp_path / "transformer")[0] is FAMILY
    engine = make_engine()
    ours = engine.dit(str(tmp_path / "transformer"), FAMILY.name)
    from_file = engine.dit(tiny_animate["dit"], FAMILY.name)
    cond = FAMILY.model_conditioning(ours, tiny_animate_conditioning(SHAPE), (1, 16, *SHAPE), "positive")
    x = torch.randn(1, 16, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = (FAMILY.velocity(m, x, torch.tensor([500.0]), cond, {}) for m in (ours, from_file))
    assert rel_error(a, b) <= 1e-6


def test_config_read_from_the_shapes(tmp_path, tiny_animate):
    """A file without our metadata (as Comfy-Org's is): the config read from its shapes (128-wide heads, the
    encoders' sizes) is the one it was made with."""
    from safetensors.torch import load_file, save_file

    from usp_video.distributed.models.wan_animate.tiny import CONFIGS, _config

    bare = tmp_path / "wan2.2_animate_14B_bf16.safetensors"
    save_file(load_file(tiny_animate["dit_comfy"]), str(bare))
    family, config = check_dit_file(bare)
    made = _config(CONFIGS["dit_comfy"])
    assert family is FAMILY
    assert {k: config[k] for k in made} == made
    assert config["motion_encoder_size"] == 512 and config["face_encoder_hidden_dim"] == 1024


def test_cfg_parallel(tests_dir, tiny_animate):
    """CFG-parallel (cfg degree 2 on 2 ranks: each pass on its own rank, each with its own face video, the
    negative's -1) == one process."""
    from parity_targets import make_engine, request
    from usp_video.distributed.testing.spawn import run_ranks

    expected = make_engine().sample(request(FAMILY.name, [tiny_animate["dit"]], SHAPE, cfg=3.0)).latent
    results = run_ranks(f"{tests_dir}/parity_targets.py:cfg_parallel_sample_rank", 2,
                        dict(ulysses=1, ring=1, dit_path=tiny_animate["dit"], family=FAMILY.name, cfg=3.0), timeout=240)
    for rank, result in enumerate(results):
        assert rel_error(result["latent"], expected) <= 1e-5, f"rank {rank}"


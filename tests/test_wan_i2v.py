"""Wan image to video on N ranks: Wan 2.1 I2V (start video + CLIP vision through its image embedder) and
Wan 2.2 I2V A14B (two 36-channel experts, no CLIP vision), from the conditioning native WanImageToVideo makes.
One process against diffusers' stock model; the inputs that do not fit refused before sampling. N ranks
(uneven tokens) against one process: test_parity.py. Against ComfyUI's own WanImageToVideo + KSampler:
tests/comfyui_reference/i2v.py (test_comfyui_native.py)."""

import json

import pytest
import torch

from conftest import rel_error
from parity_targets import image_forward, image_request, make_engine
from usp_video.distributed.models.wan21 import dit as wan
from usp_video.distributed.models.wan21.tiny import tiny_image_conditioning

UNEVEN = (3, 4, 6)  # 18 tokens


@pytest.mark.parametrize("role", ["dit_i2v", "dit_fun_control"])
def test_wan21_i2v_forward_equals_diffusers_stock_model(tiny_models, role):
    """Our processor splits the CLIP vision tokens by their count; diffusers' own assumes 512 text tokens, so the
    stock model is the reference with a 512-token text. Wan 2.1 I2V (the Fun InP layout too) and Fun Control (the
    control and start videos beside the noise: 48 input channels)."""
    from diffusers import WanTransformer3DModel

    engine = make_engine()
    request = image_request([tiny_models[role]], UNEVEN, fun_control=role == "dit_fun_control")
    request.positive["tokens"] = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(8))
    ours = image_forward(engine, request)
    stock = WanTransformer3DModel(**json.loads(json.dumps(wan.infer_wan_config(
        __import__("pathlib").Path(tiny_models[role]), *wan.read_header(tiny_models[role])))))
    stock.load_state_dict(wan.load_wan_transformer(tiny_models[role]).state_dict())
    dit = engine.load_dit(tiny_models[role])
    assert stock.config.in_channels == (48 if role == "dit_fun_control" else 36)
    cond = dit.family.model_conditioning(dit.module, request.positive, tuple(request.latent.shape), "positive")
    x = torch.randn(tuple(request.latent.shape), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = stock(torch.cat([x, cond["concat"]], dim=1), torch.tensor([700.0]), cond["tokens"],
                         encoder_hidden_states_image=cond["clip_vision"], return_dict=False)[0]
    assert rel_error(ours, expected) <= 1e-5
    # the image matters: without the CLIP vision tokens' attention the output differs
    assert dit.module.blocks[0].attn2.add_k_proj is not None


def test_the_start_video_is_used(tiny_models):
    """The start video and the CLIP vision features change the video (a model that ignored them would pass the
    parity tests)."""
    engine = make_engine()
    base = engine.sample(image_request([tiny_models["dit_i2v"]], UNEVEN)).latent
    for key in ("concat_latent_image", "clip_vision"):  # other values (a scale alone: the embedder's LayerNorm)
        request = image_request([tiny_models["dit_i2v"]], UNEVEN)
        other = torch.randn(request.positive[key].shape, generator=torch.Generator().manual_seed(9))
        for side in (request.positive, request.negative):
            side[key] = other
        assert rel_error(engine.sample(request).latent, base) > 1e-3, key


@pytest.mark.parametrize("case,message", [
    ("no image", "this is an image-to-video model and has no start image: connect WanImageToVideo"),
    ("no clip vision", "Wan 2.1 I2V needs the start image's CLIP vision features"),
    ("t2v given an image", "carries a start image .* and this is a text-to-video model"),
    ("wan22 given clip vision", "takes no CLIP vision features: disconnect clip_vision_output"),
    ("other length", "concat_latent_image is .*make both with the same width, height and length"),
    ("clip vision width", "clip_vision has width 768"),
    ("fun control without its videos", "this is a Fun Control model and has no start image: connect WanFunControlToVideo"),
    ("fun control given WanImageToVideo's", "concat_latent_image has 16 channels; this DiT takes 32 beside the noise: "
                                            "make the conditioning with WanFunControlToVideo"),
    ("reference without ref_conv", "carries a reference image .*this model has no reference-image input"),
    ("reference of another size", "reference_latent is .*make the reference image at the video's width and height"),
])
def test_image_inputs_that_do_not_fit_are_refused(case, message, tiny_models, wan22_i2v, tiny_wan22):
    experts, family = [tiny_models["dit_i2v"]], None
    request = image_request(experts, UNEVEN)
    if case == "no image":
        request.positive = {"tokens": request.positive["tokens"]}
    elif case == "no clip vision":
        del request.positive["clip_vision"]
    elif case == "t2v given an image":
        request.experts = [tiny_models["dit"]]
    elif case == "wan22 given clip vision":
        request.experts, request.boundaries, family = wan22_i2v, [0.9], "wan2.2-a14b"
    elif case == "other length":
        request.positive["concat_latent_image"] = request.positive["concat_latent_image"][:, :, :2]
    elif case == "clip vision width":
        request.positive["clip_vision"] = torch.zeros(1, 257, 768)
    elif case == "fun control without its videos":
        request.experts, request.positive = [tiny_models["dit_fun_control"]], {"tokens": request.positive["tokens"]}
    elif case == "fun control given WanImageToVideo's":
        request.experts = [tiny_models["dit_fun_control"]]
    elif case == "reference without ref_conv":
        request.positive["reference_latent"] = torch.zeros(1, 16, 1, *UNEVEN[1:])
    elif case == "reference of another size":
        request = image_request([tiny_wan22["fun_control_high_noise"], tiny_wan22["fun_control_low_noise"]], UNEVEN,
                                clip_vision=False, fun_control_a14b=True)
        request.positive["reference_latent"] = torch.zeros(1, 16, 1, 2, 2)
        family = "wan2.2-a14b"
    request.family = family
    with pytest.raises(ValueError, match=message):
        make_engine().sample(request).latent


def test_fun_control_and_ti2v_5b_files_told_apart(tmp_path):
    """Wan 2.1 Fun Control and Wan 2.2 TI2V-5B both take 48 input channels: the output channels (16, 48) tell
    them apart, from the file's shapes alone (no config in the metadata), as ComfyUI's detection does."""
    from diffusers import WanTransformer3DModel

    from usp_video.distributed.formats.checkpoint import save_safetensors
    from usp_video.distributed.models import CheckpointError, check_dit_file
    from usp_video.distributed.models.wan21.tiny import wan_to_original_keys

    def write(name, **config):  # the released variants' width and depth (meta tensors: shapes only, zeros written)
        with torch.device("meta"):
            model = WanTransformer3DModel(**config)
        state = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in wan_to_original_keys(model.state_dict()).items()
                 if k.startswith(("patch_embedding", "head.", "blocks.0.", "blocks.29.", "img_emb"))}
        save_safetensors(state, tmp_path / name, {})
        return tmp_path / name

    fun = write("fun_control.safetensors", **dict(wan.WAN_VARIANTS["wan2.1-t2v-1.3b"], in_channels=48,
                                                   image_dim=1280, added_kv_proj_dim=1536))
    family, config = check_dit_file(fun)
    assert (family.name, config["in_channels"], config["out_channels"], config["image_dim"]) == ("wan2.1", 48, 16, 1280)
    with pytest.raises(CheckpointError, match="is Wan 2.1 Fun Control .*not Wan 2.2 TI2V-5B"):
        check_dit_file(fun, "wan2.2-ti2v-5b")
    five = write("ti2v_5b.safetensors", **wan.WAN_VARIANTS["wan2.2-ti2v-5b"])
    assert check_dit_file(five)[0].name == "wan2.2-ti2v-5b"
    with pytest.raises(CheckpointError, match="predicts 48 latent channels; a Wan 2.1 DiT predicts 16"):
        check_dit_file(five, "wan2.1")


def test_a_fun_camera_model_is_refused_by_name(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from usp_video.distributed.models import CheckpointError, check_dit_file

    state = load_file(tiny_models["dit_fun_control"])
    state["control_adapter.conv.weight"] = torch.zeros(96, 24, 2, 2)
    save_file(state, str(tmp_path / "camera.safetensors"))
    with pytest.raises(CheckpointError, match="camera.safetensors is a Wan Fun camera-control model"):
        check_dit_file(tmp_path / "camera.safetensors")


def test_wan22_i2v_expert_refused_by_the_wan21_loader(wan22_i2v):
    from usp_video.distributed.models import CheckpointError, check_dit_file

    with pytest.raises(CheckpointError, match="is Wan 2.2 I2V A14B .* load it with the Wan 2.2 A14B loader"):
        check_dit_file(wan22_i2v[0], "wan2.1")


def wan_conditioning(conditioning, name):
    """A CONDITIONING as the samplers read it for a Wan 2.1 model (the cond dict; Wan sets no option)."""
    from usp_video.distributed import models
    from usp_video.nodes.conditioning import family_conditioning

    cond, options = family_conditioning(conditioning, name, models.get("wan2.1"))
    assert options == {}
    return cond


def test_native_image_conditioning_reaches_the_request():
    """The Wan samplers read native WanImageToVideo / CLIPVisionEncode conditioning (a ClipVisionOutput's
    penultimate_hidden_states)."""
    from types import SimpleNamespace

    cond = tiny_image_conditioning(UNEVEN)
    vision = SimpleNamespace(penultimate_hidden_states=cond["clip_vision"], image_embeds=torch.zeros(1, 1024))
    native = [[cond["tokens"], {"pooled_output": None, "concat_latent_image": cond["concat_latent_image"],
                                "concat_mask": cond["concat_mask"], "clip_vision_output": vision}]]
    out = wan_conditioning(native, "positive")
    assert set(out) == {"tokens", "concat_latent_image", "concat_mask", "clip_vision"}
    assert out["clip_vision"] is cond["clip_vision"]
    with pytest.raises(ValueError, match="no penultimate_hidden_states"):
        wan_conditioning([[cond["tokens"], {"clip_vision_output": object()}]], "positive")


def test_usp_image_to_video_node_gives_what_wanimagetovideo_gives(tiny_models):
    """USP Wan Image To Video on a 2-rank group: the start image resized and padded with gray frames as
    WanImageToVideo does, encoded by the split VAE encode (== one process), its mask on the start frame, set on
    both conditionings with the CLIP vision output; then the tiny Wan 2.1 I2V samples from them."""
    from types import SimpleNamespace

    from usp_video.distributed import api
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.registry import free_group
    from comfy_executor import call
    from usp_video.distributed.models.video import start_video

    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 40, 60, 3, generator=g)  # another size and aspect than the 48x32 video
    vision = SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    text = [[torch.randn(1, 24, 32, generator=g), {"pooled_output": None}]]
    group = GroupConfig(ranks=2)
    try:
        positive, negative, latent = call("UspWanImageToVideo", positive=text, negative=text,
                                          vae={"group": group, "path": tiny_models["vae"]}, width=48, height=32,
                                          length=5, batch_size=1, start_image=image, clip_vision_output=vision)
    finally:
        free_group()
    video = start_video(image, 48, 32, 5)
    assert video.shape == (5, 32, 48, 3) and torch.equal(video[1:], torch.full((4, 32, 48, 3), 0.5))
    expected = make_engine().encode_video(tiny_models["vae"], video)
    extra = positive[0][1]
    assert float((extra["concat_latent_image"] - expected).abs().max()) <= 1e-4
    assert extra["concat_mask"].shape == (1, 1, 2, 4, 6) and extra["concat_mask"][:, :, 0].sum() == 0
    assert extra["concat_mask"][:, :, 1].min() == 1 and extra["clip_vision_output"] is vision
    assert negative[0][1]["concat_latent_image"] is extra["concat_latent_image"] and "concat_mask" not in text[0][1]
    assert latent["samples"].shape == (1, 16, 2, 4, 6)
    request = image_request([tiny_models["dit_i2v"]], (2, 4, 6))
    request.positive, request.negative = wan_conditioning(positive, "positive"), wan_conditioning(negative, "negative")
    request.latent = latent["samples"]
    assert torch.isfinite(make_engine().sample(request).latent).all()


def test_cli_generate_from_a_start_image(tmp_path, tiny_models, wan22_i2v):
    """generate --image with the Wan 2.2 I2V experts on 2 ranks: the start image resized and encoded as
    WanImageToVideo does; the same run as the engine given that conditioning. A text-to-video model and Wan 2.1
    I2V (CLIP vision) are refused by name."""
    import subprocess
    import sys

    from PIL import Image

    from usp_video.distributed.models.video import start_mask, start_video

    rng = torch.Generator().manual_seed(12)
    pixels = (torch.rand(24, 40, 3, generator=rng) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "start.png")
    common = [sys.executable, "-m", "usp_video.distributed.cli", "generate", "--text-encoder",
              tiny_models["text_encoder"], "--vae", tiny_models["vae"], "--prompt", "a cat", "--image",
              str(tmp_path / "start.png"), "--width", "48", "--height", "32", "--frames", "5", "--steps", "2",
              "--cfg", "1.0", "--sampler", "euler"]
    run = subprocess.run(common + ["--model", "wan2.2", "--high-noise", wan22_i2v[0], "--low-noise", wan22_i2v[1],
                                   "--ranks", "2", "--save-latent", str(tmp_path / "out.latent")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    latent = load_file(str(tmp_path / "out.latent"))["latent_tensor"]
    engine = make_engine()
    video = start_video(pixels.float()[None] / 255.0, 48, 32, 5)
    concat = engine.encode_video(tiny_models["vae"], video)
    request = image_request(wan22_i2v, (2, 4, 6), clip_vision=False, cfg=1.0, steps=2)
    request.family, request.negative, request.seed, request.shift = "wan2.2-a14b", None, 0, 12.0  # the CLI's defaults
    from usp_video.distributed.requests import EncodeRequest

    tokens = engine.encode(EncodeRequest(family="wan2.2-a14b", files={"text_encoder": tiny_models["text_encoder"]},
                                         prompt="a cat"))["tokens"]
    request.positive = {"tokens": tokens, "concat_latent_image": concat, "concat_mask": start_mask(1, 2, 4, 6)}
    request.boundaries = [0.875]
    assert rel_error(latent, engine.sample(request).latent) <= 1e-5
    for dit, message in ((["--dit", tiny_models["dit"]], "is a text-to-video model; give an image-to-video"),
                         (["--dit", tiny_models["dit_i2v"]], "Wan 2.1 I2V needs the start image's CLIP ViT-H")):
        refused = subprocess.run(common + dit, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr

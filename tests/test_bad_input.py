"""The bad-input catalogue: each case gives a clear error naming the input and what would be
valid, nothing hangs, and the group stays usable afterwards."""

import math
from pathlib import Path

import pytest
import torch

from hardening import HARDENING
from usp_video.distributed import api
from usp_video.distributed.validation import check_video_size
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group, get_group
from usp_video.nodes.group_node import make_config, parse_gpus
import calls

GROUP = GroupConfig(ranks=2)


@pytest.fixture(scope="module")
def running(tiny_models):
    api.load_dit(GROUP, tiny_models["dit"])
    state = {"pid": get_group(GROUP).proc.pid}
    yield state
    # after every bad input: the same group, still working
    group = get_group(GROUP)
    assert group.proc.pid == state["pid"], "a bad input brought the group down"
    latent, _ = calls.sample(GROUP, tiny_models["dit"], positive=torch.randn(1, 8, 32), negative=None,
                           latent=torch.zeros(1, 16, 2, 4, 4), seed=0, steps=2, cfg=1.0, shift=5.0, sampler="euler")
    assert latent.isfinite().all()
    free_group()


def files(tiny_models, tmp: Path) -> dict:
    text = tmp / "notes.safetensors"
    text.write_text("hello")
    truncated = tmp / "truncated.safetensors"
    data = Path(tiny_models["dit"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    pickle = tmp / "wan.pth"
    torch.save({"w": torch.zeros(1)}, pickle)
    return {"text": text, "truncated": truncated, "pickle": pickle, "missing": tmp / "missing.safetensors"}


def sample_kwargs(**changes):
    kwargs = dict(positive=torch.randn(1, 8, 32), negative=torch.randn(1, 8, 32), latent=torch.zeros(1, 16, 2, 4, 4),
                  seed=0, steps=2, cfg=5.0, shift=5.0, sampler="euler", denoise=1.0, text_dim=32)
    kwargs.update(changes)
    return kwargs


def nan_latent():
    x = torch.zeros(1, 16, 2, 4, 4)
    x[0, 0, 0, 0, 0] = math.nan
    return x


CASES = {
    # model files
    "not a safetensors file": (lambda m, f: api.load_dit(GROUP, f["text"]), "not a readable .safetensors file"),
    "truncated safetensors": (lambda m, f: api.load_dit(GROUP, f["truncated"]), "may be truncated"),
    "pickle checkpoint": (lambda m, f: api.load_dit(GROUP, f["pickle"]), "pickle checkpoints (.pth) are not loaded"),
    "missing file": (lambda m, f: api.load_dit(GROUP, f["missing"]), "model file not found"),
    "VAE as the DiT": (lambda m, f: api.load_dit(GROUP, m["vae"]), "none of Wan 2.1, Wan 2.1 VACE, Wan 2.2 Animate, Wan 2.2 TI2V-5B, HunyuanVideo 1.5 or HunyuanVideo diffusion models (looks like a VAE)"),
    "DiT as the text encoder": (lambda m, f: calls.encode_text(GROUP, m["dit"], "a cat"), "is not a UMT5 text encoder"),
    "text encoder as the VAE": (lambda m, f: api.decode(GROUP, m["text_encoder"], torch.zeros(1, 16, 1, 2, 2)),
                                "is not a Wan 2.1 VAE"),
    "missing text encoder": (lambda m, f: calls.encode_text(GROUP, f["missing"], "a cat"), "model file not found"),
    # video size
    "width not a multiple of 16": (lambda m, f: check_video_size(72, 48, 9, 16), "--width 72 must be a positive multiple of 16"),
    "height zero": (lambda m, f: check_video_size(64, 0, 9, 16), "--height 0 must be a positive multiple of 16"),
    "frames not 4k+1": (lambda m, f: check_video_size(64, 48, 8, 16), "--frames 8 must be 4k+1"),
    "latent not a multiple of 16 pixels": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        latent=torch.zeros(1, 16, 2, 5, 4))), "width and height must be multiples of 16"),
    # sampler settings
    "steps zero": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(steps=0)), "steps must be an integer in 1..10000"),
    "steps negative": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(steps=-3)), "steps must be an integer"),
    "cfg negative": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(cfg=-1.0)), "cfg must be in 0..100"),
    "cfg NaN": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(cfg=math.nan)), "cfg must be in 0..100"),
    "shift zero": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(shift=0.0)), "shift must be in (0, 100]"),
    "denoise zero": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(denoise=0.0)), "denoise must be in (0, 1]"),
    "denoise above 1": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(denoise=1.5)), "denoise must be in"),
    "seed negative": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(seed=-1)), "seed must be an integer in 0.."),
    "seed above 2^64-1": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(seed=2**64)), "seed must be"),
    "unknown sampler": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(sampler="dpmpp_2m")),
                        "sampler must be one of unipc, euler"),
    # latents and conditioning
    "latent with 4 channels": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        latent=torch.zeros(1, 4, 2, 4, 4))), "latent_image has 4 channels; Wan 2.1 latents have 16"),
    "image latent (rank 4)": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        latent=torch.zeros(1, 16, 4, 4))), "must be a video latent [batch, 16, frames, height/8, width/8]"),
    "latent with NaN": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(latent=nan_latent())), "NaN or infinite"),
    "latent of integers": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        latent=torch.zeros(1, 16, 2, 4, 4, dtype=torch.int64))), "must be a floating-point tensor"),
    "text encoder of another width": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        positive=torch.zeros(1, 512, 4096))), "positive has dimension 4096 but the model expects 32"),
    "conditioning with inf": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        negative=torch.full((1, 8, 32), math.inf))), "negative contains NaN or infinite values"),
    "conditioning batch mismatch": (lambda m, f: calls.sample(GROUP, m["dit"], **sample_kwargs(
        positive=torch.zeros(3, 8, 32), latent=torch.zeros(2, 16, 2, 4, 4))), "positive has batch 3 for a latent batch of 2"),
    # degrees, devices, group settings
    "ulysses x ring != ranks": (lambda m, f: GroupConfig(ranks=4, ulysses=3, ring=1), "ulysses x ring = 3 x 1 = 3"),
    "heads not divisible by ulysses": (lambda m, f: api.load_dit(GroupConfig(ranks=5, ulysses=5, ring=1), m["dit"]),
                                       "ulysses=5 does not divide the model's 12 attention heads"),
    "more GPUs than present": (lambda m, f: parse_gpus("0,1,2", 2), "lists [2], but this machine has 2 GPU(s): 0, 1"),
    "a GPU index that does not exist": (lambda m, f: parse_gpus("7", 4), "lists [7], but this machine has 4 GPU(s)"),
    "GPU list not numbers": (lambda m, f: parse_gpus("first,second", 2), "gpus must be 'all' or a comma-separated list"),
    "cuda without GPUs": (lambda m, f: parse_gpus("all", 0), "no CUDA/ROCm GPU is visible; choose device 'cpu'"),
    "flash_attn on CPU": (lambda m, f: GroupConfig(ranks=2, attention="flash_attn"), "needs CUDA GPUs"),
    "sageattention on CPU": (lambda m, f: GroupConfig(ranks=2, attention="sageattention"),
                             "attention 'sageattention' needs CUDA GPUs; use 'auto' or 'sdpa' on CPU"),
    "unknown compile mode": (lambda m, f: GroupConfig(ranks=2, compile="max-autotune"),
                             "compile must be one of off, on, aot_eager, got 'max-autotune'"),
    "fp8 compute on CPU": (lambda m, f: make_config("cpu", "all", 2, "auto", "auto", "auto", "auto", 600,
                                                    fp8_compute="on"), "use fp8_compute 'off' here"),
    "unknown dtype": (lambda m, f: GroupConfig(ranks=2, dtype="fp64"), "dtype must be one of fp32, bf16, fp16"),
    "zero ranks": (lambda m, f: make_config("cpu", "all", 0, "auto", "auto", "auto", "auto", 600),
                   "ranks must be an integer >= 1"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, tiny_models, tmp_path, running):
    call, message = CASES[case]
    HARDENING["inputs tried"] += 1
    with pytest.raises(ValueError) as info:
        call(tiny_models, files(tiny_models, tmp_path))
    assert message in str(info.value), f"{case}: {info.value}"
    if case == "heads not divisible by ulysses":  # that case needed a group of 5: back to the module's
        api.load_dit(GROUP, tiny_models["dit"])
        running["pid"] = get_group(GROUP).proc.pid


@pytest.mark.parametrize("prompt", ["", " ".join(["a red car drives through a city street"] * 200)],
                         ids=["empty", "very long"])
def test_empty_and_very_long_prompts_encode(prompt, tiny_models, running):
    HARDENING["inputs tried"] += 1
    cond = calls.encode_text(GROUP, tiny_models["text_encoder"], prompt)
    assert cond.shape[0] == 1 and cond.shape[1] >= 512 and cond.shape[2] == 32 and cond.isfinite().all()


def hunyuan_kwargs(**changes):
    kwargs = dict(positive=torch.randn(1, 7, 32), positive_pooled=torch.randn(1, 16), negative=None,
                  latent=torch.zeros(1, 16, 2, 4, 4), seed=0, steps=2, cfg=1.0, shift=7.0, sampler="euler",
                  text_dim=32, guidance=6.0)
    kwargs.update(changes)
    return kwargs


HUNYUAN_CASES = {
    "HunyuanVideo DiT in the Wan loader": (lambda h, m: api.load_dit(GROUP, h["dit"], family="wan2.1"),
                                           "is a HunyuanVideo model, not Wan 2.1"),
    "Wan DiT in the HunyuanVideo loader": (lambda h, m: api.load_dit(GROUP, m["dit"], family="hunyuan-video"),
                                           "is a Wan 2.1 model, not HunyuanVideo"),
    "no pooled CLIP output": (lambda h, m: calls.sample(GROUP, h["dit"], **hunyuan_kwargs(positive_pooled=None)),
                              "HunyuanVideo needs the pooled CLIP-L output"),
    "pooled output of rank 3": (lambda h, m: calls.sample(GROUP, h["dit"], **hunyuan_kwargs(
        positive_pooled=torch.zeros(1, 1, 16))), "positive_pooled must be the pooled CLIP-L output [batch, 768]"),
    "pooled batch mismatch": (lambda h, m: calls.sample(GROUP, h["dit"], **hunyuan_kwargs(
        positive_pooled=torch.zeros(3, 16))), "positive_pooled has batch 3 for conditioning of batch 1"),
    "guidance NaN": (lambda h, m: calls.sample(GROUP, h["dit"], **hunyuan_kwargs(guidance=math.nan)),
                     "guidance (HunyuanVideo's embedded guidance) must be in 0..100"),
    "UMT5 conditioning for HunyuanVideo": (lambda h, m: calls.sample(GROUP, h["dit"], **hunyuan_kwargs(
        positive=torch.zeros(1, 512, 4096))), "positive has dimension 4096 but the model expects 32"),
    "UMT5 file as the Llama encoder": (lambda h, m: calls.encode_hunyuan_text(
        GROUP, m["text_encoder"], h["clip"], h["tokenizers"], "a cat"), "is not a Llama text encoder"),
    "Llama file as CLIP-L": (lambda h, m: calls.encode_hunyuan_text(
        GROUP, h["llama"], h["llama"], h["tokenizers"], "a cat"), "is not a CLIP text encoder"),
    "tokenizer folder without tokenizers": (lambda h, m: calls.encode_hunyuan_text(
        GROUP, h["llama"], h["clip"], str(Path(h["llama"]).parent.parent), "a cat"), "no tokenizers found in"),
    "HunyuanVideo DiT as the VAE": (lambda h, m: api.decode(GROUP, h["dit"], torch.zeros(1, 16, 1, 2, 2)),
                                                   "is not a Wan 2.1 VAE"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(HUNYUAN_CASES))
def test_hunyuan_bad_input_is_refused_clearly(case, tiny_hunyuan, tiny_models, running):
    call, message = HUNYUAN_CASES[case]
    HARDENING["inputs tried"] += 1
    with pytest.raises(ValueError) as info:
        call(tiny_hunyuan, tiny_models)
    assert message in str(info.value), f"{case}: {info.value}"


def test_hunyuan_empty_and_very_long_prompts_encode(tiny_hunyuan, running):
    for prompt in ("", " ".join(["a red car drives through a city street"] * 100)):
        HARDENING["inputs tried"] += 1
        cond, pooled = calls.encode_hunyuan_text(GROUP, tiny_hunyuan["llama"], tiny_hunyuan["clip"],
                                               tiny_hunyuan["tokenizers"], prompt)
        assert 1 <= cond.shape[1] <= 256 and cond.shape[2] == 32 and pooled.shape == (1, 16)
        assert cond.isfinite().all() and pooled.isfinite().all()


@pytest.mark.parametrize("extra,named", [
    ({"start_percent": 0.0, "end_percent": 0.5}, "end_percent (from ConditioningSetTimestepRange)"),
    ({"start_percent": 0.3, "end_percent": 1.0}, "start_percent (from ConditioningSetTimestepRange)"),
    ({"area": (8, 8, 0, 0), "strength": 1.0}, "area (from ConditioningSetArea)"),
    ({"mask": torch.ones(1, 8, 8)}, "mask (from ConditioningSetMask)"),
    ({"control": object()}, "control (from a ControlNet apply node)"),
    ({"concat_latent_image": torch.zeros(1, 16, 1, 2, 2)}, "concat_latent_image (from an image-to-video node"),
    ({"some_new_key": 1}, "some_new_key, which"),
    ({"guidance": 6.0}, "guidance"),  # HunyuanVideo's, not Wan's
])
def test_conditioning_the_sampler_would_ignore_is_refused(extra, named):
    """Native conditioning nodes put their settings in the conditioning's dict; the USP samplers apply plain
    text (and HunyuanVideo's pooled_output and guidance): anything else is refused by name, never ignored."""
    from usp_video.nodes.conditioning import conditioning_parts

    tokens = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="positive: this conditioning carries .*" + named.replace("(", r"\(")
                       .replace(")", r"\)")):
        conditioning_parts([[tokens, {"pooled_output": None, **extra}]], "positive")
    # what is applied, or changes nothing, passes: the whole timestep range, None values, the attention mask
    whole = {"start_percent": 0.0, "end_percent": 1.0, "pooled_output": None,
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert conditioning_parts([[tokens, whole]], "positive")[0].shape == (1, 3, 32)
    assert conditioning_parts([[tokens, {"guidance": 6.0, "pooled_output": torch.zeros(1, 16)}]], "positive",
                              ("pooled_output", "guidance"))[1]["guidance"] == 6.0


def test_the_samplers_read_a_conditioning_as_its_family_takes_it():
    """family_conditioning (what USP Sampler reads): HunyuanVideo takes the pooled output and FluxGuidance's
    guidance (as an option), Wan 2.1 refuses that guidance by name and takes the image-to-video tensors."""
    from usp_video.distributed import models
    from usp_video.nodes.conditioning import family_conditioning

    tokens, pooled = torch.zeros(1, 4, 32), torch.zeros(1, 16)
    cond, options = family_conditioning([[tokens, {"guidance": 6.0, "pooled_output": pooled}]], "positive",
                                        models.get("hunyuan-video"))
    assert set(cond) == {"tokens", "pooled_output"} and cond["pooled_output"] is pooled and options == {"guidance": 6.0}
    with pytest.raises(ValueError, match="negative: this conditioning carries guidance, which"):
        family_conditioning([[tokens, {"guidance": 6.0}]], "negative", models.get("wan2.1"))
    concat = torch.zeros(1, 16, 1, 2, 2)
    cond, options = family_conditioning([[tokens, {"concat_latent_image": concat, "pooled_output": None}]],
                                        "positive", models.get("wan2.1"))
    assert set(cond) == {"tokens", "concat_latent_image"} and options == {}


def test_the_family_is_read_from_the_file_once_per_request(tiny_models, monkeypatch):
    """A sample request reads its DiT's header once on the client (detection and config together), checks
    the experts once, and a caller that found the family already (the CLI: api.check_model) reads none."""
    from usp_video.distributed import models
    from usp_video.distributed.requests import SampleRequest

    reads, checks = [], []
    read_header, check_experts = models.read_header, SampleRequest.check_experts
    monkeypatch.setattr(models, "read_header", lambda path: reads.append(path) or read_header(path))
    monkeypatch.setattr(SampleRequest, "check_experts", lambda self: checks.append(1) or check_experts(self))
    request = calls.request(tiny_models["dit"], positive=torch.randn(1, 8, 32), negative=None,
                            latent=torch.zeros(1, 16, 3, 6, 10), seed=-1, steps=4, cfg=1.0, shift=5.0)
    with pytest.raises(ValueError, match="seed must be an integer"):  # refused before any group is asked
        api.sample(GROUP, request)
    assert len(reads) == 1 and len(checks) == 1
    checked = api.check_model([tiny_models["dit"]])
    assert checked.family.name == "wan2.1" and len(reads) == 2
    with pytest.raises(ValueError, match="seed must be an integer"):
        api.sample(GROUP, request, family=checked.family)
    assert len(reads) == 2

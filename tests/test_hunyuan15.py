"""HunyuanVideo 1.5: the one-process DiT against diffusers' stock HunyuanVideo15Transformer3DModel (text to video and
image to video, Comfy-Org's fused q/k/v layout and tencent's split one), detection against HunyuanVideo 1.0, and
the family's cases of the shared parity harness (hv15_cases, run by tests/test_parity.py)."""

import pytest
import torch

from conftest import rel_error
from parity_targets import make_engine, model_forward
from usp_video.distributed.models import FAMILIES, check_dit_file
from usp_video.distributed.formats.checkpoint import CheckpointError, load_state_dict, read_header, save_safetensors
from usp_video.distributed.parallel.mesh import valid_factorizations

FAMILY = "hunyuan-video-1.5"
HEADS = 12               # the tiny DiT's (the released model's 16 are checked by the planner's degrees)
UNEVEN = (5, 1, 7)       # patch 1x1x1: 35 video tokens, divides none of 2, 3, 4
EVEN = (3, 2, 4)         # 24 tokens


def hv15_cases():
    """test_parity.py's cases of this family: (name, (ranks, ulysses, ring), family_case's kwargs). On every
    factorization of 2-4 ranks: the image-to-video forward on uneven tokens, a text-to-video run with CFG (a
    positive of 12 Qwen tokens and a negative of 7: two passes) and an image-to-video run (start latent, mask,
    SigLIP tokens, on both sides)."""
    for n in (2, 3, 4):
        for u, r in valid_factorizations(n, HEADS):
            yield "forward-t2v-i2v", (n, u, r), dict(shape=UNEVEN, forward_inputs={"image": True}, samples=[
                {"cfg": 6.0, "steps": 3}, {"cfg": 1.0, "steps": 2, "image": True}])
    yield "forward-even", (4, 2, 2), dict(shape=EVEN, forward_inputs={})
    # the weights sharded (FSDP over the blocks, each rank reading its shards of the file)
    yield "sharded", (2, 1, 2), dict(shape=UNEVEN, shard_weights="on", samples=[{"cfg": 6.0, "steps": 2, "image": True}])


def stock_model(path: str, split_qkv: bool = False):
    """diffusers' own class with the file's weights put in by name (keys.to_diffusers), no hooks of ours."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from usp_video.distributed.models.hunyuan_video15 import keys, tiny

    model = HunyuanVideo15Transformer3DModel(**tiny.TINY_CONFIG)
    model.load_state_dict(keys.to_diffusers(load_state_dict(path)), strict=True)
    return model.eval()


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_one_process_equals_stock_diffusers(tiny_hv15, image):
    """The engine's DiT (streamed load, our hooks, world size 1) == diffusers' stock forward on padded Qwen and
    ByT5 tokens, with zero SigLIP tokens (text to video: masked out) or real ones and a start latent."""
    ours = model_forward(make_engine().dit(tiny_hv15["dit"], FAMILY), FAMILY, UNEVEN, image=image)
    stock = model_forward(stock_model(tiny_hv15["dit"]), FAMILY, UNEVEN, image=image)
    assert torch.isfinite(stock).all() and stock.abs().max() > 0
    assert rel_error(ours, stock) <= 1e-5


def test_tencents_split_qkv_layout_loads_the_same(tiny_hv15, tmp_path):
    """tencent's release keeps q, k and v apart (img_attn_q, ...): the same weights in that layout, same output."""
    shapes, metadata = read_header(tiny_hv15["dit"])
    state = load_state_dict(tiny_hv15["dit"])
    split = {}
    for key, value in state.items():
        if "_attn_qkv." in key and key.startswith("double_blocks."):
            for part, name in zip(value.chunk(3), "qkv"):
                split[key.replace("_attn_qkv.", f"_attn_{name}.")] = part
        else:
            split[key] = value
    path = tmp_path / "hv15_split.safetensors"
    save_safetensors(split, path, metadata)
    engine = make_engine()
    a = model_forward(engine.dit(str(path), FAMILY), FAMILY, EVEN)
    b = model_forward(engine.dit(tiny_hv15["dit"], FAMILY), FAMILY, EVEN)
    assert rel_error(a, b) <= 1e-6


def test_detection_tells_1_5_from_1_0(tiny_hv15, tiny_hunyuan, tmp_path):
    """A 1.5 file is HunyuanVideo 1.5's (ComfyUI: vision_in and cond_type_embedding), a 1.0 file stays
    HunyuanVideo's; a mean-flow file (time_r_in, the 1080p SR stage) is refused with what to use."""
    assert check_dit_file(tiny_hv15["dit"])[0].name == FAMILY
    assert check_dit_file(tiny_hunyuan["dit"])[0].name == "hunyuan-video"
    shapes, metadata = read_header(tiny_hv15["dit"])
    state = load_state_dict(tiny_hv15["dit"])
    hidden = state["time_in.mlp.0.weight"].shape[0]
    state["time_r_in.mlp.0.weight"] = torch.zeros(hidden, 256)
    path = tmp_path / "hv15_meanflow.safetensors"
    save_safetensors(state, path, metadata)
    with pytest.raises(CheckpointError, match="mean-flow .* not supported yet: use the 480p / 720p"):
        check_dit_file(path)
    with pytest.raises(CheckpointError, match="variant with 65 input channels"):
        check_dit_file(tiny_hv15["dit"], "hunyuan-video")


def test_the_start_image_conditioning_is_the_pipelines_channels(tiny_hv15):
    """velocity() builds the 65-channel input as the reference pipeline does: latent | start latent (process_in'd)
    | mask, and gives the model the Qwen tokens unmasked, the ByT5 and SigLIP tokens."""
    family = FAMILIES[FAMILY]
    model = make_engine().dit(tiny_hv15["dit"], FAMILY)
    seen = {}
    handle = model.x_embedder.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    try:
        from usp_video.distributed.models.hunyuan_video15.tiny import tiny_request

        cond = tiny_request(family, ["dit"], UNEVEN, image=True)["positive"]
        x = torch.randn(1, 32, *UNEVEN)
        with torch.no_grad():
            family.velocity(model, x, torch.tensor([500.0]), cond, {})
    finally:
        handle.remove()
    expected = torch.cat([x, cond["concat_latent_image"] * 1.03682, 1 - cond["concat_mask"]], dim=1)
    torch.testing.assert_close(seen["x"], expected)


# -- the VAE ------------------------------------------------------------------------------------------------

# tiles of 32 pixels (2 latent rows / columns) overlapping by half: a tiny latent makes many, blended
VAE_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_latent_min_height=2,
                 tile_latent_min_width=2, tile_overlap_factor=0.5)
LATENT = (2, 3, 5)          # decodes to 5 frames of 48 x 80, in 3 x 5 = 15 tiles (a latent row and column apart)
VIDEO = (5, 48, 64)         # encodes in 3 x 4 = 12 tiles


def stock_vae(path: str):
    from diffusers import AutoencoderKLHunyuanVideo15

    from usp_video.distributed.models.hunyuan_video15 import tiny, vae

    model = AutoencoderKLHunyuanVideo15(**tiny.TINY_VAE)
    model.load_state_dict(vae.to_diffusers(load_state_dict(path)), strict=True)
    return model.eval()


def test_one_process_vae_equals_stock_diffusers(tiny_hv15):
    """Our VAE from the original-layout file == diffusers' stock class given the same weights by name: decode
    (untiled: one tile) and encode (the latent distribution's mean, as ComfyUI's VAEEncode)."""
    from parity_targets import encode_frames

    engine = make_engine()
    latent = torch.randn(1, 32, *LATENT, generator=torch.Generator().manual_seed(5))
    stock = stock_vae(tiny_hv15["vae"])
    with torch.no_grad():
        expected = ((stock.decode(latent).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1)
        frames = encode_frames(VIDEO)
        expected_latent = stock.encode(frames.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1).latent_dist.mode()
    assert rel_error(engine.decode(tiny_hv15["vae"], latent), expected) <= 1e-5
    assert rel_error(engine.encode_video(tiny_hv15["vae"], frames), expected_latent) <= 1e-5


@pytest.fixture(scope="module")
def vae_runs(tests_dir, tiny_hv15):
    """The split decode on 2 and 3 ranks and the split encode on 2, each in one spawn (parity_targets.vae_case)."""
    from usp_video.distributed.testing.spawn import run_ranks

    decode = dict(kind="decode", vae_path=tiny_hv15["vae"], shape=list(LATENT), tiling=VAE_TILES, channels=32)
    encode = dict(kind="encode", vae=tiny_hv15["vae"], shape=list(VIDEO), tiling=VAE_TILES)
    runs = {n: run_ranks(f"{tests_dir}/parity_targets.py:run_cases", n, dict(target="vae_case", cases=cases),
                         timeout=240) for n, cases in ((2, [decode, encode]), (3, [decode]))}

    def result(n: int, i: int) -> list[dict]:
        return [{k.split("/", 1)[1]: v for k, v in ranked.items() if k.startswith(f"{i}/")} for ranked in runs[n]]
    return result


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_vae_decode_matches_one_process(tiny_hv15, vae_runs, world_size):
    """The tiles of diffusers' tiled decode shared out among the ranks, rank 0 blending them == the one-process
    tiled decode; progress counted per tile."""
    from parity_targets import vae_split_rank

    expected = vae_split_rank(0, 1, tiny_hv15["vae"], LATENT, tiling=VAE_TILES, channels=32)
    results = vae_runs(world_size, 0)
    assert all(not r for r in results[1:])  # only rank 0 returns the frames
    calls = int(expected["progress"][-1][1])
    assert calls == 15 and results[0]["progress"].tolist() == [[k, calls] for k in range(1, calls + 1)]
    assert float((results[0]["frames"] - expected["frames"]).abs().max()) <= 1e-5


def test_split_vae_encode_matches_one_process(tiny_hv15, vae_runs):
    from parity_targets import split_encode_rank

    expected = split_encode_rank(0, 1, tiny_hv15["vae"], VIDEO, tiling=VAE_TILES)
    results = vae_runs(2, 1)
    assert all(not r for r in results[1:])
    assert expected["latent"].shape == (1, 32, 2, 3, 4) and expected["latent"].abs().max() > 0.1
    assert rel_error(results[0]["latent"], expected["latent"]) <= 1e-5
    assert results[0]["progress"].tolist() == expected["progress"].tolist()


# -- ComfyUI's conditioning, as the USP sampler reads it ---------------------------------------------------

def test_comfyui_conditioning_reaches_the_model_as_its_nodes_make_it(tiny_hv15):
    """A CONDITIONING as ComfyUI's HunyuanVideo 1.5 text encoder and HunyuanVideo15ImageToVideo make it (Qwen tokens
    with their attention_mask, conditioning_byt5small, clip_vision_output, concat_latent_image, concat_mask) is read
    by the sampler node's reader into the family's conditioning (SigLIP: the last hidden state), passes the checks,
    and a run on it equals the run on the tensors given directly; a Wan-only key is refused by name."""
    from types import SimpleNamespace

    from usp_video.nodes.conditioning import family_conditioning
    from parity_targets import request
    from usp_video.distributed.validation import check_conditioning

    family = FAMILIES[FAMILY]
    req = request(FAMILY, [tiny_hv15["dit"]], UNEVEN, cfg=1.0, steps=2, image=True)
    direct = req.positive
    tokens = torch.cat([direct["tokens"], torch.zeros(1, 3, direct["tokens"].shape[-1])], dim=1)  # padded, masked
    mask = torch.cat([torch.ones(1, direct["tokens"].shape[1]), torch.zeros(1, 3)], dim=1)
    extra = {"attention_mask": mask, "conditioning_byt5small": direct["conditioning_byt5small"],
             "clip_vision_output": SimpleNamespace(last_hidden_state=direct["siglip"],
                                                   penultimate_hidden_states=torch.zeros(1)),
             "concat_latent_image": direct["concat_latent_image"], "concat_mask": direct["concat_mask"]}
    cond, options = family_conditioning([[tokens, extra]], "positive", family)
    assert set(cond) == set(direct) and options == {}
    for key in direct:
        assert torch.equal(cond[key], direct[key]), key
    check_conditioning(cond, "positive", family)
    engine = make_engine()
    expected = engine.sample(req).latent
    req.positive = cond
    assert torch.equal(engine.sample(req).latent, expected)
    with pytest.raises(ValueError, match="vace_frames .from WanVaceToVideo"):
        family_conditioning([[tokens, dict(extra, vace_frames=[torch.zeros(1)])]], "positive", family)


def test_a_step_distilled_image_to_video_run_is_an_euler_loop_over_stock_diffusers(tiny_hv15):
    """The step-distilled I2V setting (cfg 1: one pass, 8 steps, shift 5) through the engine == diffusers' stock
    HunyuanVideo15Transformer3DModel driven by the same sigmas and the same noise, as the reference pipeline feeds
    it: [x | start latent * 1.03682 | mask], all-ones Qwen mask, the ByT5 and SigLIP tokens, euler written out."""
    from parity_targets import request
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    req = request(FAMILY, [tiny_hv15["dit"]], UNEVEN, cfg=1.0, steps=8, image=True)
    ours = make_engine().sample(req).latent
    cond = req.positive
    stock = stock_model(tiny_hv15["dit"])
    noise = torch.randn(req.latent.shape, generator=torch.Generator().manual_seed(req.seed))  # prepare_noise
    sigmas = sampling_sigmas(req.steps, req.shift)
    start = cond["concat_latent_image"] * 1.03682
    glyph = cond["conditioning_byt5small"]
    x = sigmas[0] * noise  # an empty latent: the flow's noise scaling of zeros
    for i in range(req.steps):
        sigma = sigmas[i]
        with torch.no_grad():
            v = stock(torch.cat([x, start, 1 - cond["concat_mask"]], dim=1), (1000 * sigma).reshape(1), cond["tokens"],
                      torch.ones(1, cond["tokens"].shape[1]), None, glyph, torch.ones(1, glyph.shape[1]),
                      cond["siglip"], return_dict=False)[0]
        x = x + v * (sigmas[i + 1] - sigma)  # euler: x + (x - denoised) / sigma * dt, denoised = x - sigma v
    expected = x / 1.03682  # process_latent_out
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1
    assert rel_error(ours, expected) <= 1e-5


# -- the sharded load's peak ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def load_model(tmp_path_factory):
    """A HunyuanVideo 1.5 DiT large enough that a rank's share stands out of the allocator's noise (8 blocks
    288 wide, about 110 MB at fp32), written as Comfy-Org's files are (original names, bf16)."""
    import json

    from diffusers import HunyuanVideo15Transformer3DModel

    from usp_video.distributed.models.hunyuan_video15 import dit, keys, tiny

    config = dict(tiny.TINY_CONFIG, attention_head_dim=24, num_layers=8, mlp_ratio=4.0, rope_axes_dim=(4, 8, 12))
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(**config)
    full = sum(p.numel() * 4 for p in model.parameters())
    path = tmp_path_factory.mktemp("hv15_load") / "hv15_load.safetensors"
    save_safetensors({k: v.to(torch.bfloat16) for k, v in keys.to_original(model.state_dict()).items()}, path,
                     {dit.CONFIG_METADATA_KEY: json.dumps(config)})
    return path, full


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_sharded_load_peak_per_rank_is_its_share(tests_dir, load_model, world_size):
    """Each rank's peak resident memory while loading the DiT sharded (the engine's streamed load: its shards only,
    read from the file) stays within 1/N + 0.15 of the fp32 model, and it holds about 1/N of it."""
    from usp_video.distributed.testing.spawn import run_ranks

    path, full = load_model
    ranks = run_ranks(f"{tests_dir.parent}/benchmarks/memory_bench.py:load_rank", world_size,
                      dict(path=str(path), how="streamed", kind="hunyuan-video-1.5"), timeout=300)
    for rank, result in enumerate(ranks):
        peak, held = float(result["peak_kb"]) * 1024 / full, float(result["bytes"]) / full
        assert held <= 1 / world_size + 0.05, f"rank {rank} holds {held:.2f} of the model"
        assert peak <= 1 / world_size + 0.15, f"rank {rank}: load peak {peak:.2f} of the model"


# -- the text encoders ------------------------------------------------------------------------------------

def text_files(models: dict) -> dict:
    return {k: models[k] for k in ("qwen", "byt5", "qwen_tokenizer")}


@pytest.mark.parametrize("prompt", ['a cat holds a sign that says "hello world" on the beach',
                                    "a red car drives through a city street at night"], ids=["glyphs", "no_glyphs"])
def test_text_encoding_equals_the_reference_pipelines(tiny_hv15, prompt):
    """Our encode (ComfyUI's files: Qwen under model., ByT5 in T5 names) == diffusers' HunyuanVideo15Pipeline's own
    prompt encoders (_get_mllm_prompt_embeds, _get_byt5_prompt_embeds: chat template, hidden_states[-3], the
    template's head cropped, padding to the pipeline's lengths) on stock transformers classes given the same
    weights, its real tokens compared; no quoted text: no ByT5 tokens (the pipeline's are all masked)."""
    from diffusers import HunyuanVideo15Pipeline
    from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel)

    from usp_video.distributed.models.hunyuan_video15 import text, tiny
    from usp_video.distributed.requests import EncodeRequest

    ours = make_engine().encode(EncodeRequest(family=FAMILY, files=text_files(tiny_hv15), prompt=prompt))
    tokenizer = text.load_tokenizer(tiny_hv15["qwen_tokenizer"])
    qwen_state, meta = load_state_dict(tiny_hv15["qwen"]), read_header(tiny_hv15["qwen"])[1]
    import json

    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**json.loads(meta[text.QWEN_CONFIG_KEY]))).eval()
    qwen.load_state_dict({k.removeprefix("model."): v for k, v in qwen_state.items()})
    crop = len(tokenizer(text.TEMPLATE.split("{}")[0], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(qwen, tokenizer, prompt, torch.device("cpu"),
                                                                       system_message=text.SYSTEM, crop_start=crop)
    expected = embeds[mask.bool()].unsqueeze(0)
    assert ours["tokens"].shape == expected.shape
    assert rel_error(ours["tokens"], expected) <= 1e-5
    byt5 = T5EncoderModel(T5Config(**tiny.TINY_BYT5)).eval()
    byt5.load_state_dict(load_state_dict(tiny_hv15["byt5"]), strict=False)  # embed_tokens: tied to shared
    with torch.no_grad():
        glyphs, glyph_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(ByT5Tokenizer(), byt5, prompt,
                                                                            torch.device("cpu"))
    if glyph_mask.any():
        expected = glyphs[glyph_mask.bool()].unsqueeze(0)
        assert rel_error(ours["conditioning_byt5small"], expected) <= 1e-5
    else:
        assert "conditioning_byt5small" not in ours


def test_the_text_encoder_loader_tells_qwen_byt5_from_llama_clip(tiny_hv15, tiny_hunyuan, monkeypatch):
    """Two text encoder files fit HunyuanVideo (Llama + CLIP-L) and HunyuanVideo 1.5 (Qwen + ByT5) by count: the
    files' tensors say which; a mix is refused naming what each family takes."""
    from pathlib import Path

    from usp_video.nodes.loaders import text_encoder_socket

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_hv15["qwen"]).parents[1]))
    folder = tiny_hv15["qwen_tokenizer"]
    socket = text_encoder_socket("g", [Path(tiny_hv15["qwen"]).name, Path(tiny_hv15["byt5"]).name], folder)
    assert socket["family"] == FAMILY and socket["files"]["qwen_tokenizer"] == folder
    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_hunyuan["llama"]).parents[1]))
    socket = text_encoder_socket("g", [Path(tiny_hunyuan["llama"]).name, Path(tiny_hunyuan["clip"]).name],
                                 tiny_hunyuan["tokenizers"])
    assert socket["family"] == "hunyuan-video"
    with pytest.raises(ValueError, match="are not those of HunyuanVideo 1.5 or HunyuanVideo: HunyuanVideo 1.5 takes "
                                         "qwen_2.5_vl_7b.*HunyuanVideo takes llava_llama3"):
        text_encoder_socket("g", [tiny_hunyuan["llama"], tiny_hv15["byt5"]], tiny_hunyuan["tokenizers"])


def test_the_sharded_qwen_encodes_as_one_process(tests_dir, tiny_hv15):
    """Qwen2.5-VL sharded over 2 ranks (FSDP over its layers, each rank reading its rows of the file): the same
    conditioning as one process, each rank holding and reading about half of it."""
    import os

    from usp_video.distributed.parallel.fsdp import parameter_bytes
    from usp_video.distributed.requests import EncodeRequest
    from usp_video.distributed.testing.spawn import run_ranks

    prompt = 'a sign that says "open" on a shop door'
    engine = make_engine()
    expected = engine.encode(EncodeRequest(family=FAMILY, files=text_files(tiny_hv15), prompt=prompt))
    full = parameter_bytes(engine.text.text_part("qwen"))
    results = run_ranks(f"{tests_dir}/parity_targets.py:sharded_text_rank", 2,
                        dict(family=FAMILY, files=text_files(tiny_hv15), prompt=prompt, part="qwen"), timeout=240)
    for rank, result in enumerate(results):
        for key, value in expected.items():
            assert rel_error(result[f"cond:{key}"], value) <= 1e-5, f"rank {rank} {key}"
        assert int(result["bytes"]) <= full * (1 / 2 + 0.05), f"rank {rank} holds {int(result['bytes'])} of {full}"
        assert int(result["read"]) <= os.path.getsize(tiny_hv15["qwen"]) * (1 / 2 + 0.05)


def test_the_start_image_is_the_pipelines_condition_latent(tiny_hv15):
    """start_image_conditioning (USP HunyuanVideo 1.5 Image To Video's) == the reference pipeline's
    prepare_cond_latents_and_mask: the image's latent on the first latent frame, zeros after; the mask ComfyUI's
    HunyuanVideo15ImageToVideo makes, 0 there and 1 after (the model takes 1 - mask, the pipeline's mask)."""
    from parity_targets import encode_frames

    family, engine = FAMILIES[FAMILY], make_engine()
    image = encode_frames((1, 40, 56))  # resized (centred crop) to 64 x 48
    cond = family.start_image_conditioning(lambda f: (engine.encode_video(tiny_hv15["vae"], f), family), image, 64, 48, 9)
    from usp_video.distributed.models.video import resized_frames

    first = engine.encode_video(tiny_hv15["vae"], resized_frames(image, 64, 48, 9))
    assert cond["concat_latent_image"].shape == (1, 32, 3, 3, 4) and cond["concat_mask"].shape == (1, 1, 3, 3, 4)
    assert torch.equal(cond["concat_latent_image"][:, :, :1], first) and not cond["concat_latent_image"][:, :, 1:].any()
    assert not cond["concat_mask"][:, :, 0].any() and cond["concat_mask"][:, :, 1:].eq(1).all()

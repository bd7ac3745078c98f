"""fp8 weights stay fp8 in memory and compute in the compute dtype, layer by layer; the results
equal the same fp8 weights dequantized at load, also when the weights are sharded."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_error
from parity_targets import dit_forward, hunyuan_forward, make_engine
from usp_video.distributed.formats import fp8
from usp_video.distributed.formats.checkpoint import read_header
from usp_video.distributed.models.hunyuan_video import dit as hunyuan, tiny as hunyuan_tiny
from usp_video.distributed.models.wan21 import dit as wan, tiny
from usp_video.distributed.parallel.fsdp import parameter_bytes
from usp_video.distributed.testing.spawn import run_ranks


def write_fp8(src: str, dst, meta: dict, scaled: bool):
    """ComfyUI's fp8_e4m3fn layout; scaled: per-tensor scales in <name>.scale_weight, as its
    *_fp8_scaled files carry them."""
    out = {}
    for key, value in load_file(src).items():
        if value.dim() == 2:
            scale = value.abs().max().clamp_min(1e-6) / 448.0 if scaled else torch.tensor(1.0)
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            if scaled:
                out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1).float()
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(dst), metadata=meta)
    return str(dst)


@pytest.fixture(scope="module")
def fp8_files(tiny_models, tiny_hunyuan, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    wan_meta = {wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)}
    hy_meta = {hunyuan.CONFIG_METADATA_KEY: json.dumps(hunyuan_tiny.TINY_HUNYUAN_CONFIG)}
    return {("wan", scaled): write_fp8(tiny_models["dit"], root / f"wan_{scaled}.safetensors", wan_meta, scaled)
            for scaled in (False, True)} | {
           ("hunyuan", scaled): write_fp8(tiny_hunyuan["dit"], root / f"hy_{scaled}.safetensors", hy_meta, scaled)
           for scaled in (False, True)}


def forward(family, model):
    if family == "wan":
        from parity_targets import dit_inputs

        x, t, ctx = dit_inputs((5, 2, 14))
        with torch.no_grad():
            return model(x, t, ctx, return_dict=False)[0]
    return hunyuan_forward(model, (5, 2, 14), 7)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_fp8_weights_stay_fp8_and_compute_the_same(fp8_files, family, scaled):
    load = wan.load_wan_transformer if family == "wan" else hunyuan.load_hunyuan_transformer
    path = fp8_files[(family, scaled)]
    kept, dequantized = load(path), load(path, keep_fp8=False)
    blocks = kept.blocks if family == "wan" else [*kept.transformer_blocks, *kept.single_transformer_blocks]
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)  # the blocks' weights
    assert fp8.count_fp8_layers(kept) >= len(linears) and fp8.count_fp8_layers(dequantized) == 0  # the loader's info
    assert parameter_bytes(kept) < 0.7 * parameter_bytes(dequantized)
    assert rel_error(forward(family, kept), forward(family, dequantized)) <= 1e-6


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_fp8_sharded_matches_fp8_unsharded(tests_dir, fp8_files, tiny_models, family):
    path = fp8_files[(family, True)]
    engine = make_engine()
    expected = (dit_forward(engine, path, (5, 2, 14)) if family == "wan"
                else hunyuan_forward(engine.dit(path), (5, 2, 14), 7))
    full = parameter_bytes(engine.dit(path))
    results = run_ranks(f"{tests_dir}/parity_targets.py:sharded_rank", 2,
                        dict(ulysses=2, ring=1, dit_path=path, family=family), timeout=240)
    for rank, result in enumerate(results):
        assert rel_error(result["out"], expected) <= 1e-5, f"rank {rank}"
        assert int(result["bytes"]) <= full * (1 / 2 + 0.05)


@pytest.fixture(scope="module")
def fp8_text_encoders(tiny_models, tiny_hunyuan, tmp_path_factory):
    """ComfyUI ships the text encoders in fp8 too (umt5_xxl_fp8_e4m3fn_scaled, llava_llama3_fp8_scaled)."""
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("fp8_text")
    files = {}
    for name, src in (("umt5", tiny_models["text_encoder"]), ("llama", tiny_hunyuan["llama"])):
        with safe_open(src, "pt") as f:
            meta = f.metadata() or {}
        for scaled in (False, True):
            files[(name, scaled)] = write_fp8(src, root / f"{name}_{scaled}.safetensors", meta, scaled)
    return files


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_umt5_stays_fp8_and_encodes_the_same(fp8_text_encoders, scaled):
    from usp_video.distributed.models.wan21.umt5 import load_umt5

    path = fp8_text_encoders[("umt5", scaled)]
    kept, dequantized = load_umt5(path), load_umt5(path, keep_fp8=False)
    linears = {n: m for n, m in kept.model.encoder.block.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8_layers = [n for n, m in linears.items() if m.weight.dtype == torch.float8_e4m3fn]
    # every Linear of the blocks but UMT5's `wo`, which transformers keeps in float32
    assert sorted(fp8_layers) == sorted(n for n in linears if not n.endswith(".wo")) and fp8_layers
    assert fp8.count_fp8_layers(kept.model) == len(fp8_layers)
    prompt = "a cat walks on the beach at sunset"
    assert rel_error(kept.encode(prompt), dequantized.encode(prompt)) <= 1e-6


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_llama_stays_fp8_and_encodes_the_same(fp8_text_encoders, tiny_hunyuan, scaled):
    from usp_video.distributed.models.hunyuan_video import text as hunyuan_text

    path = fp8_text_encoders[("llama", scaled)]
    kept, dequantized = hunyuan_text.load_llama(path), hunyuan_text.load_llama(path, keep_fp8=False)
    linears = [m for m in kept.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert parameter_bytes(kept) < parameter_bytes(dequantized)
    clip = hunyuan_text.load_clip_l(tiny_hunyuan["clip"])
    tokenizers = hunyuan_text.load_tokenizers(tiny_hunyuan["tokenizers"])
    prompt = "a red car drives through a city street at night"
    cond, pooled = hunyuan_text.HunyuanTextEncoder(kept, clip, *tokenizers).encode(prompt)
    expected, expected_pooled = hunyuan_text.HunyuanTextEncoder(dequantized, clip, *tokenizers).encode(prompt)
    assert rel_error(cond, expected) <= 1e-6 and rel_error(pooled, expected_pooled) <= 1e-6


def test_fp8_umt5_sharded_matches_fp8_unsharded(tests_dir, fp8_text_encoders, tiny_models):
    """fp8 storage and weight sharding together, for the text encoder (the DiT is checked above)."""
    path = fp8_text_encoders[("umt5", True)]
    from usp_video.distributed.requests import EncodeRequest

    expected = make_engine().encode(EncodeRequest(family="wan2.1", files={"text_encoder": path},
                                                  prompt="a cat walks on the beach at sunset"))["tokens"]
    results = run_ranks(f"{tests_dir}/parity_targets.py:sharded_rank", 2,
                        dict(ulysses=2, ring=1, dit_path=tiny_models["dit"], family="wan", text_encoder=path),
                        timeout=240)
    for rank, result in enumerate(results):
        assert rel_error(result["cond"], expected) <= 1e-5, f"rank {rank}"
        tokenizer = read_header(path)[0]["spiece_model"][0][0]  # read whole: every rank needs it
        assert int(result["te_read"]) <= (os.path.getsize(path) - tokenizer) * (1 / 2 + 0.05) + tokenizer


def test_an_e5m2_file_keeps_its_own_fp8_values(tiny_models, tmp_path):
    """A float8_e5m2 file: its layers keep e5m2, the file's values exactly (not re-rounded to e4m3fn, which
    loses small weights: 1.8% relative error and 191 of 4096 values zeroed on std-0.02 weights)."""
    state = {k: (v.to(torch.float8_e5m2) if v.dim() == 2 else v) for k, v in load_file(tiny_models["dit"]).items()}
    path = tmp_path / "e5m2.safetensors"
    save_file(state, str(path), metadata={wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)})
    model = wan.load_wan_transformer(str(path))
    weight = model.blocks[0].attn1.to_q.weight
    assert weight.dtype == torch.float8_e5m2 and fp8.count_fp8_layers(model) > 0
    assert torch.equal(weight.float(), state["blocks.0.self_attn.q.weight"].float())


# -- fp8 compute (the group's fp8_compute: torch._scaled_mm) ---------------------------------------------------------
# torch._scaled_mm runs on CPU in torch 2.13, so the path's arithmetic is checked here; the option itself is refused
# off CUDA GPUs of capability >= 8.9 (where it would be used), before anything loads.

FP8_COMPUTE_TOLERANCE = 1e-2  # the DiT output vs the cast path (docs/features.md); measured 4.6e-3 / 4.7e-3 (bf16 vs fp32: 5.3e-3)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_compute_is_within_its_tolerance_of_the_cast_path(fp8_files, scaled):
    model = wan.load_wan_transformer(fp8_files[("wan", scaled)])
    cast = forward("wan", model)
    assert fp8.use_scaled_mm(model) == fp8.count_fp8_layers(model) > 0  # every fp8 layer (sizes multiples of 16)
    err = rel_error(forward("wan", model), cast)
    assert 0 < err <= FP8_COMPUTE_TOLERANCE, f"fp8 compute vs the cast path: relative error {err:.2e}"


def test_fp8_compute_quantizes_the_input_per_tensor():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = fp8.quantize_per_tensor(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ()
    assert float(q.float().abs().max()) == 448.0  # the largest |x| lands on e4m3fn's largest value
    assert float(scale) == pytest.approx(float(x.abs().max()) / 448.0)
    assert rel_error(q.float() * scale, x) <= 2 ** -4  # 3 mantissa bits
    zeros, one = fp8.quantize_per_tensor(torch.zeros(4, 16))
    assert float(one) == 1.0 and not zeros.float().any()


def test_fp8_compute_is_refused_off_cuda_before_loading():
    from usp_video.distributed.config import GroupConfig

    with pytest.raises(ValueError, match="fp8_compute 'on' .* compute capability >= 8.9.*use fp8_compute 'off'"):
        GroupConfig(device="cpu", fp8_compute=True)
    assert "compute capability >= 8.9" in fp8.fp8_compute_unavailable("cpu")

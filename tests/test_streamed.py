"""The streamed load (formats/streamed.py) against the whole-file load it replaced: the same model from
the same file (fp8 and ComfyUI's scaled fp8 included), for the loaders whose key conversion selects
rows (HunyuanVideo's fused q/k/v) as for those that only rename. The sharded load is checked against
one process, with the bytes each rank reads, in test_sharding.py."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_error
from parity_targets import hunyuan_forward
from test_fp8 import write_fp8
from usp_video.distributed.formats import fp8, streamed
from usp_video.distributed.formats.checkpoint import (DIT_PREFIXES, CheckpointError, build_on_meta, dequantize,
                                                     keeps_fp32, load_state_dict, read_header, strip_prefix)
from usp_video.distributed.models.hunyuan_video import dit as hunyuan


# -- source_map: which file rows make each model tensor ----------------------------------------------

def test_source_map_follows_splits_swaps_and_renames():
    def convert(state):
        q, k, v = state["qkv.weight"].chunk(3, dim=0)
        first, second = torch.split(state["mod.weight"], [2, 4])
        return {"to_q.weight": q, "to_k.weight": k, "to_v.weight": v, "mod.weight": torch.cat([second, first]),
                "norm.weight": state["norm"], "both": torch.cat([state["mod.weight"][5:], v]), "scale": state["scale"]}

    tensors = {"qkv.weight": [9, 5], "mod.weight": [6, 5], "norm": [5], "scale": [], "dropped": [3, 3]}
    assert streamed.source_map(tensors, convert, "f.safetensors") == {
        "to_q.weight": [("qkv.weight", 0, 3)], "to_k.weight": [("qkv.weight", 3, 6)], "to_v.weight": [("qkv.weight", 6, 9)],
        "mod.weight": [("mod.weight", 2, 6), ("mod.weight", 0, 2)], "norm.weight": [("norm", 0, 5)],
        "both": [("mod.weight", 5, 6), ("qkv.weight", 6, 9)], "scale": [("scale", 0, 1)]}


@pytest.mark.parametrize("computes", [lambda t: t.float() * 2, lambda t: t.T, lambda t: t.reshape(-1, 3)],
                         ids=["arithmetic", "transpose", "reshape"])
def test_source_map_refuses_a_conversion_that_computes(computes):
    with pytest.raises(NotImplementedError, match="f.safetensors: the key conversion computes tensors \\(w\\)"):
        streamed.source_map({"w": [6, 4]}, lambda state: {"w": computes(state["w"])}, "f.safetensors")


# -- HunyuanVideo's DiT -----------------------------------------------------------------------------

def whole_file_hunyuan(path, keep_fp8=True):
    """HunyuanVideo's DiT as it was loaded before the streamed load: the whole file read, dequantized,
    converted, the model built from it, the fp8 Linear weights of the blocks put back in fp8."""
    from diffusers import HunyuanVideoTransformer3DModel

    shapes, metadata = read_header(path)
    config = hunyuan.infer_hunyuan_config(path, shapes, metadata)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    state = dequantize(strip_prefix(load_state_dict(path), DIT_PREFIXES), torch.float32,
                       keeps_fp32(HunyuanVideoTransformer3DModel), comfy_dit=True)
    model = build_on_meta(lambda: HunyuanVideoTransformer3DModel(**config), hunyuan.convert_to_diffusers(state, hidden),
                          path, "HunyuanVideo")
    if keep_fp8:
        fp8.keep_file_fp8(model, path, shapes, hunyuan.FP8_WITHIN,
                          lambda markers: hunyuan.convert_to_diffusers(strip_prefix(markers, DIT_PREFIXES), hidden))
    return model.eval()


@pytest.fixture(scope="module")
def hunyuan_files(tiny_hunyuan, tmp_path_factory):
    """The tiny DiT as stored (fp32), in ComfyUI's fp8_e4m3fn and in its scaled fp8 (per-tensor scales)."""
    import json

    from usp_video.distributed.models.hunyuan_video import tiny

    root, meta = tmp_path_factory.mktemp("streamed"), {hunyuan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_HUNYUAN_CONFIG)}
    return {"fp32": tiny_hunyuan["dit"], "fp8": write_fp8(tiny_hunyuan["dit"], root / "fp8.safetensors", meta, False),
            "fp8 scaled": write_fp8(tiny_hunyuan["dit"], root / "scaled.safetensors", meta, True)}


@pytest.mark.parametrize("storage", ["fp32", "fp8", "fp8 scaled"])
def test_streamed_hunyuan_dit_matches_the_whole_file_load(hunyuan_files, storage):
    path = hunyuan_files[storage]
    model, expected = hunyuan.load_hunyuan_transformer(path), whole_file_hunyuan(path)
    layers = fp8.count_fp8_layers(model)
    assert layers == fp8.count_fp8_layers(expected) and (layers > 0) == (storage != "fp32")
    assert rel_error(hunyuan_forward(model, (5, 2, 14), 7), hunyuan_forward(expected, (5, 2, 14), 7)) <= 1e-5
    whole = expected.state_dict()
    for name, value in model.state_dict().items():  # every tensor, not only those the forward weighs much
        assert value.dtype == whole[name].dtype and torch.equal(value, whole[name]), name


def test_a_file_tensor_of_the_wrong_width_is_named(tiny_hunyuan, tmp_path):
    """The rows of a file tensor must be the model tensor's rows: a file with the right names and a wrong
    shape is refused, naming the tensors, before any memory is allocated."""
    import json

    from safetensors.torch import save_file

    from usp_video.distributed.models.hunyuan_video import tiny

    state = load_file(tiny_hunyuan["dit"])
    state["double_blocks.0.img_attn_qkv.weight"] = state["double_blocks.0.img_attn_qkv.weight"][:, :-1].contiguous()
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path), metadata={hunyuan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_HUNYUAN_CONFIG)})
    with pytest.raises(CheckpointError, match=r"cut.safetensors: the model's transformer_blocks.0.attn.to_q.weight "
                                              r"\[96, 96\] does not fit the file's double_blocks.0.img_attn_qkv.weight "
                                              r"\[288, 95\] rows 0..96"):
        hunyuan.load_hunyuan_transformer(path)


# -- the text encoders ------------------------------------------------------------------------------

def whole_file_umt5(path, keep_fp8=True):
    """UMT5 as it was loaded before the streamed load (the whole file read, dequantized, built)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from usp_video.distributed.models.wan21 import umt5

    shapes, _ = read_header(path)
    state = load_state_dict(path)
    spiece = state.pop("spiece_model").numpy().tobytes()
    state = dequantize(state, torch.float32, keeps_fp32(UMT5EncoderModel))
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    model = build_on_meta(lambda: UMT5EncoderModel(UMT5Config(**umt5.umt5_config_from_shapes(shapes))), state, path,
                          "UMT5")
    if keep_fp8:
        fp8.keep_file_fp8(model, path, shapes, ("encoder.block.",), skip=keeps_fp32(UMT5EncoderModel))
    return umt5.Umt5TextEncoder(model.eval(), spiece)


def whole_file_llama(path, keep_fp8=True):
    """The Llama as it was loaded before the streamed load."""
    from transformers import LlamaConfig, LlamaModel

    from usp_video.distributed.formats.checkpoint import config_from_metadata
    from usp_video.distributed.models.hunyuan_video import text

    shapes, metadata = read_header(path)
    state = {k: v for k, v in dequantize(strip_prefix(load_state_dict(path), ("model.",)), torch.float32).items()
             if not k.startswith("lm_head.")}
    config = LlamaConfig(**config_from_metadata(metadata, text.LLAMA_CONFIG_KEY))
    model = build_on_meta(lambda: LlamaModel(config), state, path, "Llama")
    model.rotary_emb = type(model.rotary_emb)(model.config)
    if keep_fp8:
        fp8.keep_file_fp8(model, path, shapes, ("layers.",), lambda markers: strip_prefix(markers, ("model.",)))
    return model.eval()


def whole_file_clip(path):
    """CLIP-L as it was loaded before the streamed load (transformers' own load_state_dict)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from usp_video.distributed.formats.checkpoint import config_from_metadata
    from usp_video.distributed.models.hunyuan_video import text

    model = CLIPTextModel(CLIPTextConfig(**config_from_metadata(read_header(path)[1], text.CLIP_CONFIG_KEY)))
    state = {k.removeprefix("text_model."): v for k, v in load_file(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def text_files(tiny_models, tiny_hunyuan, tmp_path_factory):
    """The tiny text encoders as stored, the Llama with the lm_head and CLIP-L with the projection and
    position ids that ComfyUI's files carry (not read), and UMT5 and the Llama in fp8 and scaled fp8."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root, files = tmp_path_factory.mktemp("streamed_text"), {}
    for name, src, extra in (
            ("umt5", tiny_models["text_encoder"], {}),
            ("llama", tiny_hunyuan["llama"], {"lm_head.weight": torch.randn(40, 32)}),
            ("clip", tiny_hunyuan["clip"], {"text_projection.weight": torch.randn(16, 16),
                                            "text_model.embeddings.position_ids": torch.arange(77)[None]})):
        with safe_open(src, "pt") as f:
            meta = f.metadata() or {}
        files[(name, "fp32")] = str(root / f"{name}.safetensors")
        save_file(load_file(src) | extra, files[(name, "fp32")], metadata=meta)
        if name != "clip":
            for scaled in (False, True):
                files[(name, "fp8 scaled" if scaled else "fp8")] = write_fp8(
                    files[(name, "fp32")], root / f"{name}_{scaled}.safetensors", meta, scaled)
    return files


@pytest.mark.parametrize("storage", ["fp32", "fp8", "fp8 scaled"])
def test_streamed_umt5_matches_the_whole_file_load(text_files, storage):
    from usp_video.distributed.models.wan21 import umt5

    path = text_files[("umt5", storage)]
    encoder, expected = umt5.load_umt5(path), whole_file_umt5(path)
    assert encoder.tokenizer.serialized_model_proto() == expected.tokenizer.serialized_model_proto()
    layers = fp8.count_fp8_layers(encoder.model)
    assert layers == fp8.count_fp8_layers(expected.model) and (layers > 0) == (storage != "fp32")
    prompt = "a cat walks on the beach at sunset"
    assert rel_error(encoder.encode(prompt), expected.encode(prompt)) <= 1e-5
    _assert_same_tensors(encoder.model, expected.model)


def test_umt5_holds_one_embedding_under_both_names(text_files):
    """UMT5EncoderModel ties encoder.embed_tokens to shared: one parameter, read once, one copy."""
    from usp_video.distributed.models.wan21 import umt5

    model = umt5.load_umt5(text_files[("umt5", "fp32")]).model
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert len(list(model.parameters())) == len(list(model.named_parameters(remove_duplicate=False))) - 1


@pytest.mark.parametrize("storage", ["fp32", "fp8", "fp8 scaled"])
def test_streamed_llama_matches_the_whole_file_load(text_files, storage):
    from usp_video.distributed.models.hunyuan_video import text

    path = text_files[("llama", storage)]
    model, expected = text.load_llama(path), whole_file_llama(path)
    layers = fp8.count_fp8_layers(model)
    assert layers == fp8.count_fp8_layers(expected) and (layers > 0) == (storage != "fp32")
    ids = torch.randint(0, 40, (1, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, reference = model(input_ids=ids).last_hidden_state, expected(input_ids=ids).last_hidden_state
    assert rel_error(out, reference) <= 1e-5
    _assert_same_tensors(model, expected)


def test_streamed_clip_matches_the_whole_file_load(text_files, tiny_hunyuan):
    from usp_video.distributed.models.hunyuan_video import text

    path = text_files[("clip", "fp32")]
    model = text.load_clip_l(path)
    expected = whole_file_clip(tiny_hunyuan["clip"])  # the file as written, without the keys not read
    ids = torch.randint(0, 40, (1, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_error(model(input_ids=ids).pooler_output, expected(input_ids=ids).pooler_output) <= 1e-5
    _assert_same_tensors(model, expected)


def _assert_same_tensors(model, expected):
    """Every parameter and buffer, as stored (dtype and values), not only what a forward weighs much."""
    whole = dict(expected.named_parameters()) | dict(expected.named_buffers())
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        assert value.dtype == whole[name].dtype and torch.equal(value, whole[name]), name

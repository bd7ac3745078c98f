"""Model files: the real on-disk formats, offline, with clear errors for the wrong ones."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_error
from parity_targets import dit_inputs
from usp_video.distributed.models.hunyuan_video import tiny as hunyuan_tiny
from usp_video.distributed.models.wan21 import dit as wan, tiny, umt5, vae as wan_vae
from usp_video.distributed.formats.checkpoint import CheckpointError


def test_tiny_files_use_the_original_key_names(tiny_models):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

    dit_keys = set(load_file(tiny_models["dit"]))
    assert {"head.modulation", "blocks.0.self_attn.q.weight", "blocks.1.cross_attn.norm_k.weight",
            "blocks.0.norm3.weight", "text_embedding.0.weight", "time_projection.1.weight"} <= dit_keys
    converted = convert_wan_transformer_to_diffusers({k: None for k in dit_keys})
    assert set(converted) == set(WanTransformer3DModel(**tiny.TINY_WAN_CONFIG).state_dict())
    vae_keys = set(load_file(tiny_models["vae"]))
    assert {"decoder.middle.0.residual.0.gamma", "decoder.upsamples.4.shortcut.weight", "conv2.weight",
            "encoder.downsamples.5.time_conv.weight", "decoder.head.2.bias"} <= vae_keys
    assert set(convert_wan_vae_to_diffusers({k: None for k in vae_keys})) == set(
        AutoencoderKLWan(**tiny.TINY_VAE_CONFIG).state_dict())


def test_comfyui_prefix_and_diffusers_folder_load_the_same_model(tiny_models, tmp_path):
    model = wan.load_wan_transformer(tiny_models["dit"])
    x, t, ctx = dit_inputs((2, 4, 4))
    with torch.no_grad():
        expected = model(x, t, ctx, return_dict=False)[0]
    state = load_file(tiny_models["dit"])
    prefixed = tmp_path / "prefixed.safetensors"
    meta = {wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)}
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(prefixed), metadata=meta)
    model.save_pretrained(tmp_path / "diffusers")
    for path in (prefixed, tmp_path / "diffusers"):
        with torch.no_grad():
            out = wan.load_wan_transformer(path)(x, t, ctx, return_dict=False)[0]
        assert rel_error(out, expected) < 1e-6, path


def test_a_diffusers_folder_is_sharded_by_the_shard_step_once_loaded(tiny_models, tmp_path):
    """A folder load hands the loaded model to the shard step (formats/checkpoint.from_folder's shard), as a single
    file's streamed load shards per rank: the Wan DiT and the UMT5 encoder's folders."""
    wan.load_wan_transformer(tiny_models["dit"]).save_pretrained(tmp_path / "transformer")
    handed = []
    model = wan.load_wan_transformer(tmp_path / "transformer", shard=handed.append)
    assert handed == [model]
    encoder = umt5.load_umt5(tiny_models["text_encoder"])
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    spiece = load_file(tiny_models["text_encoder"])["spiece_model"].numpy().tobytes()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(spiece)
    handed.clear()
    loaded = umt5.load_umt5(tmp_path / "text_encoder", shard=handed.append)
    assert handed == [loaded.model]


def test_fp8_storage_loads(tiny_models, tmp_path):
    state = load_file(tiny_models["dit"])
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v) for k, v in state.items()}
    path = tmp_path / "tiny_fp8_e4m3fn.safetensors"
    save_file(fp8, str(path), metadata={wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)})
    model = wan.load_wan_transformer(path, torch.float32, keep_fp8=False)  # dequantized at load
    weight = model.blocks[0].attn1.to_q.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, state["blocks.0.self_attn.q.weight"].to(torch.float8_e4m3fn).float())
    kept = wan.load_wan_transformer(path, torch.float32)  # the default: stays fp8 (tests/test_fp8.py)
    assert kept.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn


def test_real_variant_configs_are_inferred_from_shapes(tmp_path):
    shapes = {"patch_embedding.weight": ([1536, 16, 1, 2, 2], "F16"), "head.modulation": ([1, 2, 1536], "F16")}
    shapes.update({f"blocks.{i}.self_attn.q.weight": ([1536, 1536], "F16") for i in range(30)})
    config = wan.infer_wan_config(Path("wan2.1_t2v_1.3B_fp16.safetensors"), shapes, {})
    assert (config["num_attention_heads"], config["num_layers"], config["ffn_dim"]) == (12, 30, 8960)
    shapes["patch_embedding.weight"] = ([5120, 16, 1, 2, 2], "F16")
    shapes.update({f"blocks.{i}.self_attn.q.weight": ([5120, 5120], "F16") for i in range(40)})
    assert wan.infer_wan_config(Path("x"), shapes, {})["num_attention_heads"] == 40


@pytest.mark.parametrize("which,loader,message", [
    ("vae", wan.load_wan_transformer, "is not a Wan 2.1 diffusion model (looks like a VAE)"),
    ("text_encoder", wan.load_wan_transformer, "(looks like a T5/UMT5 text encoder)"),
    ("dit", umt5.load_umt5, "is not a UMT5 text encoder"),
    ("dit", wan_vae.load_wan_vae, "is not a Wan 2.1 VAE"),
])
def test_wrong_family_is_named(tiny_models, which, loader, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loader(tiny_models[which])


def test_truncated_pickle_and_missing_files(tiny_models, tmp_path):
    data = Path(tiny_models["dit"]).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        wan.load_wan_transformer(truncated)
    pickle = tmp_path / "wan.pth"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        wan.load_wan_transformer(pickle)
    with pytest.raises(CheckpointError, match="not found"):
        wan.load_wan_transformer(tmp_path / "nope.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        wan.load_wan_transformer(text)


def test_text_encoder_output_matches_comfyui_conditioning(tiny_models):
    encoder = umt5.load_umt5(tiny_models["text_encoder"])
    short = encoder.encode("a cat walks on the beach")
    n = len(encoder.tokenize("a cat walks on the beach"))
    assert encoder.tokenize("a cat")[-1] == umt5.EOS_ID
    assert short.shape == (1, 512, 32)
    assert short[0, :n].abs().sum(-1).min() > 0 and short[0, n:].abs().max() == 0
    long_prompt = " ".join(["a red car drives through a city street"] * 80)
    long = encoder.encode(long_prompt)
    assert long.shape[1] == len(encoder.tokenize(long_prompt)) > 512
    assert encoder.encode("").shape == (1, 512, 32)  # just EOS


def test_vae_decodes_to_image_frames(tiny_models):
    vae = wan_vae.load_wan_vae(tiny_models["vae"])
    frames = wan_vae.decode_video(vae, torch.randn(1, 16, 3, 4, 6))
    assert frames.shape == (9, 32, 48, 3)
    assert 0 <= frames.min() and frames.max() <= 1


def test_umt5_from_a_diffusers_folder(tiny_models, tmp_path):
    encoder = umt5.load_umt5(tiny_models["text_encoder"])
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    spiece = load_file(tiny_models["text_encoder"])["spiece_model"].numpy().tobytes()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(spiece)
    folder = umt5.load_umt5(tmp_path / "text_encoder")
    torch.testing.assert_close(folder.encode("a bowl of fruit"), encoder.encode("a bowl of fruit"))


def test_bf16_load_keeps_the_fp32_modules(tiny_models):
    model = wan.load_wan_transformer(tiny_models["dit"], torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # modulation, as diffusers keeps it
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    x, t, ctx = dit_inputs((2, 4, 4))
    with torch.no_grad():
        out = model(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0]
        ref = wan.load_wan_transformer(tiny_models["dit"])(x, t, ctx, return_dict=False)[0]
    assert rel_error(out.float(), ref) < 0.05


# -- HunyuanVideo ----------------------------------------------------------------------------------

def test_hunyuan_files_use_the_original_key_names(tiny_hunyuan):
    from diffusers import HunyuanVideoTransformer3DModel

    from usp_video.distributed.models.hunyuan_video import dit as hunyuan

    keys = set(load_file(tiny_hunyuan["dit"]))
    assert {"img_in.proj.weight", "double_blocks.0.img_attn_qkv.weight", "double_blocks.1.txt_mlp.fc2.bias",
            "single_blocks.0.linear1.weight", "single_blocks.1.modulation.linear.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", "final_layer.adaLN_modulation.1.weight",
            "guidance_in.mlp.0.weight", "vector_in.in_layer.weight"} <= keys
    hidden = hunyuan_tiny.TINY_HUNYUAN_CONFIG["num_attention_heads"] * hunyuan_tiny.TINY_HUNYUAN_CONFIG["attention_head_dim"]
    converted = hunyuan.convert_to_diffusers(load_file(tiny_hunyuan["dit"]), hidden)
    assert set(converted) == set(HunyuanVideoTransformer3DModel(**hunyuan_tiny.TINY_HUNYUAN_CONFIG).state_dict())


@pytest.mark.parametrize("storage", ["prefixed fp32", "bf16", "fp8_e4m3fn", "diffusers folder"])
def test_hunyuan_storage_formats_load(tiny_hunyuan, tmp_path, storage):
    from parity_targets import hunyuan_forward

    from usp_video.distributed.models.hunyuan_video import dit as hunyuan

    reference = hunyuan.load_hunyuan_transformer(tiny_hunyuan["dit"])
    state = load_file(tiny_hunyuan["dit"])
    meta = {hunyuan.CONFIG_METADATA_KEY: json.dumps(hunyuan_tiny.TINY_HUNYUAN_CONFIG)}
    path = tmp_path / "hunyuan_video_t2v.safetensors"
    if storage == "prefixed fp32":
        save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(path), metadata=meta)
    elif storage == "diffusers folder":
        reference.save_pretrained(tmp_path / "transformer")
        path = tmp_path / "transformer"
    else:
        dtype = torch.bfloat16 if storage == "bf16" else torch.float8_e4m3fn
        stored = {k: (v.to(dtype) if v.dim() >= 2 else v) for k, v in state.items()}
        save_file(stored, str(path), metadata=meta)
        # the same rounding applied to the reference's weights: then the models must agree exactly
        reference = hunyuan.load_hunyuan_transformer(_round_trip(tiny_hunyuan["dit"], tmp_path, dtype, meta))
    model = hunyuan.load_hunyuan_transformer(path, torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    out, expected = hunyuan_forward(model, (2, 4, 4), 7), hunyuan_forward(reference, (2, 4, 4), 7)
    assert rel_error(out, expected) < 1e-6


def _round_trip(path, tmp_path, dtype, meta) -> Path:
    rounded = {k: (v.to(dtype).float() if v.dim() >= 2 else v) for k, v in load_file(path).items()}
    out = tmp_path / "rounded.safetensors"
    save_file(rounded, str(out), metadata=meta)
    return out


def test_hunyuan_release_config_is_inferred_from_shapes():
    from usp_video.distributed.models.hunyuan_video import dit as hunyuan

    shapes = {"img_in.proj.weight": ([3072, 16, 1, 2, 2], "BF16"), "guidance_in.mlp.0.weight": ([3072, 256], "BF16"),
              "txt_in.individual_token_refiner.blocks.0.norm1.weight": ([3072], "BF16")}
    shapes.update({f"double_blocks.{i}.img_attn_qkv.weight": ([9216, 3072], "BF16") for i in range(20)})
    shapes.update({f"single_blocks.{i}.linear1.weight": ([21504, 3072], "BF16") for i in range(40)})
    config = hunyuan.infer_hunyuan_config(Path("hunyuan_video_t2v_720p_bf16.safetensors"), shapes, {})
    assert (config["num_attention_heads"], config["num_layers"], config["num_single_layers"]) == (24, 20, 40)
    shapes["img_in.proj.weight"] = ([3072, 33, 1, 2, 2], "BF16")
    with pytest.raises(CheckpointError, match="33 input channels"):
        hunyuan.infer_hunyuan_config(Path("hunyuan_video_image_to_video_720p_bf16.safetensors"), shapes, {})


def test_hunyuan_text_encoder_crops_the_template(tiny_hunyuan):
    from usp_video.distributed.models.hunyuan_video import text as hunyuan_text

    llama_tok, clip_tok = hunyuan_text.load_tokenizers(tiny_hunyuan["tokenizers"])
    encoder = hunyuan_text.HunyuanTextEncoder(hunyuan_text.load_llama(tiny_hunyuan["llama"]),
                                              hunyuan_text.load_clip_l(tiny_hunyuan["clip"]), llama_tok, clip_tok)
    prompt = "a cat walks on the beach"
    ids = encoder.llama_ids(prompt)[0, encoder.crop_start:].tolist()
    assert llama_tok.decode(ids) == prompt + "<|eot_id|>"  # the prompt and the closing eot, no template
    tokens, pooled = encoder.encode(prompt)
    with torch.no_grad():
        hidden = encoder.llama(input_ids=encoder.llama_ids(prompt), output_hidden_states=True).hidden_states
    torch.testing.assert_close(tokens, hidden[-3][:, encoder.crop_start:])  # third-to-last layer
    assert tokens.shape == (1, len(ids), 32) and pooled.shape == (1, 16)

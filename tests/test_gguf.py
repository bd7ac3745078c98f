"""GGUF DiT files (city96's layout): the dequantizers against the gguf package's own, the weights kept
quantized against the same file dequantized at load, N sharded ranks against one process, and the errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import rel_error
from parity_targets import dit_forward, hunyuan_forward, make_engine
from test_fp8 import forward
from usp_video.distributed.formats import gguf as gguf_weights, streamed
from usp_video.distributed.models import CheckpointError, detect_dit
from usp_video.distributed.models.hunyuan_video import dit as hunyuan
from usp_video.distributed.models.tiny import save_gguf
from usp_video.distributed.models.wan21 import dit as wan, tiny as wan_tiny
from usp_video.distributed.parallel.fsdp import parameter_bytes
from usp_video.distributed.testing.spawn import run_ranks

gguf = pytest.importorskip("gguf")

QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# A Wan DiT whose Linear layers take 256 inputs: whole K-quant blocks per row (the tiny set's 96 do not)
WIDE_WAN = dict(wan_tiny.TINY_WAN_CONFIG, num_attention_heads=4, attention_head_dim=64, ffn_dim=256)
# The fp16 scale fields of each type's block (byte offsets), given sane values in random blocks
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def wan_state(config, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return wan_tiny.wan_to_original_keys(WanTransformer3DModel(**config).state_dict())


@pytest.fixture(scope="module")
def gguf_files(tiny_models, tiny_hunyuan, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    wide, meta = wan_state(WIDE_WAN), {wan.CONFIG_METADATA_KEY: json.dumps(WIDE_WAN)}
    files = {("wan", q): str(root / f"wan_{q}.gguf") for q in QTYPES}
    for q in QTYPES:
        save_gguf(wide, files[("wan", q)], "wan", q, metadata=meta)
    # the tiny set's Wan (96 wide): Q4_K rows are not whole blocks, so city96 stores them as 256-value rows
    files[("wan96", "Q4_K")] = str(root / "wan96_Q4_K.gguf")
    save_gguf(load_file(tiny_models["dit"]), files[("wan96", "Q4_K")], "wan", "Q4_K",
              metadata={wan.CONFIG_METADATA_KEY: json.dumps(wan_tiny.TINY_WAN_CONFIG)})
    with safe_open(tiny_hunyuan["dit"], "pt") as f:
        hy_meta = f.metadata()
    files[("hunyuan", "Q8_0")] = str(root / "hunyuan_Q8_0.gguf")
    save_gguf(load_file(tiny_hunyuan["dit"]), files[("hunyuan", "Q8_0")], "hyvid", "Q8_0", metadata=hy_meta)
    return files


def reference_values(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as the gguf package dequantizes it, in its real shape (comfy.gguf.orig_shape,
    else the ggml shape reversed): the reference, independent of our reader."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = [int(field.parts[i][0]) for i in field.data] if field else [int(v) for v in reversed(t.shape)]
        out[t.name] = values.reshape(shape).astype(np.float32)
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantizers_equal_the_gguf_package(qtype):
    """Random blocks (every bit pattern of the quants, sane fp16 scales), and where the gguf package can
    write the type, its own quantization of random numbers: our torch dequantizer == gguf.quants.dequantize."""
    rng = np.random.default_rng(1)
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(96, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = rng.normal(0, 0.05, size=96).astype(np.float16).view(np.uint8).reshape(96, 2)
    samples = [blocks.reshape(8, -1)]
    try:
        samples.append(gguf.quants.quantize(rng.normal(size=(4, 2 * block)).astype(np.float32), kind))
    except NotImplementedError:  # K-quants: the package dequantizes them but cannot write them
        pass
    for raw in samples:
        expected = gguf.quants.dequantize(raw, kind)
        ours = gguf_weights.dequantize(torch.from_numpy(raw), qtype).numpy()
        assert ours.shape == expected.shape and np.array_equal(ours, expected), f"{qtype}: max |diff| " \
            f"{np.abs(ours - expected).max():.3e}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_stays_quantized_and_equals_the_weights_dequantized_at_load(gguf_files, qtype):
    path = gguf_files[("wan", qtype)]
    kept, dequantized = wan.load_wan_transformer(path), wan.load_wan_transformer(path, keep_fp8=False)
    layers = gguf_weights.quantized_layers(kept)
    linears = [f"blocks.{i}.{n}" for i, b in enumerate(kept.blocks) for n, m in b.named_modules()
               if isinstance(m, torch.nn.Linear)]
    assert sorted(layers) == sorted(linears) and set(layers.values()) == {qtype}  # every block Linear, its type
    assert all(m.weight.dtype == torch.uint8 for m in kept.modules() if isinstance(m, gguf_weights.QuantizedLinear))
    assert gguf_weights.quantized_layers(dequantized) == {}
    assert parameter_bytes(kept) < 0.5 * parameter_bytes(dequantized)
    # the values loaded are the file's, as the gguf package reads them (names: the file's, shapes: real)
    expected = reference_values(path)
    state = dequantized.state_dict()
    for file_name, model_name in (("blocks.0.ffn.2.weight", "blocks.0.ffn.net.2.weight"),
                                  ("blocks.1.self_attn.q.weight", "blocks.1.attn1.to_q.weight"),
                                  ("patch_embedding.weight", "patch_embedding.weight")):  # 5-D: orig_shape
        assert np.array_equal(state[model_name].numpy(), expected[file_name]), model_name
    assert rel_error(forward("wan", kept), forward("wan", dequantized)) <= 1e-6


def test_rows_that_are_not_whole_blocks_are_dequantized_at_load(gguf_files):
    """city96 stores a tensor whose rows are not whole blocks as rows of 256 values (comfy.gguf.orig_shape):
    such a layer cannot be read by rows nor kept quantized per row; it is dequantized at load, exactly."""
    path = gguf_files[("wan96", "Q4_K")]
    reader = gguf_weights.GGUFFile(path)
    assert reader.qtype("blocks.0.ffn.0.weight") == "Q4_K" and not reader.row_selectable("blocks.0.ffn.0.weight")
    model = wan.load_wan_transformer(path)
    assert gguf_weights.quantized_layers(model) == {}
    expected = reference_values(path)
    state = model.state_dict()
    assert np.array_equal(state["blocks.0.ffn.net.0.proj.weight"].numpy(), expected["blocks.0.ffn.0.weight"])
    assert np.array_equal(state["blocks.1.attn2.to_out.0.weight"].numpy(), expected["blocks.1.cross_attn.o.weight"])


def test_hunyuan_gguf_splits_its_fused_layers_by_quantized_rows(gguf_files):
    path = gguf_files[("hunyuan", "Q8_0")]
    kept = hunyuan.load_hunyuan_transformer(path)
    dequantized = hunyuan.load_hunyuan_transformer(path, keep_fp8=False)
    layers = gguf_weights.quantized_layers(kept)
    # img_attn.qkv is split by rows into to_q, to_k, to_v, each still Q8_0
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v"} <= set(layers) and set(layers.values()) == {"Q8_0"}
    expected = reference_values(path)["double_blocks.0.img_attn_qkv.weight"]
    q = dequantized.state_dict()["transformer_blocks.0.attn.to_k.weight"].numpy()
    assert np.array_equal(q, expected[q.shape[0]: 2 * q.shape[0]])
    assert rel_error(forward("hunyuan", kept), forward("hunyuan", dequantized)) <= 1e-6


def test_gguf_sharded_ranks_equal_one_process(tests_dir, gguf_files):
    """FSDP2 shards the quantized bytes by rows like any parameter: N ranks (2, and 3: uneven shards and
    uneven tokens) == one process; each rank holds and reads about 1/N of the file."""
    cases = {2: [("wan", "Q4_K", 2, 1), ("hunyuan", "Q8_0", 2, 1)], 3: [("wan", "Q6_K", 1, 3)]}
    for world_size, runs in cases.items():
        args = [dict(ulysses=u, ring=r, dit_path=gguf_files[(family, q)], family=family.replace("wan96", "wan"))
                for family, q, u, r in runs]
        results = run_ranks(f"{tests_dir}/parity_targets.py:run_cases", world_size,
                            dict(target="sharded_rank", cases=args), timeout=300)
        for i, case in enumerate(args):
            engine = make_engine()
            model = engine.dit(case["dit_path"])
            expected = dit_forward(engine, case["dit_path"], (5, 2, 14)) if case["family"] == "wan" else \
                hunyuan_forward(model, (5, 2, 14), 7)
            full, size = parameter_bytes(model), os.path.getsize(case["dit_path"])
            assert gguf_weights.quantized_layers(model)
            for rank, result in enumerate(results):
                label = f"{Path(case['dit_path']).name} on {world_size} ranks, rank {rank}"
                assert rel_error(result[f"{i}/out"], expected) <= 1e-5, label
                held, read = int(result[f"{i}/bytes"]), int(result[f"{i}/read"])
                assert held <= full * (1 / world_size + 0.05), f"{label} holds {held} of {full} bytes"
                assert read <= size * (1 / world_size + 0.05), f"{label} read {read} of {size} bytes"


def test_the_load_preflight_counts_quantized_bytes(gguf_files):
    """The memory pre-flight's prediction for a GGUF file follows what stays quantized."""
    path = gguf_files[("wan", "Q4_K")]
    kept = parameter_bytes(wan.load_wan_transformer(path))
    dequantized = parameter_bytes(wan.load_wan_transformer(path, keep_fp8=False))
    predicted = streamed.load_peak_bytes(path, torch.float32, 1, keep_within=("blocks.",))
    assert kept <= predicted - streamed.LOAD_MARGIN < dequantized
    assert streamed.load_peak_bytes(path, torch.float32, 1) - streamed.LOAD_MARGIN >= dequantized


def test_the_loader_lists_gguf_files_and_reports_the_quantization(tiny_models, monkeypatch):
    from usp_video.nodes import NODE_CLASSES, model_socket, services

    monkeypatch.setattr(services, "IN_COMFYUI", False)
    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit_gguf"]).parents[1]))
    names = services.list_models("diffusion_models")
    assert Path(tiny_models["dit_gguf"]).name in names and Path(tiny_models["dit"]).name in names
    assert not any(n.endswith(".gguf") for n in services.list_models("vae"))
    for node in ("UspLoadDiffusionModel", "UspWanModelLoader"):  # the generic loader and the deprecated Wan one
        widget = next(i for i in NODE_CLASSES[node].GET_SCHEMA().inputs if i.id == "model_name")
        assert Path(tiny_models["dit_gguf"]).name in widget.options, node
    engine = make_engine()
    info = engine._dit_info([tiny_models["dit_gguf"]], None, [])
    assert len(info["quantized_layers"]) == 20 and set(info["quantized_layers"].values()) == {"Q8_0"}
    text = model_socket.quantization_text(info["quantized_layers"])
    assert "20 layers stay quantized (Q8_0 20)" in text and "blocks.*.ffn.net.2 Q8_0" in text
    # the tiny set's GGUF holds the same weights as its .safetensors file, to Q8_0's precision
    assert rel_error(dit_forward(engine, tiny_models["dit_gguf"], (3, 4, 6)),
                     dit_forward(make_engine(), tiny_models["dit"], (3, 4, 6))) < 0.05


def test_bad_gguf_files_are_named(gguf_files, tmp_path):
    path = Path(gguf_files[("wan", "Q8_0")])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf.*(truncated|cut short)"):
        wan.load_wan_transformer(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="header.gguf"):
        detect_dit(header)
    # a GGUF where a VAE or text encoder is expected
    from usp_video.distributed.formats.checkpoint import load_state_dict

    with pytest.raises(CheckpointError, match="GGUF is read for diffusion models"):
        load_state_dict(path)
    # a GGUF of something else (a llama.cpp text model's names)
    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="llama.gguf is"):
        detect_dit(other)


def test_wan22_experts_and_5b_load_from_gguf(tiny_wan22, tiny_5b, tmp_path):
    """city96's Wan 2.2 files: each A14B expert, and the TI2V-5B (48 channels: its own family claims it), from
    GGUF through the engine, quantized, equal to the same files dequantized at load."""
    from parity_targets import dit_inputs, ti2v_inputs

    cases = [("wan2.2-a14b", tiny_wan22["high_noise"], dit_inputs), ("wan2.2-a14b", tiny_wan22["low_noise"], dit_inputs),
             ("wan2.2-ti2v-5b", tiny_5b["dit"], ti2v_inputs)]
    for family, source, inputs in cases:
        with safe_open(source, "pt") as f:
            meta = f.metadata()
        path = str(tmp_path / (Path(source).stem + "_Q8_0.gguf"))
        save_gguf(load_file(source), path, "wan", "Q8_0", metadata=meta)
        assert detect_dit(path, family).name == family
        engine = make_engine()
        layers = engine._dit_info([path], family, [])["quantized_layers"]
        assert layers and set(layers.values()) == {"Q8_0"}, family
        x, t, context = inputs((3, 4, 6))
        with torch.no_grad():
            out = engine.dit(path, family)(x, t, context, return_dict=False)[0]
            expected = wan.load_wan_transformer(path, keep_fp8=False)(x, t, context, return_dict=False)[0]
        assert rel_error(out, expected) <= 1e-6, family

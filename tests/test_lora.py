"""LoRAs on every rank: each layout ComfyUI reads, against the same weights merged into the file (loaded
through the loaders); stacked LoRAs and strengths re-applied without reading the base model again; fp8 and
GGUF weights; N sharded ranks against one process; bad LoRA files named. The check against ComfyUI's own
LoraLoaderModelOnly + KSampler is tests/comfyui_reference/lora.py (test_comfyui_native.py)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import rel_error
from parity_targets import lora_request, make_engine
from usp_video.distributed.formats import lora
from usp_video.distributed.models import CheckpointError
from usp_video.distributed.models.hunyuan_video.lora_names import lora_aliases as hunyuan_aliases
from usp_video.distributed.testing.spawn import run_ranks


def merge(base: str, loras: list, out: Path, aliases=lambda stem: []) -> str:
    """The base file with the LoRAs merged into its weights as ComfyUI merges them (W + strength x alpha/rank
    x up @ down; + strength x diff; biases + strength x diff_b), written as a file of the same layout: the
    independent reference (the loader then splits fused tensors by itself)."""
    state = {k: v.float().clone() for k, v in load_file(base).items()}
    with safe_open(base, "pt") as f:
        meta = f.metadata()
    names = {}
    for key in state:
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        for name in (f"diffusion_model.{stem}", f"lora_unet_{stem.replace('.', '_')}", *aliases(stem)):
            names[name] = key
    for path, strength in loras:
        tensors = load_file(path)
        for key, value in tensors.items():
            m = re.match(r"(.+)\.(lora_up|lora_B)\.weight$", key)
            if m:
                stem = m[1]
                down = tensors[f"{stem}.{'lora_down' if m[2] == 'lora_up' else 'lora_A'}.weight"]
                alpha = tensors.get(f"{stem}.alpha")
                scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
                target = names[stem]
                state[target] += scale * (value.float() @ down.float()).reshape(state[target].shape)
            elif key.endswith(".diff_b"):
                target = names[key[: -len(".diff_b")]]
                state[target[: -len("weight")] + "bias"] += strength * value.float()
            elif key.endswith(".diff"):
                target = names[key[: -len(".diff")]]
                state[target] += strength * value.float().reshape(state[target].shape)
    save_file(state, str(out), metadata=meta)
    return str(out)


def sample(dit, family, loras, engine=None):
    engine = engine or make_engine()
    return engine.sample(lora_request(dit, family, [[str(p), s] for p, s in loras])).latent


@pytest.mark.parametrize("layout", ["kohya", "peft", "distill"])
def test_each_wan_layout_equals_its_weights_merged(tiny_models, layout, tmp_path):
    loras = [(tiny_models[f"lora_{layout}"], 0.8)]
    reference = sample(merge(tiny_models["dit"], loras, tmp_path / "merged.safetensors"), "wan", [])
    assert rel_error(sample(tiny_models["dit"], "wan", loras), reference) <= 1e-5
    assert rel_error(sample(tiny_models["dit"], "wan", []), reference) > 1e-2  # the LoRA does change the video


def test_hunyuan_lora_on_fused_layers_is_split_as_the_loader_splits_them(tiny_hunyuan, tmp_path):
    """diffusion-pipe's names (transformer.<...>.img_attn_qkv, linear1): the q/k/v (and mlp) rows of the
    LoRA's up matrix go where the loader puts the rows of the fused weight."""
    loras = [(tiny_hunyuan["lora"], 1.0)]
    assert any("img_attn_qkv" in k for k in load_file(tiny_hunyuan["lora"]))
    assert any("linear1" in k for k in load_file(tiny_hunyuan["lora"]))
    reference = sample(merge(tiny_hunyuan["dit"], loras, tmp_path / "merged.safetensors", hunyuan_aliases),
                       "hunyuan", [])
    assert rel_error(sample(tiny_hunyuan["dit"], "hunyuan", loras), reference) <= 1e-5


def test_stacked_loras_and_new_strengths_never_reread_the_base_model(tiny_models, tmp_path):
    engine = make_engine()
    base = sample(tiny_models["dit"], "wan", [], engine)
    stacked = [(tiny_models["lora_kohya"], 1.0), (tiny_models["lora_distill"], 0.6)]
    first = sample(tiny_models["dit"], "wan", stacked, engine)
    assert rel_error(first, sample(merge(tiny_models["dit"], stacked, tmp_path / "m.safetensors"), "wan", [])) <= 1e-5
    assert engine.load_counts["dit"] == 1 and engine.load_counts["lora"] == 2
    again = sample(tiny_models["dit"], "wan", stacked, engine)  # the same list: nothing re-read, the same video
    assert torch.equal(again, first) and engine.load_counts["lora"] == 2
    weaker = [(tiny_models["lora_kohya"], 1.0), (tiny_models["lora_distill"], 0.3)]
    out = sample(tiny_models["dit"], "wan", weaker, engine)
    assert rel_error(out, sample(merge(tiny_models["dit"], weaker, tmp_path / "w.safetensors"), "wan", [])) <= 1e-5
    assert engine.load_counts["dit"] == 1 and engine.load_counts["lora"] == 4  # LoRA files only
    assert torch.equal(sample(tiny_models["dit"], "wan", [], engine), base)  # removed: the base model exactly


def test_loras_on_fp8_and_gguf_weights(tiny_models, tmp_path):
    """fp8 and GGUF weights stay as stored (the LoRA is added beside them): the same as the LoRA merged into the
    weights dequantized at load."""
    from test_fp8 import write_fp8
    from test_gguf import reference_values
    from usp_video.distributed.models.wan21 import dit as wan, tiny

    meta = {wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)}
    fp8_file = write_fp8(tiny_models["dit"], tmp_path / "fp8.safetensors", meta, scaled=False)
    dequantized = tmp_path / "fp8_dequantized.safetensors"
    save_file({k: v.float() for k, v in load_file(fp8_file).items()}, str(dequantized), metadata=meta)
    gguf_dequantized = tmp_path / "gguf_dequantized.safetensors"
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference_values(tiny_models["dit_gguf"]).items()},
              str(gguf_dequantized), metadata=meta)
    loras = [(tiny_models["lora_distill"], 0.7)]
    for stored, plain in ((fp8_file, dequantized), (tiny_models["dit_gguf"], gguf_dequantized)):
        engine = make_engine()
        out = sample(stored, "wan", loras, engine)
        model = engine.dit(stored)
        assert any(p.dtype in (torch.float8_e4m3fn, torch.uint8) for p in model.parameters())  # still compact
        expected = sample(merge(str(plain), loras, tmp_path / f"{Path(plain).stem}_m.safetensors"), "wan", [])
        assert rel_error(out, expected) <= 1e-5, Path(stored).name


def test_sharded_ranks_with_loras_equal_one_process(tests_dir, tiny_models, tiny_hunyuan, tmp_path):
    """N ranks with sharded weights (2, and 3: uneven shards and tokens) == one process, with stacked LoRAs,
    on Wan (plain, fp8 and GGUF weights) and HunyuanVideo (its fused layers)."""
    from test_fp8 import write_fp8
    from usp_video.distributed.models.wan21 import dit as wan, tiny

    fp8_file = write_fp8(tiny_models["dit"], tmp_path / "fp8.safetensors",
                         {wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)}, scaled=True)
    wan_loras = [[tiny_models["lora_peft"], 1.0], [tiny_models["lora_distill"], 0.6]]
    cases = {2: [("wan", tiny_models["dit"], wan_loras, 2, 1), ("hunyuan", tiny_hunyuan["dit"],
                                                                [[tiny_hunyuan["lora"], 1.0]], 2, 1),
                 ("wan", fp8_file, wan_loras, 1, 2)],
             3: [("wan", tiny_models["dit_gguf"], wan_loras, 1, 3)]}
    for world_size, runs in cases.items():
        args = [dict(ulysses=u, ring=r, dit_path=d, family=f, loras=l, shard_weights="on") for f, d, l, u, r in runs]
        results = run_ranks(f"{tests_dir}/parity_targets.py:run_cases", world_size,
                            dict(target="lora_rank", cases=args), timeout=300)
        for i, case in enumerate(args):
            expected = sample(case["dit_path"], case["family"], case["loras"])
            for rank, result in enumerate(results):
                assert rel_error(result[f"{i}/latent"], expected) <= 1e-5, f"{case['family']} {world_size} rank {rank}"


def test_bad_loras_are_named(tiny_models, tiny_hunyuan, tmp_path):
    from usp_video.distributed.models import get

    source, shapes = get("wan2.1").dit_source_map(tiny_models["dit"])
    # a LoRA for another model: none of its keys names a layer of this one
    with pytest.raises(CheckpointError, match="tiny_hunyuan_lora_diffusion_pipe.safetensors: none of its 52 keys"):
        lora.read_lora(tiny_hunyuan["lora"], 1.0, shapes)
    # another size of this model: the shapes are named
    wide = {k: [2 * s[0], *s[1:]] for k, s in shapes.items()}
    with pytest.raises(CheckpointError, match="tiny_wan_lora_kohya.safetensors: diffusion_model.blocks.0.cross_attn.k is up .* "
                                              "which does not fit the model.s blocks.0.cross_attn.k.weight"):
        lora.read_lora(tiny_models["lora_kohya"], 1.0, wide)
    # adapter kinds not implemented are refused by name
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(4, 2),
               "lora_unet_blocks_0_self_attn_q.hada_w1_b": torch.zeros(2, 4)}, str(loha))
    with pytest.raises(CheckpointError, match="loha.safetensors is a LoHa adapter"):
        lora.read_lora(loha, 1.0, shapes)
    dora = tmp_path / "dora.safetensors"
    state = load_file(tiny_models["lora_kohya"])
    save_file({**state, "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, 96)}, str(dora))
    with pytest.raises(CheckpointError, match="DoRA"):
        lora.read_lora(dora, 1.0, shapes)
    # a LoRA that matches part of the model: applied, with a warning that counts
    partial = tmp_path / "partial.safetensors"
    save_file({**state, "diffusion_model.vace_blocks.0.proj.lora_up.weight": torch.zeros(8, 4),
               "diffusion_model.vace_blocks.0.proj.lora_down.weight": torch.zeros(4, 8)}, str(partial))
    patches, report = lora.read_lora(partial, 1.0, shapes)
    assert report.layers == 20 and len(report.unmatched) == 2
    assert "2 of 62 keys match no layer" in report.warning() and "20 layers are changed" in report.warning()
    # through the sampler: the message reaches the caller, naming the file
    with pytest.raises(CheckpointError, match="loha.safetensors"):
        sample(tiny_models["dit"], "wan", [(loha, 1.0)])


def test_lora_nodes_chain_per_expert(tiny_models, monkeypatch):
    """The deprecated Wan 2.2 LoRA node (expert both / high_noise) and the generic USP LoRA (all / high_noise)
    chain LoRAs per expert alike, leaving their input socket unchanged; a NaN strength is refused by both."""
    from comfy_executor import call
    from usp_video.nodes import services

    monkeypatch.setattr(services, "IN_COMFYUI", False)
    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    assert "tiny_wan_lora_kohya.safetensors" in services.list_models("loras")
    socket = {"path": "high.safetensors", "experts": ["high.safetensors", "low.safetensors"],
              "info": {"family": "wan2.2-a14b", "model": "Wan 2.2 A14B"}}
    chains = []
    for node, both in (("UspWan22Lora", "both"), ("UspLoraLoader", "all")):
        (one,) = call(node, model=socket, lora_name="tiny_wan_lora_kohya.safetensors", strength=1.0,
                      expert="high_noise")
        (two,) = call(node, model=one, lora_name="tiny_wan_lora_distill.safetensors", strength=0.5, expert=both)
        assert [Path(f).name for f, _ in two["loras"]["high.safetensors"]] == ["tiny_wan_lora_kohya.safetensors",
                                                                               "tiny_wan_lora_distill.safetensors"]
        assert [s for _, s in two["loras"]["low.safetensors"]] == [0.5] and "loras" not in socket  # inputs unchanged
        chains.append(two["loras"])
    assert chains[0] == chains[1]
    for node in ("UspLora", "UspLoraLoader"):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            call(node, model=socket, lora_name="tiny_wan_lora_kohya.safetensors", strength=float("nan"))


def test_loras_added_changed_and_removed_under_compile(tiny_models):
    """Compiled blocks (aot_eager) see LoRAs come, change strength and go between runs: each run equals the
    uncompiled one (a graph compiled without the hooks would silently ignore them)."""
    eager, compiled = make_engine(), make_engine(compile="aot_eager")
    for loras in ([], [(tiny_models["lora_kohya"], 1.0)], [(tiny_models["lora_kohya"], 0.3)], []):
        expected = sample(tiny_models["dit"], "wan", loras, eager)
        assert rel_error(sample(tiny_models["dit"], "wan", loras, compiled), expected) <= 1e-5, loras


def test_lora_tensors_move_with_their_model_and_warnings_repeat(tiny_models, tmp_path):
    """The hooks' tensors are buffers of their layers, so the placement's park / bring (module.to) moves them
    with the model; a LoRA that matches part of the model warns on every run, not only the one that read it."""
    partial = tmp_path / "partial.safetensors"
    save_file({**load_file(tiny_models["lora_kohya"]),
               "diffusion_model.vace_blocks.0.proj.lora_up.weight": torch.zeros(8, 4),
               "diffusion_model.vace_blocks.0.proj.lora_down.weight": torch.zeros(4, 8)}, str(partial))
    engine = make_engine()
    for _ in range(2):
        warnings = engine.sample(lora_request(tiny_models["dit"], "wan", [[str(partial), 1.0]])).lora_warnings
        assert len(warnings) == 1 and "2 of 62 keys match no layer" in warnings[0]
    model = engine.dit(tiny_models["dit"])
    held = [name for name, _ in model.named_buffers() if ".usp_lora_" in name]
    assert len(held) == 40  # a down and an up for each of the 20 Linear layers of the blocks
    model.to("meta")
    assert all(b.is_meta for name, b in model.named_buffers() if ".usp_lora_" in name)

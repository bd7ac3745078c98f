"""A native MODEL on the USP group (nodes/native_nodes.py, nodes/native_chain.py; the generic samplers and the
deprecated adapter nodes take one) without ComfyUI: the graph walk over API-format prompts, the cross-check of the
chain against a MODEL's patches, and the samplers refusing a shift that differs from the native MODEL's. The real
server runs the chain in test_comfyui_integration.py."""

from collections import Counter

import pytest
import torch

from comfy_executor import call
from usp_video.nodes import NODE_CLASSES, native_chain as native
from usp_video.nodes.samplers import model_shift


def prompt(*middle, adapter_input="model"):
    """UNETLoader "1" -> middle nodes "2", "3", ... -> the adapter "9" (its input `adapter_input`)."""
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan.safetensors", "weight_dtype": "default"}}}
    previous = "1"
    for i, (kind, inputs) in enumerate(middle, start=2):
        nodes[str(i)] = {"class_type": kind, "inputs": {**inputs, "model": [previous, 0]}, "_meta": {"title": kind}}
        previous = str(i)
    nodes["9"] = {"class_type": "UspNativeWanModel", "inputs": {adapter_input: [previous, 0], "group": ["8", 0]}}
    return nodes


LORA_A = ("LoraLoaderModelOnly", {"lora_name": "a.safetensors", "strength_model": 1.0})
LORA_B = ("LoraLoaderModelOnly", {"lora_name": "b.safetensors", "strength_model": 0.6})


def walk(nodes, input_name="model"):
    return native.read_chain(native.prompt_lookup(nodes), "9", input_name)


def test_a_chain_is_read_from_the_loader_outwards():
    chain = walk(prompt(LORA_A, ("ModelSamplingSD3", {"shift": 7.0}), LORA_B))
    assert (chain.unet_name, chain.weight_dtype, chain.shift) == ("wan.safetensors", "default", 7.0)
    assert chain.loras == [("a.safetensors", 1.0), ("b.safetensors", 0.6)]
    assert chain.nodes[0] == "node 1 (UNETLoader)" and len(chain.nodes) == 4


def test_loraloader_gives_its_model_side_and_zero_strength_adds_nothing():
    chain = walk(prompt(("LoraLoader", {"lora_name": "c.safetensors", "strength_model": 0.5, "strength_clip": 1.0,
                                        "clip": ["5", 0]}),
                        ("LoraLoaderModelOnly", {"lora_name": "z.safetensors", "strength_model": 0.0})))
    assert chain.loras == [("c.safetensors", 0.5)] and chain.shift is None


def test_the_nearest_modelsamplingsd3_is_the_models_shift():
    chain = walk(prompt(("ModelSamplingSD3", {"shift": 3.0}), ("ModelSamplingSD3", {"shift": 8.0})))
    assert chain.shift == 8.0


def test_another_node_is_refused_by_name_and_title():
    nodes = prompt(LORA_A, ("TorchCompileModel", {"backend": "inductor"}))
    nodes["3"]["_meta"]["title"] = "my compile"
    with pytest.raises(ValueError, match=r'node 3 \(TorchCompileModel "my compile"\) is in the native MODEL chain.*'
                                         r"UNETLoader, LoraLoaderModelOnly, LoraLoader, ModelSamplingSD3"):
        walk(nodes)


def test_a_widget_fed_by_a_link_is_refused():
    with pytest.raises(ValueError, match="strength_model comes from node 7"):
        walk(prompt(("LoraLoaderModelOnly", {"lora_name": "a.safetensors", "strength_model": ["7", 0]})))


def test_loraloaders_clip_output_is_not_a_model():
    nodes = prompt(("LoraLoader", {"lora_name": "c.safetensors", "strength_model": 1.0, "strength_clip": 1.0}))
    nodes["9"]["inputs"]["model"] = ["2", 1]
    with pytest.raises(ValueError, match="output 1 is not a MODEL"):
        walk(nodes)


def test_each_expert_input_has_its_own_chain():
    nodes = prompt(LORA_A, adapter_input="high_noise_model")
    nodes["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "low.safetensors", "weight_dtype": "default"}}
    nodes["21"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["20", 0], **LORA_B[1]}}
    nodes["9"]["inputs"]["low_noise_model"] = ["21", 0]
    assert walk(nodes, "high_noise_model").loras == [("a.safetensors", 1.0)]
    low = walk(nodes, "low_noise_model")
    assert low.unet_name == "low.safetensors" and low.loras == [("b.safetensors", 0.6)]


KEY_MAP = {"diffusion_model.blocks.0.q": "diffusion_model.blocks.0.q.weight",
           "lora_unet_blocks_0_q": "diffusion_model.blocks.0.q.weight",
           "diffusion_model.blocks.0.k": "diffusion_model.blocks.0.k.weight",
           "transformer.qkv_q": ("diffusion_model.qkv.weight", (0, 0, 4)),
           "transformer.qkv_k": ("diffusion_model.qkv.weight", (0, 4, 4))}
MODEL_KEYS = {"diffusion_model.blocks.0.q.weight", "diffusion_model.blocks.0.q.bias", "diffusion_model.blocks.0.k.weight",
              "diffusion_model.qkv.weight"}


def test_lora_targets_follow_comfyuis_key_map():
    kohya = ["diffusion_model.blocks.0.q.lora_up.weight", "diffusion_model.blocks.0.q.lora_down.weight",
             "diffusion_model.blocks.0.q.alpha", "diffusion_model.blocks.0.q.diff_b", "unrelated.lora_up.weight"]
    assert native.lora_targets(kohya, KEY_MAP, MODEL_KEYS) == Counter({"diffusion_model.blocks.0.q.weight": 1,
                                                                       "diffusion_model.blocks.0.q.bias": 1})
    fused = ["transformer.qkv_q.lora_A.weight", "transformer.qkv_q.lora_B.weight", "transformer.qkv_k.lora_B.weight"]
    assert native.lora_targets(fused, KEY_MAP, MODEL_KEYS) == Counter({"diffusion_model.qkv.weight": 2})


def entry(strength):
    return (strength, ("lora", None), 1.0, None, None)


Q, K = "diffusion_model.blocks.0.q.weight", "diffusion_model.blocks.0.k.weight"


def test_patches_that_match_the_chain_pass():
    chain = native.NativeChain("wan.safetensors", "default", [("a.safetensors", 1.0), ("b.safetensors", 0.6)])
    targets = [Counter({Q: 1, K: 1}), Counter({Q: 1})]
    native.check_patches(chain, targets, {Q: [entry(1.0), entry(0.6)], K: [entry(1.0)]})
    native.check_patches(chain, targets, {Q: [entry(1.0), entry(0.0), entry(0.6)], K: [entry(1.0)]})  # zero ignored


@pytest.mark.parametrize("patches, why", [
    ({Q: [entry(1.0)], K: [entry(1.0)]}, r"graph gives strengths \[1.0, 0.6\], the MODEL holds \[1.0\]"),  # one skipped
    ({Q: [entry(1.0), entry(0.5)], K: [entry(1.0)]}, r"\[1.0, 0.6\], the MODEL holds \[1.0, 0.5\]"),  # another strength
    ({Q: [entry(0.6), entry(1.0)], K: [entry(1.0)]}, "the MODEL holds \\[0.6, 1.0\\]"),  # another order
    ({Q: [entry(1.0), entry(0.6)], K: [entry(1.0)], "x.weight": [entry(1.0)]}, r"x.weight: the graph gives strengths \[\]"),
    ({}, "2 of 2 patched weights differ"),
])
def test_patches_the_chain_does_not_explain_are_refused(patches, why):
    chain = native.NativeChain("wan.safetensors", "default", [("a.safetensors", 1.0), ("b.safetensors", 0.6)])
    with pytest.raises(ValueError, match=why):
        native.check_patches(chain, [Counter({Q: 1, K: 1}), Counter({Q: 1})], patches)


def test_patches_on_a_chain_without_loras_are_refused():
    with pytest.raises(ValueError, match="no LoRA"):
        native.check_patches(native.NativeChain("wan.safetensors", "default"), [], {Q: [entry(1.0)]})


def test_a_lora_matching_nothing_and_odd_patches_are_refused():
    chain = native.NativeChain("wan.safetensors", "default", [("a.safetensors", 1.0)])
    with pytest.raises(ValueError, match="a.safetensors matches no weight"):
        native.check_patches(chain, [Counter()], {})
    with pytest.raises(ValueError, match="cannot replay"):
        native.check_patches(chain, [Counter({Q: 1})], {Q: [(1.0, ("lora", None), 0.5, None, None)]})


def test_other_model_patches_are_refused_by_name():
    native.check_options({"model_sampling": object()}, {"transformer_options": {}})
    with pytest.raises(ValueError, match="model_options\\['sampler_cfg_function'\\]"):
        native.check_options({}, {"transformer_options": {}, "sampler_cfg_function": print})
    with pytest.raises(ValueError, match="transformer_options\\['patches_replace'\\]"):
        native.check_options({}, {"transformer_options": {"patches_replace": {"dit": {}}}})
    with pytest.raises(ValueError, match="diffusion_model"):
        native.check_options({"diffusion_model": object()}, {})


def test_weight_dtype(tmp_path):
    from safetensors.torch import save_file

    plain, fp8 = tmp_path / "plain.safetensors", tmp_path / "fp8.safetensors"
    save_file({"blocks.0.q.weight": torch.zeros(4, 4)}, plain)
    save_file({"blocks.0.q.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, fp8)
    native.check_weight_dtype(native.NativeChain("x", "default"), str(plain))
    native.check_weight_dtype(native.NativeChain("x", "fp8_e4m3fn"), str(fp8))
    with pytest.raises(ValueError, match="casts x to fp8 in ComfyUI"):
        native.check_weight_dtype(native.NativeChain("x", "fp8_e4m3fn"), str(plain))
    for option in ("fp8_e4m3fn_fast", "fp8_e5m2"):
        with pytest.raises(ValueError, match=f"weight_dtype {option} cannot be honoured"):
            native.check_weight_dtype(native.NativeChain("x", option), str(fp8))


def test_the_sampler_refuses_a_shift_other_than_the_native_models():
    """The deprecated Wan sampler and the generic one refuse a shift other than the native MODEL's; the generic
    one's shift 0 takes the native MODEL's."""
    socket = {"group": None, "path": "wan.safetensors", "experts": ["wan.safetensors"],
              "info": {"family": "wan2.1", "model": "Wan"}, "native_shift": 8.0}
    cond = [[torch.zeros(1, 4, 32), {}]]
    latent = {"samples": torch.zeros(1, 16, 1, 2, 2)}
    with pytest.raises(ValueError, match="this sampler's shift is 5, its native MODEL's is 8"):
        call("UspWanSampler", model=socket, positive=cond, negative=cond, latent_image=latent, seed=0, steps=2,
             cfg=1.0, shift=5.0, sampler_name="euler", denoise=1.0)
    with pytest.raises(ValueError, match="this sampler's shift is 5, its native MODEL's is 8"):
        call("UspSampler", model=socket, seed=0, steps=2, cfg=1.0, sampler_name="euler", positive=cond,
             negative=cond, latent_image=latent, denoise=1.0, shift=5.0)
    assert model_shift(socket, 0.0) == 8.0 and model_shift(socket, 5.0) == 5.0
    assert model_shift({**socket, "native_shift": None}, 0.0) == 5.0  # Wan 2.1's default without a native MODEL


HIDDEN_GRAPH = {"UNIQUE_ID", "PROMPT", "DYNPROMPT"}


def hidden_ids(node_id):
    return {getattr(h, "value", h) for h in NODE_CLASSES[node_id].GET_SCHEMA().hidden}


def test_the_adapter_nodes_declare_the_hidden_graph_inputs():
    """The deprecated adapters and the generic samplers (which take a native MODEL) ask for the graph; the
    generic samplers tell that a native MODEL stays in ComfyUI's memory (the adapters' info output says so)."""
    for node_id in ("UspNativeWanModel", "UspNativeHunyuanModel", "UspNativeWan22Model"):
        assert hidden_ids(node_id) == HIDDEN_GRAPH, node_id
    for node_id in ("UspSampler", "UspSamplerAdvanced"):
        assert hidden_ids(node_id) == HIDDEN_GRAPH, node_id
        schema = NODE_CLASSES[node_id].GET_SCHEMA()
        model = next(i for i in schema.inputs if i.id == "model")
        assert "ComfyUI's own memory" in schema.description + (model.tooltip or ""), node_id

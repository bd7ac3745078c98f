"""The generic nodes' own rules, without a group: one node set for every family (no family adds a loader,
sampler or LoRA node), the inputs a family does not use refused by name, the family's facts as defaults, the V3
schema's newer fields set only where the running ComfyUI has them, and the deprecated ids of the last release."""

import dataclasses

import pytest

from comfy_executor import call
from usp_video.distributed import models
from usp_video.nodes import NODE_CLASSES, samplers, v3

pytestmark = pytest.mark.smoke

PREVIOUS_RELEASE_IDS = {
    "UspEmptyWan22Latent", "UspFreeGroup", "UspGroup", "UspHunyuanLora", "UspHunyuanModelLoader", "UspHunyuanSampler",
    "UspHunyuanTextEncode", "UspHunyuanTextEncoderLoader", "UspLora", "UspNativeHunyuanModel", "UspNativeWan22Model",
    "UspNativeWanModel", "UspStepCache", "UspTextEncode", "UspTextEncoderLoader", "UspVaeDecode", "UspVaeEncode",
    "UspVaeLoader", "UspWan22ImageToVideoLatent", "UspWan22Lora", "UspWan22ModelLoader", "UspWan22Sampler",
    "UspWan22TI2V5BModelLoader", "UspWan22TI2V5BSampler", "UspWanImageToVideo", "UspWanModelLoader", "UspWanSampler",
    "UspWanSamplerAdvanced"}


def socket(family: str, experts: int = 1, **extra) -> dict:
    paths = [f"/models/{family}_{i}.safetensors" for i in range(experts)]
    return {"group": "g", "path": paths[0], "experts": paths,
            "info": {"family": family, "model": models.get(family).label}, **extra}


def test_one_visible_node_set_for_every_family():
    visible = sorted(i for i, cls in NODE_CLASSES.items() if not cls.GET_SCHEMA().is_deprecated)
    assert visible == sorted([
        "UspGroup", "UspFreeGroup", "UspStepCache", "UspLoadDiffusionModel", "UspLoadTextEncoder", "UspTextEncode",
        "UspSampler", "UspSamplerAdvanced", "UspLoraLoader", "UspVaeLoader", "UspVaeDecode", "UspVaeEncode",
        "UspWanImageToVideo", "UspWanFunControlToVideo", "UspWanVaceToVideo", "UspWanAnimateToVideo",
        "UspWan22ImageToVideoLatent", "UspHunyuanVideo15ImageToVideo"])  # the last six: the families' own
    # conditioning (Wan's, HunyuanVideo 1.5's), as ComfyUI's
    deprecated = {i for i, cls in NODE_CLASSES.items() if cls.GET_SCHEMA().is_deprecated}
    assert PREVIOUS_RELEASE_IDS <= set(NODE_CLASSES), sorted(PREVIOUS_RELEASE_IDS - set(NODE_CLASSES))
    assert deprecated <= PREVIOUS_RELEASE_IDS


def test_inputs_a_family_does_not_use_are_refused():
    with pytest.raises(ValueError, match="cfg_low_noise: Wan 2.1 runs one model, not experts"):
        samplers.expert_settings(socket("wan2.1"), 5.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="boundary: HunyuanVideo runs one model, not experts"):
        samplers.expert_settings(socket("hunyuan-video"), 1.0, 0.0, 0.9)
    with pytest.raises(ValueError, match="expert: this Wan 2.1 has no expert 'high_noise'"):
        call("UspLoraLoader", model=socket("wan2.1"), lora_name="x.safetensors", strength=1.0, expert="high_noise")
    assert samplers.expert_settings(socket("wan2.1"), 5.0, 0.0, 0.0) == {"cfg": 5.0, "boundaries": []}


def test_two_experts_take_the_familys_boundary_and_a_cfg_each():
    a14b = socket("wan2.2-a14b", experts=2)
    assert samplers.expert_settings(a14b, 4.0, 0.0, 0.0) == {"cfg": [4.0, 4.0], "boundaries": [0.875]}
    assert samplers.expert_settings(a14b, 4.0, 3.0, 0.9) == {"cfg": [4.0, 3.0], "boundaries": [0.9]}
    with pytest.raises(ValueError, match="boundary must be a number >= 0"):
        samplers.expert_settings(a14b, 4.0, 3.0, float("nan"))


def test_shift_zero_is_the_models():
    assert samplers.model_shift(socket("wan2.2-a14b", experts=2), 0.0) == 12.0
    assert samplers.model_shift(socket("hunyuan-video"), 0.0) == 7.0
    assert samplers.model_shift(socket("wan2.1", native_shift=3.0), 0.0) == 3.0
    assert samplers.model_shift(socket("wan2.1"), 8.0) == 8.0


def test_a_usp_model_brings_its_group_and_a_native_model_needs_one():
    model = socket("wan2.1")
    assert samplers.usp_model(model, None, None, None, "1") is model
    assert samplers.usp_model(model, "g", None, None, "1") is model
    with pytest.raises(ValueError, match="group: this USP model was loaded on another USP group"):
        samplers.usp_model(model, "other", None, None, "1")
    with pytest.raises(ValueError, match="group: model is a native MODEL, which runs on the USP group"):
        samplers.usp_model(object(), None, None, None, "1")


def test_newer_schema_fields_are_set_only_where_comfyui_has_them(monkeypatch):
    inputs = [v3.io.Int.Input("steps", tooltip="t")]
    older = v3.schema(node_id="X", inputs=inputs, search_aliases=["ksampler"])  # 0.3.64: no such field
    assert not hasattr(older, "search_aliases")

    @dataclasses.dataclass
    class NewerSchema(v3.io.Schema):
        search_aliases: list = dataclasses.field(default_factory=list)

    monkeypatch.setattr(v3.io, "Schema", NewerSchema)
    monkeypatch.setattr(v3, "_SCHEMA_FIELDS", {f.name for f in dataclasses.fields(NewerSchema)})
    assert v3.schema(node_id="X", inputs=inputs, search_aliases=["ksampler"]).search_aliases == ["ksampler"]


def test_an_output_named_like_an_input_keeps_its_name_but_not_the_id():
    schema = NODE_CLASSES["UspLoraLoader"].GET_SCHEMA()
    (output,) = schema.outputs
    assert output.display_name == "model" and output.id != "model"


def test_tokenizer_folder_is_found_by_name_in_text_encoders(tiny_hunyuan, monkeypatch, tmp_path):
    """tokenizer_folder takes a path, or the name of a folder in models/text_encoders (as the page's users type it);
    a name found in neither place is refused naming where it was looked for."""
    from pathlib import Path

    from usp_video.nodes.loaders import text_encoder_socket

    folder = Path(tiny_hunyuan["tokenizers"])
    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(folder.parents[1]))
    monkeypatch.chdir(tmp_path)  # not relative to where ComfyUI runs
    files = [Path(tiny_hunyuan["llama"]).name, Path(tiny_hunyuan["clip"]).name]
    socket = text_encoder_socket("g", files, folder.name)
    assert socket["family"] == "hunyuan-video" and socket["files"]["tokenizers"] == str(folder)
    assert text_encoder_socket("g", files, str(folder))["files"]["tokenizers"] == str(folder)
    with pytest.raises(FileNotFoundError, match="'no_such_tokenizers' is not a folder, nor one in .*text_encoders"):
        text_encoder_socket("g", files, "no_such_tokenizers")

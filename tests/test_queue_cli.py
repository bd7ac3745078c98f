"""`usp-video queue` without a server: loading workflows and --set overrides."""


import pytest

from usp_video.distributed.comfy_queue import apply_overrides, describe_rejection, load_workflow
from usp_video.workflows import make_workflows

API = make_workflows.API_DIR / "wan21_t2v_usp_api.json"
UI = make_workflows.HERE / "wan21_t2v_usp.json"


def test_ui_format_is_refused_with_advice():
    with pytest.raises(ValueError, match="UI-format workflow; queue the API-format file"):
        load_workflow(UI)


def test_overrides_by_id_title_and_class():
    prompt = load_workflow(API)
    out = apply_overrides(prompt, ["7.steps=4", "USP Group.cpu_ranks=3", "UspGroup.ulysses=2",
                                   "Positive prompt.text=a fox, 2 birds", "EmptyHunyuanLatentVideo.width=64"])
    assert out["7"]["inputs"]["steps"] == 4
    assert out["1"]["inputs"]["cpu_ranks"] == 3
    assert out["1"]["inputs"]["ulysses"] == "2"  # a combo stays text
    assert out["4"]["inputs"]["text"] == "a fox, 2 birds"
    assert out["6"]["inputs"]["width"] == 64
    assert prompt["7"]["inputs"]["steps"] == 30  # the input is not mutated


@pytest.mark.parametrize("override,message", [
    ("7.stepz=4", "has no input 'stepz'; it has"),
    ("UspTextEncode.text=x", "matches 2 nodes; use an id"),
    ("steps=4", "expected NODE.INPUT=VALUE"),
])
def test_bad_overrides_say_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(load_workflow(API), [override])


def test_rejection_lists_node_errors():
    text = describe_rejection({"error": {"message": "Prompt outputs failed validation", "details": ""},
                               "node_errors": {"2": {"class_type": "UspWanModelLoader", "errors": [
                                   {"message": "Value not in list", "details": "model_name: 'x'"}]}}})
    assert "node 2 (UspWanModelLoader): Value not in list: model_name: 'x'" in text

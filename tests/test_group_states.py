"""The state box of the USP Group node (nodes/services.py publish_status, web/js/usp_status.js) through a prompt:
`loading` until the group begins the first step, `sampling` while that step runs, then the steps, then `ready`."""

from pathlib import Path

from comfy_executor import execute
from test_workflow import tiny_prompt
from usp_video.nodes import services


def test_the_state_says_loading_then_sampling_before_the_first_step_ends(tiny_models, tmp_path, monkeypatch):
    from usp_video.distributed.registry import free_group

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    states = []
    publish = services.publish_status

    def recording(**fields):
        if "state" in fields:
            states.append(fields["state"])
        return publish(**fields)

    monkeypatch.setattr(services, "publish_status", recording)
    try:
        execute(tiny_prompt(tiny_models, steps=2), tmp_path)
    finally:
        free_group()
        services.clear_status()
    sampled = states[states.index("loading"):]  # the sampler's states (the loaders' come before)
    assert sampled[:3] == ["loading", "sampling (the first step is running)", sampled[2]], states
    assert sampled[2].startswith("sampling step 1/2"), states
    assert "ready" in sampled[3:], states

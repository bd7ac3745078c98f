"""The shipped workflows: their format, and the API workflow run through the nodes."""

import json
from pathlib import Path

import pytest
import torch

from comfy_executor import call, execute
from usp_video.nodes import NODE_CLASSES, services
from usp_video.workflows import make_workflows

WORKFLOWS = Path(make_workflows.__file__).parent


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def inputs_of(cls) -> dict:
    """A V3 node's inputs by id, in schema order."""
    return {inp.id: inp for inp in cls.GET_SCHEMA().inputs}


def widget_names(cls) -> list[str]:
    """Widget inputs in the order the ComfyUI frontend creates them (required, then optional; a seed gets its
    control widget)."""
    widgets = [inp for inp in inputs_of(cls).values() if inp.io_type in WIDGET_TYPES]
    names = []
    for inp in sorted(widgets, key=lambda inp: bool(inp.optional)):
        names.append(inp.id)
        if getattr(inp, "control_after_generate", None):
            names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", sorted(make_workflows.WORKFLOWS))
def test_shipped_files_are_current(name):
    graph = make_workflows.WORKFLOWS[name]
    assert json.loads((make_workflows.API_DIR / f"{name}_api.json").read_text()) == make_workflows.to_api(graph)
    assert json.loads((WORKFLOWS / f"{name}.json").read_text()) == make_workflows.to_ui(graph)


def test_every_template_card_has_a_title_and_description_drawn_on_its_picture():
    """The template browser titles a custom pack's card with its file name (workflows/cards.py says why), so
    the card's picture carries a title and a one-line description: one per shipped workflow, each fitting the
    picture, and every NAME.jpg drawn from its card as it is now (a changed text not redrawn fails)."""
    from PIL import Image, ImageChops, ImageStat

    from usp_video.workflows.cards import BAND, CARDS

    assert sorted(CARDS) == sorted(make_workflows.WORKFLOWS), "one card per shipped workflow, no other"
    titles = {node_id: cls.GET_SCHEMA().display_name for node_id, cls in NODE_CLASSES.items()}
    for name, card in CARDS.items():
        assert all(card) and len(set(card)) == 2, (name, card)
        drawn = make_workflows.card_picture(make_workflows.WORKFLOWS[name], card, titles, make_workflows.SIZES,
                                            (340, 120))
        with Image.open(WORKFLOWS / f"{name}.jpg") as shipped:
            assert shipped.size == drawn.size, name
            band = (0, 0, drawn.width, BAND)
            difference = ImageStat.Stat(ImageChops.difference(shipped.convert("RGB").crop(band), drawn.crop(band)))
            assert max(difference.mean) < 3, f"{name}.jpg is not drawn from its card: run make_workflows"


@pytest.mark.parametrize("class_type", sorted(c for c in make_workflows.WIDGETS if c in NODE_CLASSES))
def test_ui_widget_order_matches_node_inputs(class_type):
    assert make_workflows.WIDGETS[class_type] == widget_names(NODE_CLASSES[class_type])


def test_shipped_workflows_use_no_deprecated_node():
    for name in make_workflows.WORKFLOWS:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        old = [node["type"] for node in ui["nodes"]
               if node["type"] in NODE_CLASSES and NODE_CLASSES[node["type"]].GET_SCHEMA().is_deprecated]
        assert old == [], f"{name} uses deprecated nodes {old}"


@pytest.mark.parametrize("name", sorted(make_workflows.WORKFLOWS))
def test_ui_widget_values_are_valid_choices(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in ui["nodes"]:
        cls = NODE_CLASSES.get(node["type"])
        if cls is None:
            continue
        specs = inputs_of(cls)
        for name, value in zip(make_workflows.WIDGETS[node["type"]], node["widgets_values"]):
            is_file_list = "name" in name or name.endswith("_model")  # models/ listings: empty here
            if name in specs and specs[name].io_type == "COMBO" and not is_file_list:
                assert value in specs[name].options, f"{node['type']}.{name}={value!r} not in {specs[name].options}"
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        cls = NODE_CLASSES.get(node["type"])
        optional = {i for i, inp in inputs_of(cls).items() if inp.optional} if cls is not None else \
            make_workflows.NATIVE_OPTIONAL.get(node["type"], set())
        for slot in node["inputs"]:
            if slot["link"] is None and slot["name"] in optional:  # an optional input left open (ComfyUI saves it so)
                continue
            if slot["link"] is None and "widget" in slot:  # a widget's input socket, the widget's value used
                continue
            assert links[slot["link"]][3] == node["id"], f"{node['type']}.{slot['name']} is not connected"


GROUP_CPU = dict(device="cpu", gpus="all", cpu_ranks=2, ulysses="auto", ring="auto", attention="auto", dtype="auto",
                 timeout_s=600)


def sampling(**values) -> dict:
    """USP Sampler's widgets: euler, full denoise, the model's shift, unless given."""
    return {"sampler_name": "euler", "denoise": 1.0, "shift": 0.0, **values}


def tiny_prompt(tiny_models: dict, steps: int = 3) -> dict:
    prompt = json.loads((make_workflows.API_DIR / "wan21_t2v_usp_api.json").read_text())
    prompt["1"]["inputs"].update(device="cpu", cpu_ranks=2)
    prompt["2"]["inputs"]["model_name"] = Path(tiny_models["dit"]).name
    prompt["3"]["inputs"]["text_encoder_name"] = Path(tiny_models["text_encoder"]).name
    prompt["8"]["inputs"]["vae_name"] = Path(tiny_models["vae"]).name
    prompt["6"]["inputs"].update(width=64, height=48, length=9)
    prompt["7"]["inputs"]["steps"] = steps
    return prompt


def test_api_workflow_runs_through_the_nodes_and_reuses_the_model(tiny_models, tmp_path, monkeypatch):
    from usp_video.distributed.registry import GROUPS, free_group

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    try:
        results = execute(tiny_prompt(tiny_models), tmp_path)
        frames = results["9"][0]
        assert frames.shape == (9, 48, 64, 3) and frames.dtype == torch.float32
        assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0
        assert (tmp_path / "usp_video" / "wan21_00001_.webp").is_file()
        latent = results["7"][0]["samples"]
        assert latent.shape == (1, 16, 3, 6, 8)

        group = GROUPS.current
        first_pid = group.proc.pid
        second = execute(tiny_prompt(tiny_models), tmp_path)  # a second prompt, same models
        torch.testing.assert_close(second["7"][0]["samples"], latent, rtol=0, atol=0)
        assert GROUPS.current.proc.pid == first_pid, "the group was relaunched"
        status, _ = GROUPS.current.request({"type": "ping"})
        assert status["load_counts"] == {"dit": 1, "text_encoder": 1, "vae": 1}

        # the decode's progress through the group: one event per latent frame (3)
        from usp_video.distributed import api

        events = []
        frames = api.decode(GROUPS.current, tiny_models["vae"], latent, on_progress=events.append)
        assert [(e["step"], e["total"]) for e in events] == [(1, 3), (2, 3), (3, 3)]
        assert torch.equal(frames, results["9"][0])

        # the state the USP Group node shows in the page (web/js/usp_status.js)
        shown = services.current_status()
        assert shown["state"] == "ready" and shown["group"].startswith("2 CPU ranks")
        assert shown["model"] == Path(tiny_models["dit"]).name and shown["degrees"] == "ulysses 2 x ring 1, attention sdpa"
        assert len(shown["free"]) == 2 and all(free > 0 for free in shown["free"])
        assert shown["last_run"].startswith("3 steps, ") and "s/step" in shown["last_run"]
        assert "weights per rank: " in shown["text"] and "rank 1 " in shown["text"]
    finally:
        free_group()
        services.clear_status()


def test_step_cache_node_into_the_sampler(tiny_models, tmp_path, monkeypatch):
    """USP Step Cache -> the sampler's optional step_cache input: steps are skipped and reported (the
    node's state line), and the same prompt without it skips none."""
    from usp_video.distributed.registry import free_group

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    prompt = tiny_prompt(tiny_models, steps=8)
    prompt["20"] = {"class_type": "UspStepCache", "inputs": {"method": "fbcache", "threshold": 0.5,
                                                             "start_percent": 0.0, "end_percent": 1.0}}
    prompt["7"]["inputs"]["step_cache"] = ["20", 0]
    try:
        cached = execute(prompt, tmp_path)["7"][0]["samples"]
        assert "skipped by fbcache" in services.current_status()["last_run"]
        assert not services.current_status()["last_run"].endswith(", 0 skipped by fbcache")
        del prompt["7"]["inputs"]["step_cache"], prompt["20"]
        plain = execute(prompt, tmp_path)["7"][0]["samples"]
        assert "skipped" not in services.current_status()["last_run"]
        assert not torch.equal(cached, plain)
    finally:
        free_group()
        services.clear_status()
    with pytest.raises(ValueError, match="cache start and end"):
        call("UspStepCache", method="fbcache", threshold=0.1, start_percent=0.9, end_percent=0.1)


def test_every_input_has_a_tooltip():
    """Hovering any input of a USP node in the page says what it is for (ComfyUI's `tooltip`)."""
    missing = [f"{name}.{input_id}" for name, cls in NODE_CLASSES.items()
               for input_id, inp in inputs_of(cls).items() if not inp.tooltip]
    assert missing == []
    assert all(cls.GET_SCHEMA().description for cls in NODE_CLASSES.values())


def test_sampler_node_takes_native_formats_and_leaves_inputs_unchanged(tiny_models, monkeypatch):
    """Native CLIPTextEncode CONDITIONING ([1, 512, dim], a dict beside it) and a native empty
    video latent go in; a LATENT comes out; no input is modified (ComfyUI caches them)."""
    from usp_video.distributed.registry import free_group
    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    try:
        group, _ = call("UspGroup", **GROUP_CPU)
        model, info = call("UspLoadDiffusionModel", group=group, model_name=Path(tiny_models["dit"]).name)
        assert "ulysses=2 x ring=1" in info
        g = torch.Generator().manual_seed(0)
        cond = torch.randn(1, 512, 32, generator=g)
        cond[:, 7:] = 0
        positive = [[cond, {"pooled_output": None}]]
        negative = [[torch.zeros(1, 512, 32), {"pooled_output": None}]]
        latent = {"samples": torch.zeros(1, 16, 3, 6, 8), "batch_index": [0]}
        before = (cond.clone(), latent["samples"].clone(), dict(latent))
        (out,) = call("UspSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                      **sampling(seed=3, steps=2, cfg=5.0))
        assert out["samples"].shape == (1, 16, 3, 6, 8) and out["batch_index"] == [0]
        assert out is not latent and latent.keys() == before[2].keys()
        assert torch.equal(cond, before[0]) and torch.equal(latent["samples"], before[1])
        with pytest.raises(ValueError, match="latent_image has 4 channels; Wan 2.1 latents have 16"):
            call("UspSampler", model=model, positive=positive, negative=negative,
                 latent_image={"samples": torch.zeros(1, 4, 3, 6, 8)}, **sampling(seed=3, steps=2, cfg=5.0))
        with pytest.raises(ValueError, match="dimension 4096 but the model expects 32"):
            call("UspSampler", model=model, positive=[[torch.zeros(1, 512, 4096), {}]], negative=negative,
                 latent_image=latent, **sampling(seed=3, steps=2, cfg=5.0))
    finally:
        free_group()


def hunyuan_prompt(tiny_hunyuan: dict, steps: int = 3) -> dict:
    prompt = json.loads((make_workflows.API_DIR / "hunyuan_video_t2v_usp_api.json").read_text())
    prompt["1"]["inputs"].update(device="cpu", cpu_ranks=3)
    prompt["2"]["inputs"]["model_name"] = Path(tiny_hunyuan["dit"]).name
    prompt["3"]["inputs"].update(text_encoder_name=Path(tiny_hunyuan["llama"]).name,
                                 clip_name=Path(tiny_hunyuan["clip"]).name, tokenizer_folder=tiny_hunyuan["tokenizers"])
    prompt["8"]["inputs"]["vae_name"] = Path(tiny_hunyuan["vae"]).name
    prompt["6"]["inputs"].update(width=64, height=48, length=9)
    prompt["7"]["inputs"]["steps"] = steps
    return prompt


def test_hunyuan_api_workflow_runs_through_the_nodes(tiny_hunyuan, tmp_path, monkeypatch):
    from usp_video.distributed.registry import GROUPS, free_group
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.requests import SampleRequest

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_hunyuan["dit"]).parents[1]))
    try:
        results = execute(hunyuan_prompt(tiny_hunyuan), tmp_path)
        frames = results["9"][0]
        assert frames.shape == (9, 48, 64, 3) and 0.0 <= frames.min() and frames.max() <= 1.0
        assert (tmp_path / "usp_video" / "hunyuan_00001_.webp").is_file()
        assert "ulysses=3 x ring=1" in results["2"][1]
        (cond, extra), = results["4"][0]  # native CLIPTextEncode format: tokens plus pooled_output
        assert cond.shape[0] == 1 and cond.shape[2] == 32 and extra["pooled_output"].shape == (1, 16)
        latent = results["7"][0]["samples"]
        assert latent.shape == (1, 16, 3, 6, 8)
        status, _ = GROUPS.current.request({"type": "ping"})
        assert status["load_counts"] == {"dit": 1, "llama": 1, "clip": 1, "tokenizers": 1, "vae": 1}

        # the same request in one process, without the group: the 3 ranks gave the same latent
        expected = Engine().sample(SampleRequest(
            experts=[tiny_hunyuan["dit"]], positive={"tokens": cond, "pooled_output": extra["pooled_output"]}, negative=None,
            latent=torch.zeros(1, 16, 3, 6, 8), seed=42, steps=3, cfg=1.0, shift=7.0, sampler="euler",
            options={"guidance": 6.0})).latent
        assert (latent - expected).norm() / expected.norm() <= 1e-5

        # native conditioning: FluxGuidance's "guidance" wins over the old sampler's widget, and is what the generic
        # sampler takes (else the family's 6); no pooled output is refused
        model = results["2"][0]
        small = {"samples": torch.zeros(1, 16, 2, 4, 4)}
        pooled = extra["pooled_output"]
        old = dict(seed=1, steps=2, cfg=1.0, shift=7.0, sampler_name="euler", denoise=1.0)
        a, = call("UspHunyuanSampler", model=model, positive=[[cond, {"pooled_output": pooled, "guidance": 2.0}]],
                  negative=[[cond, {}]], latent_image=small, guidance=6.0, **old)
        b, = call("UspHunyuanSampler", model=model, positive=[[cond, {"pooled_output": pooled}]],
                  negative=[[cond, {}]], latent_image=small, guidance=2.0, **old)
        c, = call("UspSampler", model=model, positive=[[cond, {"pooled_output": pooled, "guidance": 2.0}]],
                  negative=[[cond, {}]], latent_image=small, **sampling(seed=1, steps=2, cfg=1.0))
        d, = call("UspSampler", model=model, positive=[[cond, {"pooled_output": pooled}]],
                  negative=[[cond, {}]], latent_image=small, **sampling(seed=1, steps=2, cfg=1.0))
        e, = call("UspHunyuanSampler", model=model, positive=[[cond, {"pooled_output": pooled}]],
                  negative=[[cond, {}]], latent_image=small, guidance=6.0, **old)
        for same in (b, c):
            torch.testing.assert_close(same["samples"], a["samples"], rtol=0, atol=0)
        torch.testing.assert_close(d["samples"], e["samples"], rtol=0, atol=0)
        assert not torch.equal(d["samples"], a["samples"])
        with pytest.raises(ValueError, match="positive: HunyuanVideo needs the pooled CLIP-L output"):
            call("UspSampler", model=model, positive=[[cond, {}]], negative=[[cond, {}]], latent_image=small,
                 **sampling(seed=1, steps=2, cfg=1.0))
        with pytest.raises(ValueError, match="is a HunyuanVideo model, not Wan 2.1"):
            call("UspWanModelLoader", group=GROUPS.current.config, model_name=Path(tiny_hunyuan["dit"]).name)
    finally:
        free_group()


def test_latents_carry_their_family_and_another_familys_vae_is_refused(tiny_models, tiny_hunyuan, monkeypatch):
    """Our samplers tag their LATENT with the model family; the VAE decode and the samplers refuse a
    tagged latent of another family before anything runs (a Wan and a HunyuanVideo latent have the
    same shape, so nothing else would notice). Native, untagged latents cannot be checked."""
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.registry import free_group

    monkeypatch.setenv("USP_VIDEO_MODELS_DIR", str(Path(tiny_models["dit"]).parents[1]))
    try:
        group, _ = call("UspGroup", **GROUP_CPU)
        model, _ = call("UspLoadDiffusionModel", group=group, model_name=Path(tiny_models["dit"]).name)
        cond = [[torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0)), {}]]
        (out,) = call("UspSampler", model=model, positive=cond, negative=cond,
                      latent_image={"samples": torch.zeros(1, 16, 2, 4, 4)}, **sampling(seed=3, steps=1, cfg=1.0))
        assert out["usp_family"] == "wan2.1"
    finally:
        free_group()
    nowhere = GroupConfig(ranks=1)  # refused before any group is asked
    with pytest.raises(ValueError, match="samples were made by a Wan 2.1 model, but tiny_hunyuan_video_vae"
                                         r".safetensors is the HunyuanVideo VAE; pick the Wan 2.1 VAE"):
        call("UspVaeDecode", vae={"group": nowhere, "path": tiny_hunyuan["vae"]}, samples=out)
    hunyuan_model = {"group": nowhere, "path": tiny_hunyuan["dit"], "experts": [tiny_hunyuan["dit"]],
                     "info": {"family": "hunyuan-video", "model": "HunyuanVideo", "text_dim": 32}}
    tokens = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 16)}]]
    with pytest.raises(ValueError, match="latent_image was sampled by a Wan 2.1 model; this is HunyuanVideo"):
        call("UspSampler", model=hunyuan_model, positive=tokens, negative=tokens, latent_image=out,
             **sampling(seed=1, steps=2, cfg=1.0))

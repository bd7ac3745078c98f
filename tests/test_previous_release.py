"""The previous release's workflows keep working in the real ComfyUI, with the same latents.

tests/previous_release/ holds the workflow files the previous release shipped (workflows/*.json in UI form,
workflows/api/*.json in API form, copied unchanged from commit 98ff83b; see its README.md) and the latents
that release's code made from them with the tiny models. Against one ComfyUI server (COMFYUI_DIR) with the
pack and the tiny model sets, this file checks:

- every node of every UI file is registered in /object_info, its widgets_values fit the node's widget inputs
  as the page would load them (count, types, combo choices), its saved input sockets still exist, no required
  input is new, and each link lands on an output slot whose current type fits (links name slots by index);
- the same for every API file as /prompt validates it: nodes registered, inputs known and set, links fitting;
- each API file the tiny sets can run runs over HTTP (tiny files and sizes substituted by `tiny_substitute`,
  a SaveLatent after each sampler) and gives the stored latents (relative error <= 1e-5).

For the lead's other checks: `tiny_substitute`, `add_latent_savers` / `run_for_latents` and `stored_latent`
work on any API prompt (the new generic workflows too). These tests read only tests/previous_release/,
never workflows/: the shipped workflows may change, the previous release's may not.

USP_VIDEO_WRITE_PREVIOUS_LATENTS=1 writes the reference latents instead of comparing: do that only on the
previous release's commit (98ff83b), where the code that made the files runs.
"""

from __future__ import annotations

import json
import subprocess
import os
import time
import urllib.request
from pathlib import Path

import pytest

from comfyui_server import comfyui_server, group_dir, log_text
from conftest import rel_error
from tiny_clip_vision import TINY_CLIP_VISION, TINY_SIGLIP, make_tiny_clip_vision, make_tiny_siglip
from group_helpers import processes_matching

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
# As the other ComfyUI tests: skipped without COMFYUI_DIR, except where CI requires them (then the server fails)
REQUIRED = os.environ.get("USP_VIDEO_REQUIRE_COMFYUI") == "1"
pytestmark = pytest.mark.skipif(not COMFYUI_DIR and not REQUIRED, reason="COMFYUI_DIR is not set: no ComfyUI to start")

PREVIOUS = Path(__file__).resolve().parent / "previous_release"
UI_DIR = PREVIOUS / "workflows"
API_DIR = UI_DIR / "api"
LATENTS_DIR = PREVIOUS / "latents"
RELEASE_COMMIT = "98ff83b"  # the release whose workflows and latents these are
TOLERANCE = 1e-5
WRITE_LATENTS = os.environ.get("USP_VIDEO_WRITE_PREVIOUS_LATENTS") == "1"

# The previous release's API workflows that its tiny sets could not run, so that it stored no latents for them (each
# still gets the static checks, and its shipped form runs in test_workflow_runs_on_the_tiny_set).
NO_STORED_LATENTS = {
    "wan21_i2v_usp": "ComfyUI's own CLIPVisionLoader builds CLIP ViT-H (clip_vision_h) at its fixed full size; the "
                     "tests' ComfyUI now loads a tiny one with comfyui_test_nodes' TinyCLIPVisionLoader",
}

# -- the tiny substitution ---------------------------------------------------------------------------------------

TINY_SIZE = {"width": 64, "height": 64, "length": 5}  # 64: the 5B's 16x VAE and 2x2 patches need multiples of 32
TINY_STEPS = 3  # enough for both Wan 2.2 experts at the shipped shift/boundary (12/0.875 and 5/0.9)
START_IMAGE = "example.png"  # the I2V workflows' LoadImage file; written into the server's input folder
CONTROL_VIDEO = "control.mp4"  # the control workflows' LoadVideo file; written there too


def tiny_model_files() -> dict[str, str]:
    """The real model file names the workflows use -> the tiny file of the same role, relative to the models root
    (ComfyUI's layout: diffusion_models/, text_encoders/, vae/, loras/). Add a line here for a new real name."""
    from usp_video.distributed.models.hunyuan_video.tiny import HUNYUAN_FILES
    from usp_video.distributed.models.hunyuan_video15.tiny import FILES as HV15
    from usp_video.distributed.models.wan21.tiny import FILES as WAN21
    from usp_video.distributed.models.wan22_5b.tiny import FILES as WAN22_5B
    from usp_video.distributed.models.wan22_a14b.tiny import FILES as WAN22
    from usp_video.distributed.models.wan_animate.tiny import FILES as ANIMATE
    from usp_video.distributed.models.wan_vace.tiny import FILES as VACE

    return {
        "wan2.1_t2v_1.3B_fp16.safetensors": WAN21["dit"],
        "wan2.1_t2v_14B_fp16.safetensors": WAN21["dit"],
        "wan2.1_i2v_480p_14B_fp16.safetensors": WAN21["dit_i2v"],
        "wan2.1_fun_control_1.3B_bf16.safetensors": WAN21["dit_fun_control"],
        "wan2.1_vace_14B_fp16.safetensors": VACE["dit"],
        "umt5_xxl_fp16.safetensors": WAN21["text_encoder"],
        "wan_2.1_vae.safetensors": WAN21["vae"],
        "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors": WAN21["lora_distill"],
        "wan2.2_t2v_high_noise_14B_fp16.safetensors": WAN22["high_noise"],
        "wan2.2_t2v_low_noise_14B_fp16.safetensors": WAN22["low_noise"],
        "wan2.2_i2v_high_noise_14B_fp16.safetensors": WAN22["i2v_high_noise"],
        "wan2.2_i2v_low_noise_14B_fp16.safetensors": WAN22["i2v_low_noise"],
        "wan2.2_fun_control_high_noise_14B_fp16.safetensors": WAN22["fun_control_high_noise"],
        "wan2.2_fun_control_low_noise_14B_fp16.safetensors": WAN22["fun_control_low_noise"],
        "wan2.2_fun_control_5B_bf16.safetensors": WAN22_5B["fun_control"],
        "wan2.2_ti2v_5B_fp16.safetensors": WAN22_5B["dit"],
        "wan2.2_vae.safetensors": WAN22_5B["vae"],
        "hunyuan_video_t2v_720p_bf16.safetensors": HUNYUAN_FILES["dit"],
        "llava_llama3_fp8_scaled.safetensors": HUNYUAN_FILES["llama"],
        "clip_l.safetensors": HUNYUAN_FILES["clip"],
        "hunyuan_video_vae_bf16.safetensors": HUNYUAN_FILES["vae"],
        "wan2.2_animate_14B_bf16.safetensors": ANIMATE["dit"],
        "clip_vision_h.safetensors": TINY_CLIP_VISION,
        "hunyuanvideo1.5_480p_t2v_fp16.safetensors": HV15["dit"],
        "hunyuanvideo1.5_480p_i2v_fp16.safetensors": HV15["dit"],
        "hunyuanvideo1.5_480p_i2v_step_distilled_fp16.safetensors": HV15["dit"],
        "qwen_2.5_vl_7b_fp8_scaled.safetensors": HV15["qwen"],
        "byt5_small_glyphxl_fp16.safetensors": HV15["byt5"],
        "hunyuanvideo15_vae_fp16.safetensors": HV15["vae"],
        "sigclip_vision_patch14_384.safetensors": TINY_SIGLIP,
    }


def tiny_substitute(prompt: dict, models_root: Path, steps: int = TINY_STEPS, files: dict | None = None) -> dict:
    """A copy of an API prompt that the tiny sets run on CPU: every input whose value is a real model file name
    (tiny_model_files) gets the tiny file of its role; by input name, width/height/length get TINY_SIZE, steps
    `steps` (an advanced sampler's start_at_step/end_at_step scaled with it, "to the end" kept), the group's
    device "cpu", and an empty tokenizer_folder the tiny HunyuanVideo tokenizers; ComfyUI's CLIPVisionLoader becomes
    the tests' TinyCLIPVisionLoader (comfyui_test_nodes: ComfyUI's own CLIP vision model built at the tiny file's
    size). Anything else is kept. files: other tiny files by real name, for this prompt (a model whose tiny set has
    its own text encoder)."""
    files = {**tiny_model_files(), **(files or {})}
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] == "CLIPVisionLoader":
            node["class_type"] = "UspTestTinyCLIPVisionLoader"
        inputs = node["inputs"]
        old_steps = inputs.get("steps")
        for name, value in inputs.items():
            if isinstance(value, list):  # a link [node id, slot]
                continue
            if isinstance(value, str) and value in files:
                inputs[name] = Path(files[value]).name  # ComfyUI's file lists name files inside their folder
            elif name in TINY_SIZE:
                inputs[name] = TINY_SIZE[name]
            elif name == "steps":
                inputs[name] = steps
            elif name in ("start_at_step", "end_at_step") and isinstance(old_steps, int) and value < old_steps:
                inputs[name] = round(value * steps / old_steps)
            elif name == "device":
                inputs[name] = "cpu"
            elif name == "tokenizer_folder" and not value:
                from usp_video.distributed.models.hunyuan_video.tiny import HUNYUAN_FILES

                # the tiny tokenizers of the family whose text encoder the prompt loads (HunyuanVideo's by default)
                inputs[name] = str(models_root / files.get("tokenizer_folder", HUNYUAN_FILES["tokenizers"]))
    return prompt


def sampler_ids(prompt: dict) -> list[str]:
    """The sampler nodes of an API prompt (KSampler-like: steps and a latent_image input), in id order."""
    ids = [i for i, node in prompt.items() if {"steps", "latent_image"} <= set(node["inputs"])]
    return sorted(ids, key=lambda i: (len(i), i))


def add_latent_savers(prompt: dict, prefix: str) -> dict[str, str]:
    """Add a SaveLatent after each sampler of prompt (in place); returns {sampler id: its files' prefix}."""
    savers = {}
    next_id = max(int(i) for i in prompt if i.isdigit()) + 1
    for sampler in sampler_ids(prompt):
        savers[sampler] = f"{prefix}/sampler_{sampler}"
        prompt[str(next_id)] = {"class_type": "SaveLatent",
                                "inputs": {"samples": [sampler, 0], "filename_prefix": savers[sampler]}}
        next_id += 1
    return savers


def run_for_latents(url: str, prompt: dict, out_dir: Path, prefix: str) -> dict:
    """Run prompt over HTTP with a SaveLatent after each sampler; returns {sampler id: latent tensor}."""
    from safetensors.torch import load_file

    from usp_video.distributed.comfy_queue import run_workflow

    prompt = json.loads(json.dumps(prompt))
    savers = add_latent_savers(prompt, prefix)
    status, files = run_workflow(url, prompt, out_dir, timeout=300)
    assert status == "success", status
    latents = {}
    for sampler, saver_prefix in savers.items():
        name = Path(saver_prefix).name
        found = [f for f in files if f.suffix == ".latent" and f.name.startswith(name + "_")]
        assert len(found) == 1, (sampler, files)
        latents[sampler] = load_file(str(found[0]))["latent_tensor"]
    return latents


# -- the stored latents ------------------------------------------------------------------------------------------

def latent_file(workflow: str) -> Path:
    return LATENTS_DIR / f"{workflow}.safetensors"


def stored_latents(workflow: str) -> dict:
    """{sampler node id: latent} that the previous release made from workflow ("wan21_t2v_usp", the API file's
    name without _api) with tiny_substitute's defaults."""
    from safetensors.torch import load_file

    return load_file(str(latent_file(workflow)))


def stored_latent(workflow: str, node: str | None = None):
    """The previous release's latent of one sampler of workflow; node None: the final one (the sampler whose
    latent the VAE decodes: the last in the workflow's order), what a new workflow's single sampler must match."""
    from safetensors import safe_open

    with safe_open(str(latent_file(workflow)), "pt") as f:
        return f.get_tensor(node if node is not None else f.metadata()["final_sampler"])


def write_latents(workflow: str, latents: dict, final: str) -> None:
    from safetensors.torch import save_file

    LATENTS_DIR.mkdir(exist_ok=True)
    settings = dict(TINY_SIZE, steps=TINY_STEPS, device="cpu", cpu_ranks=2)
    save_file({k: v.contiguous() for k, v in latents.items()}, str(latent_file(workflow)),
              {"commit": RELEASE_COMMIT, "settings": json.dumps(settings), "final_sampler": final})


# -- the server --------------------------------------------------------------------------------------------------

def api_workflows() -> list[str]:
    return sorted(p.name.removesuffix("_api.json") for p in API_DIR.glob("*_api.json"))


def ui_workflows() -> list[str]:
    return sorted(p.stem for p in UI_DIR.glob("*.json"))


def write_start_image(path: Path) -> None:
    """A fixed 64x64 RGB gradient (no random numbers: the same PNG every time) as the I2V start image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def write_control_video(path: Path) -> None:
    """A fixed 9-frame 64x64 H.264 video of a moving bar (a stand-in for a depth or pose video), written with PyAV
    by ComfyUI's Python (its requirements have PyAV; the tests' Python need not)."""
    from comfyui_server import comfyui_python

    script = (
        "import sys, av, numpy as np\n"
        "out = av.open(sys.argv[1], 'w'); s = out.add_stream('libx264', rate=16); s.width = s.height = 64\n"
        "s.pix_fmt = 'yuv420p'\n"
        "for i in range(9):\n"
        "    f = np.zeros((64, 64, 3), np.uint8); f[:, 6 * i:6 * i + 12] = 255\n"
        "    [out.mux(p) for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24'))]\n"
        "[out.mux(p) for p in s.encode()]; out.close()\n")
    subprocess.run([comfyui_python(), "-c", script, str(path)], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """One ComfyUI for the whole file: the pack, every tiny set in one models root, the start image."""
    from usp_video.distributed.models import FAMILIES
    from usp_video.distributed.models.hunyuan_video.tiny import make_tiny_hunyuan_models
    from usp_video.distributed.models.hunyuan_video15.tiny import IMAGE_DIM as HV15_IMAGE_DIM
    from usp_video.distributed.models.wan22_a14b.tiny import make_tiny_models as make_tiny_wan22

    if not COMFYUI_DIR:
        pytest.fail("USP_VIDEO_REQUIRE_COMFYUI=1 requires these tests to run, but COMFYUI_DIR is not set")
    work = tmp_path_factory.mktemp("previous_release")
    models_root = Path(tiny_models["dit"]).parents[1]
    make_tiny_hunyuan_models(models_root)
    make_tiny_wan22(models_root)
    FAMILIES["wan2.2-ti2v-5b"].make_tiny(models_root)
    (work / "input").mkdir()
    write_start_image(work / "input" / START_IMAGE)
    FAMILIES["wan2.1-vace"].make_tiny(models_root)
    FAMILIES["wan2.2-animate"].make_tiny(models_root)
    make_tiny_clip_vision(models_root / TINY_CLIP_VISION)
    FAMILIES["hunyuan-video-1.5"].make_tiny(models_root)
    make_tiny_siglip(models_root / TINY_SIGLIP, HV15_IMAGE_DIM)
    for name in {CONTROL_VIDEO} | video_inputs():
        write_control_video(work / "input" / name)
    with comfyui_server(COMFYUI_DIR, models_root, work, ("--input-directory", str(work / "input")),
                        test_nodes=True) as url:
        with urllib.request.urlopen(url + "/object_info") as response:
            info = json.load(response)
        yield url, work, models_root, info
    assert "IMPORT FAILED" not in "\n".join(l for l in log_text(work).splitlines() if "usp-video" in l)
    time.sleep(1)
    assert processes_matching(str(group_dir(work))) == [], "a group outlived ComfyUI"


# -- (a) the UI files load as the page loads them ----------------------------------------------------------------

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")  # each adds an upload widget


def _ordered_inputs(node_info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's required then optional inputs, in the order /object_info gives (input_order)."""
    order = node_info.get("input_order") or {k: list(v) for k, v in node_info["input"].items()}
    return [(name, node_info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def _required(node_info: dict) -> list[str]:
    return list(node_info["input"].get("required", {}))


def _choices(spec: list) -> list | None:
    """A combo's choices (V1: a list as the type; V3: "COMBO" with options), else None."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def widget_slots(node_info: dict) -> list[tuple[str, list | None]]:
    """The widgets the page makes for a node, in order, as (input name, spec): one per widget input (not forced
    to a socket), then a control_after_generate widget after a seed (the input's flag, or the page's old rule for
    INT seed/noise_seed), and an upload widget after a combo with an upload flag (spec None for these two)."""
    slots = []
    for name, spec in _ordered_inputs(node_info):
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if _choices(spec) is None and spec[0] not in WIDGET_TYPES or options.get("forceInput"):
            continue
        slots.append((name, spec))
        if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
            slots.append(("control_after_generate", None))
        if any(options.get(flag) for flag in UPLOAD_FLAGS):
            slots.append(("upload", None))
    return slots


def _is_file_name(value) -> bool:
    """A value naming a file the user must have (a model, an image): not in this server's lists, so only the
    combo itself is checked, not the choice."""
    return isinstance(value, str) and value.rsplit(".", 1)[-1] in ("safetensors", "gguf", "sft", "pt", "png", "jpg")


def value_problem(name: str, spec: list, value) -> str | None:
    """Why value does not fit the widget input (name, spec) as the page checks it; None when it fits."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = _choices(spec)
    if choices is not None:
        if not _is_file_name(value) and value not in choices:
            return f"{name}={value!r} is not one of {choices}"
        return None
    kind = spec[0]
    fits = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "STRING": lambda v: isinstance(v, str), "BOOLEAN": lambda v: isinstance(v, bool)}[kind]
    if not fits(value):
        return f"{name}={value!r} is not a {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
        return f"{name}={value!r} is outside [{options.get('min')}, {options.get('max')}]"
    return None


def _socket_type(spec: list) -> str:
    return "COMBO" if _choices(spec) is not None else spec[0]


def link_problem(where: str, input_name: str, input_spec: list, source_type: str | None, slot: int,
                 info: dict) -> str | None:
    """Why a link from output `slot` of a node of source_type into input_name does not fit, as ComfyUI's
    validate_node_input (non-strict) judges it with the current nodes: equal types, "*", or a common member of
    comma-separated types. None when it fits."""
    outputs = info.get(source_type, {}).get("output", [])
    if slot >= len(outputs):
        return f"{where}: {input_name} is linked to output {slot} of {source_type}, which is gone"
    received, wanted = outputs[slot], _socket_type(input_spec)
    if received == wanted or "*" in (received, wanted) or \
            {t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")}:
        return None
    return f"{where}: {input_name} takes {wanted}, but output {slot} of {source_type} is {received}"


def ui_problems(ui: dict, info: dict) -> list[str]:
    """What stops the page from loading a saved UI graph as it was saved and queueing it: nodes not registered,
    widget values that no longer fit their widgets (count, types, choices), saved input sockets whose input is
    gone (the page sends inputs by the saved names), links that land on a missing output or the wrong type."""
    problems, nodes = [], {node["id"]: node for node in ui["nodes"]}
    for node in ui["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] not in info:
            problems.append(f"{where}: not registered")
            continue
        slots, values = widget_slots(info[node["type"]]), node.get("widgets_values") or []
        # the page keeps a widget's default where a saved list ends early: fine for optional inputs added at the end
        optional = set(info[node["type"]]["input"].get("optional", {}))
        if len(values) > len(slots) or any(name not in optional for name, _ in slots[len(values):]):
            problems.append(f"{where}: {len(values)} widget values for the widgets {[n for n, _ in slots]}")
        problems += [f"{where}: {problem}" for (name, spec), value in zip(slots, values)
                     if spec is not None and (problem := value_problem(name, spec, value))]
        inputs = dict(_ordered_inputs(info[node["type"]]))
        sockets = [socket["name"] for socket in node.get("inputs", [])]
        problems += [f"{where}: input socket {name!r} is gone" for name in sockets if name not in inputs]
        widgets = {name for name, _ in slots}
        problems += [f"{where}: required input {name!r} is new: the saved node has no socket for it"
                     for name in _required(info[node["type"]]) if name not in widgets and name not in sockets]
    for _, source, slot, target, target_slot, _ in ui["links"]:
        node = nodes[target]
        name = node["inputs"][target_slot]["name"]
        inputs = dict(_ordered_inputs(info.get(node["type"], {"input": {}})))
        if name in inputs and (problem := link_problem(f"node {target} ({node['type']})", name, inputs[name],
                                                       nodes[source]["type"], slot, info)):
            problems.append(problem)
    return problems


@pytest.mark.parametrize("name", ui_workflows())
def test_previous_ui_workflow_loads(server, name):
    """Every node of the saved UI file is registered, its widget values and sockets fit the node as the page
    loads it, its links fit: the user who opens last release's file sees the same graph, no value shifted."""
    url, work, _, info = server
    problems = ui_problems(json.loads((UI_DIR / f"{name}.json").read_text()), info)
    assert problems == [], f"{name}:\n" + "\n".join(problems)


# -- (b) the API files: their inputs and links fit; the runnable ones give the previous latents ------------------

def api_node_problems(node_id: str, node: dict, prompt: dict, info: dict) -> list[str]:
    """What ComfyUI's /prompt would refuse in one API node, besides files absent from this server."""
    where = f"node {node_id} ({node['class_type']})"
    if node["class_type"] not in info:
        return [f"{where}: not registered"]
    inputs = dict(_ordered_inputs(info[node["class_type"]]))
    problems = [f"{where}: required input {name!r} is new: the saved prompt does not set it"
                for name in _required(info[node["class_type"]]) if name not in node["inputs"]]
    for name, value in node["inputs"].items():
        if name not in inputs:
            problems.append(f"{where}: input {name!r} is gone")
        elif isinstance(value, list):
            if problem := link_problem(where, name, inputs[name], prompt[value[0]]["class_type"], value[1], info):
                problems.append(problem)
        elif problem := value_problem(name, inputs[name], value):
            problems.append(f"{where}: {problem}")
    return problems


@pytest.mark.parametrize("name", api_workflows())
def test_previous_api_workflow_fits_the_nodes(server, name):
    """Every node of the saved API file is registered, every input it sets still exists and fits, every link
    lands on an output of the right type (for the files the tiny sets cannot run, this is the whole check)."""
    _, _, _, info = server
    prompt = json.loads((API_DIR / f"{name}_api.json").read_text())
    problems = [p for node_id, node in prompt.items() for p in api_node_problems(node_id, node, prompt, info)]
    assert problems == [], f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", [n for n in api_workflows() if n not in NO_STORED_LATENTS])
def test_previous_api_workflow_gives_the_previous_latents(server, name, tmp_path):
    """The saved API file, tiny files and sizes substituted, runs over HTTP and each sampler's latent matches
    what the previous release made from it."""
    url, work, models_root, _ = server
    prompt = tiny_substitute(json.loads((API_DIR / f"{name}_api.json").read_text()), models_root)
    try:
        latents = run_for_latents(url, prompt, tmp_path, f"previous_release/{name}")
    except Exception as exc:
        raise AssertionError(f"{name} failed: {exc}\n(log: {work / 'comfyui.log'})") from None
    if WRITE_LATENTS:
        write_latents(name, latents, final=sampler_ids(prompt)[-1])
        pytest.skip(f"wrote {latent_file(name)}")
    expected = stored_latents(name)
    RAN[name] = latents
    assert sorted(latents) == sorted(expected), "the workflow's samplers are not those the latents were made from"
    for sampler, latent in latents.items():
        assert latent.shape == expected[sampler].shape, (sampler, latent.shape, expected[sampler].shape)
        error = rel_error(latent, expected[sampler])
        assert error <= TOLERANCE, f"{name}, sampler {sampler}: relative error {error:.2e} against the previous release"


RAN: dict[str, dict] = {}  # this session's latents of each previous-release workflow (the test above)
SHIPPED_API = Path(__file__).resolve().parents[1] / "workflows" / "api"


@pytest.mark.parametrize("name", [n for n in api_workflows() if n not in NO_STORED_LATENTS])
def test_generic_workflow_gives_the_latents_of_the_per_family_one(server, name, tmp_path):
    """The shipped workflow of the same name, rebuilt on the generic nodes (USP Load Diffusion Model, USP Sampler,
    USP Sampler Advanced, USP LoRA...), gives the final latent of the previous release's per-family workflow:
    within 1e-6 of this session's run of the old one, within the stored tolerance of the stored latent."""
    url, work, models_root, _ = server
    shipped = json.loads((SHIPPED_API / f"{name}_api.json").read_text())
    from usp_video.nodes import NODE_CLASSES

    old = sorted({n["class_type"] for n in shipped.values() if n["class_type"] in NODE_CLASSES
                  and NODE_CLASSES[n["class_type"]].GET_SCHEMA().is_deprecated})
    assert old == [], f"the shipped {name} still uses deprecated nodes {old}"
    prompt = tiny_substitute(shipped, models_root)
    latents = run_for_latents(url, prompt, tmp_path, f"generic/{name}")
    final = latents[sampler_ids(prompt)[-1]]
    error = rel_error(final, stored_latent(name))
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} against the previous release's stored latent"
    if name in RAN:
        previous = RAN[name][sorted(RAN[name], key=lambda i: (len(i), i))[-1]]
        error = rel_error(final, previous)
        assert error <= 1e-6, f"{name}: relative error {error:.2e} against the per-family workflow run now"


def shipped_since() -> list[str]:
    """The shipped API workflows the previous release did not have."""
    return sorted(set(p.name.removesuffix("_api.json") for p in SHIPPED_API.glob("*_api.json")) - set(api_workflows()))


def video_inputs() -> set[str]:
    """The files the shipped API workflows' LoadVideo nodes read (a control video is written under each name)."""
    return {node["inputs"]["file"] for path in SHIPPED_API.glob("*_api.json")
            for node in json.loads(path.read_text()).values() if node["class_type"] == "LoadVideo"}


def new_tiny_files() -> dict[str, dict[str, str]]:
    """Per new workflow, tiny files other than tiny_model_files' (the VACE DiT reads a 4096-wide text; so does the
    Animate DiT whose motion encoder takes the 512x512 faces WanAnimateToVideo makes: the ComfyUI-size one; the
    HunyuanVideo 1.5 workflows' empty tokenizer_folder is the tiny Qwen tokenizer)."""
    from usp_video.distributed.models.hunyuan_video15.tiny import FILES as HV15
    from usp_video.distributed.models.wan_animate.tiny import FILES as ANIMATE
    from usp_video.distributed.models.wan_vace.tiny import FILES as VACE

    vace = {"umt5_xxl_fp16.safetensors": VACE["text_encoder"]}
    hv15 = {"tokenizer_folder": HV15["qwen_tokenizer"]}
    return {"wan21_vace_r2v_usp": vace, "wan21_vace_control_usp": vace,
            "wan22_animate_usp": dict(vace, **{"wan2.2_animate_14B_bf16.safetensors": ANIMATE["dit_comfy"]}),
            **{f"hunyuan_video15_{kind}_usp": hv15 for kind in ("t2v", "i2v", "i2v_step_distilled")}}


@pytest.mark.parametrize("name", shipped_since() + sorted(NO_STORED_LATENTS))
def test_workflow_runs_on_the_tiny_set(server, name, tmp_path):
    """Each shipped workflow that no latent test runs (new since the previous release, or one that release could
    not run) runs in ComfyUI on the tiny sets (its models' tiny files, the start image and the control video in
    the input folder, the tiny CLIP vision) and writes its video."""
    url, _, models_root, _ = server
    from usp_video.distributed.comfy_queue import run_workflow

    prompt = tiny_substitute(json.loads((SHIPPED_API / f"{name}_api.json").read_text()), models_root,
                             files=new_tiny_files().get(name))
    status, files = run_workflow(url, prompt, tmp_path, timeout=300)
    assert status == "success", status
    assert [f for f in files if f.suffix in (".webp", ".mp4", ".webm")], files


def test_every_runnable_workflow_has_stored_latents():
    """No latent file is missing or left over; a previous workflow without stored latents is a known one."""
    assert set(NO_STORED_LATENTS) <= set(api_workflows())
    stored = sorted(p.name.removesuffix(".safetensors") for p in LATENTS_DIR.glob("*.safetensors"))
    assert stored == [n for n in api_workflows() if n not in NO_STORED_LATENTS]
    assert stored_latent("wan22_t2v_usp_two_samplers").equal(stored_latent("wan22_t2v_usp_two_samplers", "11"))

"""Drag and drop, as a person would: the real ComfyUI page in headless Chromium (Playwright), on two frontends.

The shipped UI-format workflow file (its model files swapped for the tiny models, its video size and steps
made small) is dropped onto the canvas, Run is pressed with latent previews on (--preview-method latent2rgb),
and the test waits for the animated WebP to appear in the SaveAnimatedWEBP node, seeing the previews arrive
and the group's state on the USP Group node (and on the one of a workflow dropped after the run). Before
that, every shipped workflow is dropped and checked to open whole with no widget text cut short.
Screenshots are kept in test-artifacts/browser-<frontend>/.

It runs once per frontend: "bundled" (the comfyui-frontend-package that ComfyUI's requirements pin) and
"1.58.1" (the package installed apart, COMFYUI_FRONTEND_ROOT naming its static/ folder, served with
main.py --front-end-root; .ci/run installs it). The newer page gives a dropped workflow's nodes new ids, so
nodes are found by type and title through the page's app.graph, never by the file's ids; and the tiny-model
swap goes by widget VALUE (a real file name) and widget NAME (width, steps, ...), never by node type or widget
position, so that reworked nodes keep the test working. Skipped unless COMFYUI_DIR is set and Playwright and
a Chromium (CHROMIUM, default /usr/bin/chromium) are installed; the 1.58.1 case also needs
COMFYUI_FRONTEND_ROOT (under USP_VIDEO_REQUIRE_COMFYUI=1 every skip is a failure, see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from comfyui_server import REPO, comfyui_server

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("USP_VIDEO_ARTIFACTS", REPO / "test-artifacts"))
# comfyui-frontend-package 1.58.1's static/ folder (pip install --target DIR: DIR/comfyui_frontend_package/static)
FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT")

pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to open"),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
]

RUN_WORKFLOW = "wan21_t2v_usp"
SHIPPED = tuple(path.stem for path in sorted((REPO / "workflows").glob("*.json")))  # every shipped UI workflow
# the previous release's UI workflows (tests/previous_release): they open whole on its deprecated node ids
PREVIOUS = sorted((REPO / "tests" / "previous_release" / "workflows").glob("*.json"))
# Each real file the run workflow names -> the tiny_models role that stands in for it (the same role: model,
# text encoder, VAE). Matched by widget value, so it holds whatever node type or widget position loads it.
REAL_FILE_ROLES = {"wan2.1_t2v_1.3B_fp16.safetensors": "dit", "umt5_xxl_fp16.safetensors": "text_encoder",
                   "wan_2.1_vae.safetensors": "vae"}
# Widgets set by name, on every node that has them (type None) or on one node type: a video small enough
# for CPU ranks, 3 steps, the group on CPU ranks.
SMALL_RUN = {(None, "width"): 64, (None, "height"): 48, (None, "length"): 9, (None, "steps"): 3,
             ("UspGroup", "device"): "cpu"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_names(info: dict) -> list[str | None]:
    """The names of a node's widgets_values in order, from the server's /object_info entry (input_order: V1
    and V3 nodes alike). A widget input gives one value; an INT (or combo) with a control-after-generate
    widget gives a second one (None here), which the page adds where the spec asks for it or, by ComfyUI's
    old convention, for an INT input named seed or noise_seed."""
    names: list[str | None] = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, options = (list(info["input"][section][name]) + [{}])[:2]
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue  # a socket, not a widget
            names.append(name)
            legacy_seed = kind == "INT" and name in ("seed", "noise_seed")
            if options.get("control_after_generate", legacy_seed):
                names.append(None)
    return names


def tiny_ui_workflow(tiny_models: dict, object_info: dict) -> str:
    """The run workflow with the tiny models and SMALL_RUN set; fails naming what it could not find."""
    workflow = json.loads((REPO / "workflows" / f"{RUN_WORKFLOW}.json").read_text())
    swapped, sized = set(), set()
    for node in workflow["nodes"]:
        values = node.get("widgets_values")
        if not isinstance(values, list):
            continue
        for index, value in enumerate(values):
            if isinstance(value, str) and value in REAL_FILE_ROLES:
                values[index] = Path(tiny_models[REAL_FILE_ROLES[value]]).name
                swapped.add(value)
        names = widget_names(object_info[node["type"]])
        assert len(names) == len(values), (node["type"], names, values)  # the file matches the running nodes
        for (node_type, name), value in SMALL_RUN.items():
            if node_type in (None, node["type"]) and name in names:
                values[names.index(name)] = value
                sized.add((node_type, name))
    assert swapped == set(REAL_FILE_ROLES), f"{RUN_WORKFLOW} no longer names {set(REAL_FILE_ROLES) - swapped}"
    assert sized == set(SMALL_RUN), f"no widget named {set(SMALL_RUN) - sized} in {RUN_WORKFLOW}"
    return json.dumps(workflow)


# Every text the canvas draws cut short ends in an ellipsis that litegraph draws on its own
# (drawTextInArea): record the text drawn just before each one.
RECORD_CUT_TEXT = """() => {
    const proto = CanvasRenderingContext2D.prototype;
    if (proto.__uspRecording) return;
    const fillText = proto.fillText;
    let previous = "";
    proto.fillText = function (text, ...rest) {
        if (window.__uspCut && typeof text === "string") {
            if (["\u2026", "\u2025", "\u2024"].includes(text)) window.__uspCut.push(previous);
            previous = text;
        }
        return fillText.call(this, text, ...rest);
    };
    proto.__uspRecording = true;
}"""


def texts_cut_short(page) -> list[str]:
    """Draw the whole graph at scale 1 and return every label or value the canvas cut short."""
    page.evaluate(RECORD_CUT_TEXT)
    return page.evaluate("""() => { const canvas = window.app.canvas;
        canvas.ds.scale = 1; canvas.ds.offset = [0, 0]; window.__uspCut = [];
        canvas.setDirty(true, true); canvas.draw(true, true);
        const cut = window.__uspCut; window.__uspCut = null; return cut; }""")


# The text of the state box (web/js/usp_status.js) on the page's USP Group node, '' where there is none.
STATUS_ON_THE_GROUP_NODE = """() => { const node = window.app.graph._nodes.find(n => n.type === 'UspGroup');
    const widget = node && (node.widgets || []).find(w => w.name === 'usp_status');
    return widget ? String(widget.value) : ''; }"""


def status_on_the_group_node(page) -> str:
    return page.evaluate(STATUS_ON_THE_GROUP_NODE)


def drop(page, text: str, file_name: str) -> list[dict]:
    """Drop a workflow file onto the canvas, as a person drags one from the desktop, and wait until the page
    shows it: every node of the file's types, none of the graph shown before (the old nodes are marked,
    as the same file may be dropped twice and a newer page may open it in a new tab). Returns the page's
    nodes: type, title, known (a type the page has registered), widget values (those saved), linked inputs."""
    types = sorted(node["type"] for node in json.loads(text)["nodes"])
    page.evaluate("() => window.app.graph._nodes.forEach(n => { n.__uspBeforeDrop = true; })")
    transfer = page.evaluate_handle("""([text, name]) => { const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }""", [text, file_name])
    page.locator("canvas#graph-canvas").dispatch_event("drop", {"dataTransfer": transfer})
    page.wait_for_function("""(types) => { const nodes = window.app.graph._nodes;
        return !nodes.some(n => n.__uspBeforeDrop) &&
               JSON.stringify(nodes.map(n => n.type).sort()) === JSON.stringify(types); }""", arg=types,
                           timeout=30_000)
    return page.evaluate("""() => window.app.graph._nodes.map(n => ({type: n.type, title: n.title,
        known: LiteGraph.registered_node_types[n.type] !== undefined,
        widgets: Object.fromEntries((n.widgets || []).filter(w => w.serialize !== false).map(w => [w.name, w.value])),
        values: (n.widgets || []).filter(w => w.serialize !== false).map(w => w.value),
        links: (n.inputs || []).filter(i => i.link != null).length}))""")


def same_nodes(expected: list[dict], shown: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs each node of a workflow file with the page's node of the same type and title (the file's title
    where it sets one, the nodes with titles first), never by id: a page may renumber a dropped graph."""
    left = list(shown)
    pairs = []
    for node in sorted(expected, key=lambda node: "title" not in node):
        match = next((s for s in left if s["type"] == node["type"] and node.get("title", s["title"]) == s["title"]),
                     None)
        assert match is not None, f"no {node['type']} node titled {node.get('title')!r} in the page"
        left.remove(match)
        pairs.append((node, match))
    return pairs


def opens_in_the_page(page, name: str, shots: Path, path: Path | None = None, layout: bool = True) -> None:
    """A shipped UI workflow (or the file at path) dropped onto the page: every node is one the page knows (none
    missing), every link is there, our nodes' widgets hold the file's values in the file's order, and (layout) no
    label or value is cut short and no node drawn over another at the positions and sizes the file sets."""
    text = (path or REPO / "workflows" / f"{name}.json").read_text()
    for node, shown in same_nodes(json.loads(text)["nodes"], drop(page, text, f"{name}.json")):
        assert shown["known"], f"{name}: the page does not know {node['type']}"
        assert shown["links"] == sum(1 for i in node["inputs"] if i["link"] is not None), (name, node["type"])
        if node["type"].startswith("Usp"):
            assert shown["values"][:len(node["widgets_values"])] == node["widgets_values"], (name, node["type"])
    if not layout:
        return
    assert texts_cut_short(page) == [], f"{name}: text cut short on the canvas (widen the node in make_workflows)"
    boxes = page.evaluate("() => window.app.graph._nodes.map(n => [n.title, ...n.boundingRect])")  # title bar included
    overlapping = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                   if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
    assert overlapping == [], f"{name}: nodes drawn over each other (move them in make_workflows)"
    page.screenshot(path=str(shots / f"{name}.png"))


@pytest.fixture(params=["bundled", "1.58.1"])
def frontend(request) -> tuple[str, tuple[str, ...], str]:
    """(name, main.py's flags that serve it, the version the page must report): the bundled page (the
    comfyui-frontend-package version ComfyUI's requirements.txt pins), or comfyui-frontend-package 1.58.1's."""
    if request.param == "bundled":
        pinned = re.search(r"^comfyui-frontend-package==(\S+)", (Path(COMFYUI_DIR) / "requirements.txt").read_text(),
                           re.MULTILINE)
        return request.param, (), pinned.group(1)
    if not FRONTEND_ROOT or not (Path(FRONTEND_ROOT) / "index.html").is_file():
        pytest.skip(f"COMFYUI_FRONTEND_ROOT ({FRONTEND_ROOT}) is not comfyui-frontend-package 1.58.1's static "
                    "folder: pip install --no-deps --target DIR comfyui-frontend-package==1.58.1, then "
                    "COMFYUI_FRONTEND_ROOT=DIR/comfyui_frontend_package/static")
    return request.param, ("--front-end-root", FRONTEND_ROOT), request.param


def test_drop_workflow_press_run_see_the_video(frontend, tiny_models, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    name, frontend_args, version = frontend
    shots = ARTIFACTS / f"browser-{name}"
    shots.mkdir(parents=True, exist_ok=True)
    with comfyui_server(COMFYUI_DIR, Path(tiny_models["dit"]).parents[1], tmp_path,
                        ("--preview-method", "latent2rgb", *frontend_args)) as url, \
            sync_api.sync_playwright() as playwright:
        object_info = json.loads(urllib.request.urlopen(url + "/object_info").read())
        workflow = tiny_ui_workflow(tiny_models, object_info)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 2800, "height": 1300})
            page.goto(url)
            page.wait_for_selector("canvas#graph-canvas", timeout=90_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=90_000)
            page.wait_for_timeout(2000)
            page.keyboard.press("Escape")  # the template browser opens on first start
            assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == version  # the page asked for
            # Every shipped workflow opens whole, on a page that has run nothing yet: after a run, a newer page
            # shows the old run's previews and video on the new graph's nodes of the same ids (grown to hold
            # them), which is the page's doing, not the workflow's layout.
            for workflow_name in SHIPPED:
                opens_in_the_page(page, workflow_name, shots)
            for path in PREVIOUS:  # saved before the generic nodes: their deprecated nodes still open and link
                opens_in_the_page(page, f"previous-{path.stem}", shots, path=path, layout=False)
            # the latent previews the server sends (binary "b_preview" events: JPEG blobs)
            page.evaluate("""() => { window.__uspPreviews = [];
                window.comfyAPI.api.api.addEventListener('b_preview', e => window.__uspPreviews.push(
                    [e.detail.type, e.detail.size])); }""")
            shown = drop(page, workflow, f"{RUN_WORKFLOW}.json")
            # widget_names() read the file as the page does: the widgets it set by name hold its values there
            for (node_type, widget), value in SMALL_RUN.items():
                assert value in [n["widgets"][widget] for n in shown
                                 if widget in n["widgets"] and node_type in (None, n["type"])], (widget, shown)
            assert "no group running" in status_on_the_group_node(page)
            page.screenshot(path=str(shots / "1-dropped.png"))

            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function("() => window.__uspPreviews.length > 0", timeout=180_000)
            page.screenshot(path=str(shots / "2-preview.png"))
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP');"
                " return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }", timeout=180_000)
            src = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP').imgs[0].src")
            assert "usp_video" in src and ".webp" in src  # the run's video, in its usp_video/ subfolder
            previews = page.evaluate("() => window.__uspPreviews")
            assert len(previews) >= 3 and all(kind == "image/jpeg" and size > 0 for kind, size in previews), previews
            # the group's state after the run comes in its own event, soon after the video
            page.wait_for_function(f"() => ({STATUS_ON_THE_GROUP_NODE})().includes('last run: ')", timeout=30_000)
            status = status_on_the_group_node(page)
            for part in ("ready: 2 CPU ranks", "ulysses 2 x ring 1", "weights per rank:", "free memory: rank 0 ",
                         "rank 1 ", "last run: 3 steps, "):
                assert part in status, f"{part!r} is not in the USP Group node's state: {status!r}"
            page.screenshot(path=str(shots / "3-video.png"))
            saved = page.evaluate("""async () => [JSON.stringify(window.app.graph.serialize()),
                                                  JSON.stringify((await window.app.graphToPrompt()).output)]""")
            assert all("usp_status" not in text and "ulysses 2 x ring 1" not in text for text in saved), \
                "the state box went into the saved workflow or the prompt"
            run_file = (REPO / "workflows" / f"{RUN_WORKFLOW}.json").read_text()
            drop(page, run_file, f"{RUN_WORKFLOW}.json")  # a new USP Group node shows the state too
            assert "last run: 3 steps" in status_on_the_group_node(page)
        finally:
            browser.close()
        history = json.loads(urllib.request.urlopen(url + "/history").read())
        outputs = [o for entry in history.values() for o in entry.get("outputs", {}).values() if "images" in o]
        assert outputs and outputs[0]["images"][0]["filename"].endswith(".webp")
        assert (tmp_path / "output" / "usp_video" / outputs[0]["images"][0]["filename"]).stat().st_size > 0

"""Drag and drop, as a person would: the real ComfyUI page in headless Chromium (Playwright).

The shipped UI-format workflow file (its model names and size set to the tiny models) is dropped
onto the canvas, Run is pressed with latent previews on (--preview-method latent2rgb), and the test
waits for the animated WebP to appear in the SaveAnimatedWEBP node, seeing the previews arrive and
the group's state on the USP Group node; then every shipped workflow is dropped and checked to open
whole with no widget text cut short. Screenshots are kept in test-artifacts/. Skipped unless
COMFYUI_DIR is set and Playwright and a Chromium (CHROMIUM, default /usr/bin/chromium) are installed.
"""

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from comfyui_server import REPO, comfyui_server

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("USP_VIDEO_ARTIFACTS", REPO / "test-artifacts"))

pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to open"),
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
]


def tiny_ui_workflow(tiny_models) -> str:
    workflow = json.loads((REPO / "workflows" / "wan21_t2v_usp.json").read_text())
    changes = {"UspWanModelLoader": {0: Path(tiny_models["dit"]).name},
               "UspTextEncoderLoader": {0: Path(tiny_models["text_encoder"]).name},
               "UspVaeLoader": {0: Path(tiny_models["vae"]).name},
               "UspGroup": {0: "cpu"}, "EmptyHunyuanLatentVideo": {0: 64, 1: 48, 2: 9}, "UspWanSampler": {2: 3}}
    for node in workflow["nodes"]:
        for index, value in changes.get(node["type"], {}).items():
            node["widgets_values"][index] = value
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


def status_on_the_group_node(page) -> str:
    return page.evaluate("""() => { const node = window.app.graph._nodes.find(n => n.type === 'UspGroup');
        const widget = node && (node.widgets || []).find(w => w.name === 'usp_status');
        return widget ? String(widget.value) : ''; }""")


def opens_in_the_page(page, name: str) -> None:
    """A shipped UI workflow dropped onto the page: every node is one the page knows (none missing),
    every link is there, our nodes' widgets hold the file's values in the file's order, and no label
    or value is cut short at the node sizes the file sets."""
    text = (REPO / "workflows" / f"{name}.json").read_text()
    expected = json.loads(text)
    transfer = page.evaluate_handle("""([text, name]) => { const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }""", [text, f"{name}.json"])
    page.locator("canvas#graph-canvas").dispatch_event("drop", {"dataTransfer": transfer})
    page.wait_for_function("([n, type]) => window.app.graph._nodes.length === n && "
                           "window.app.graph._nodes.some(node => node.type === type)",
                           arg=[len(expected["nodes"]), expected["nodes"][1]["type"]], timeout=30_000)
    nodes = page.evaluate("""() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type,
        known: LiteGraph.registered_node_types[n.type] !== undefined,
        widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => w.value),
        links: (n.inputs || []).filter(i => i.link != null).length}))""")
    by_id = {node["id"]: node for node in nodes}
    for node in expected["nodes"]:
        shown = by_id[node["id"]]
        assert shown["known"], f"{name}: the page does not know {node['type']}"
        assert shown["links"] == sum(1 for i in node["inputs"] if i["link"] is not None), (name, node["type"])
        if node["type"].startswith("Usp"):
            assert shown["widgets"][:len(node["widgets_values"])] == node["widgets_values"], (name, node["type"])
    assert texts_cut_short(page) == [], f"{name}: text cut short on the canvas (widen the node in make_workflows)"
    boxes = page.evaluate("() => window.app.graph._nodes.map(n => [n.title, ...n.boundingRect])")  # title bar included
    overlapping = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                   if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
    assert overlapping == [], f"{name}: nodes drawn over each other (move them in make_workflows)"
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


def test_drop_workflow_press_run_see_the_video(tiny_models, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfyui_server(COMFYUI_DIR, Path(tiny_models["dit"]).parents[1], tmp_path,
                        ("--preview-method", "latent2rgb")) as url, sync_api.sync_playwright() as playwright:
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
            # the latent previews the server sends (binary "b_preview" events: JPEG blobs)
            page.evaluate("""() => { window.__uspPreviews = [];
                window.comfyAPI.api.api.addEventListener('b_preview', e => window.__uspPreviews.push(
                    [e.detail.type, e.detail.size])); }""")
            transfer = page.evaluate_handle("""(text) => { const dt = new DataTransfer();
                dt.items.add(new File([text], 'wan21_t2v_usp.json', {type: 'application/json'})); return dt; }""",
                                            tiny_ui_workflow(tiny_models))
            page.locator("canvas#graph-canvas").dispatch_event("drop", {"dataTransfer": transfer})
            page.wait_for_function("() => window.app.graph._nodes.length === 10", timeout=30_000)
            types = page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")
            assert "UspWanSampler" in types and "SaveAnimatedWEBP" in types
            assert "no group running" in status_on_the_group_node(page)
            page.screenshot(path=str(ARTIFACTS / "browser-1-dropped.png"))

            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function("() => window.__uspPreviews.length > 0", timeout=180_000)
            page.screenshot(path=str(ARTIFACTS / "browser-2-preview.png"))
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP');"
                " return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }", timeout=180_000)
            src = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP').imgs[0].src")
            assert "usp_video" in src and "wan21_" in src
            previews = page.evaluate("() => window.__uspPreviews")
            assert len(previews) >= 3 and all(kind == "image/jpeg" and size > 0 for kind, size in previews), previews
            page.wait_for_timeout(1000)
            status = status_on_the_group_node(page)
            for part in ("ready: 2 CPU ranks", "ulysses 2 x ring 1", "weights per rank:", "free memory: rank 0 ",
                         "rank 1 ", "last run: 3 steps, "):
                assert part in status, f"{part!r} is not in the USP Group node's state: {status!r}"
            page.screenshot(path=str(ARTIFACTS / "browser-3-video.png"))
            saved = page.evaluate("""async () => [JSON.stringify(window.app.graph.serialize()),
                                                  JSON.stringify((await window.app.graphToPrompt()).output)]""")
            assert all("usp_status" not in text and "ulysses 2 x ring 1" not in text for text in saved), \
                "the state box went into the saved workflow or the prompt"
            for name in ("wan21_t2v_usp", "hunyuan_video_t2v_usp", "wan22_t2v_usp", "wan22_t2v_usp_two_samplers",
                         "wan22_ti2v_5b_usp"):
                opens_in_the_page(page, name)
            assert "last run: 3 steps" in status_on_the_group_node(page)  # a new USP Group node shows it too
        finally:
            browser.close()
        history = json.loads(urllib.request.urlopen(url + "/history").read())
        outputs = [o for entry in history.values() for o in entry.get("outputs", {}).values() if "images" in o]
        assert outputs and outputs[0]["images"][0]["filename"].endswith(".webp")
        assert (tmp_path / "output" / "usp_video" / outputs[0]["images"][0]["filename"]).stat().st_size > 0

"""Drag and drop, as a person would: the real ComfyUI page in headless Chromium (Playwright).

The shipped UI-format workflow file (its model names and size set to the tiny models) is dropped
onto the canvas, Run is pressed, and the test waits for the animated WebP to appear in the
SaveAnimatedWEBP node; then the Wan 2.2 workflows are dropped and checked to open whole. Screenshots are kept in test-artifacts/. Skipped unless COMFYUI_DIR is
set and Playwright and a Chromium (CHROMIUM, default /usr/bin/chromium) are installed.
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


def opens_in_the_page(page, name: str) -> None:
    """A shipped UI workflow dropped onto the page: every node is one the page knows (none missing),
    every link is there, and our nodes' widgets hold the file's values in the file's order."""
    text = (REPO / "workflows" / f"{name}.json").read_text()
    expected = json.loads(text)
    transfer = page.evaluate_handle("""([text, name]) => { const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }""", [text, f"{name}.json"])
    page.locator("canvas#graph-canvas").dispatch_event("drop", {"dataTransfer": transfer})
    page.wait_for_function("(n) => window.app.graph._nodes.length === n && "
                           "window.app.graph._nodes.some(n => n.type.startsWith('UspWan22'))",
                           arg=len(expected["nodes"]), timeout=30_000)
    nodes = page.evaluate("""() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type,
        known: LiteGraph.registered_node_types[n.type] !== undefined,
        widgets: (n.widgets || []).map(w => w.value), links: (n.inputs || []).filter(i => i.link != null).length}))""")
    by_id = {node["id"]: node for node in nodes}
    for node in expected["nodes"]:
        shown = by_id[node["id"]]
        assert shown["known"], f"{name}: the page does not know {node['type']}"
        assert shown["links"] == sum(1 for i in node["inputs"] if i["link"] is not None), (name, node["type"])
        if node["type"].startswith("Usp"):
            assert shown["widgets"][:len(node["widgets_values"])] == node["widgets_values"], (name, node["type"])
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


def test_drop_workflow_press_run_see_the_video(tiny_models, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfyui_server(COMFYUI_DIR, Path(tiny_models["dit"]).parents[1], tmp_path) as url, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url)
            page.wait_for_selector("canvas#graph-canvas", timeout=90_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=90_000)
            page.wait_for_timeout(2000)
            page.keyboard.press("Escape")  # the template browser opens on first start
            transfer = page.evaluate_handle("""(text) => { const dt = new DataTransfer();
                dt.items.add(new File([text], 'wan21_t2v_usp.json', {type: 'application/json'})); return dt; }""",
                                            tiny_ui_workflow(tiny_models))
            page.locator("canvas#graph-canvas").dispatch_event("drop", {"dataTransfer": transfer})
            page.wait_for_function("() => window.app.graph._nodes.length === 10", timeout=30_000)
            types = page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")
            assert "UspWanSampler" in types and "SaveAnimatedWEBP" in types
            page.screenshot(path=str(ARTIFACTS / "browser-1-dropped.png"))

            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function(
                "() => { const n = window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP');"
                " return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete; }", timeout=180_000)
            src = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'SaveAnimatedWEBP').imgs[0].src")
            assert "usp_video" in src and "wan21_" in src
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "browser-2-video.png"))
            for name in ("wan22_t2v_usp", "wan22_t2v_usp_two_samplers", "wan22_ti2v_5b_usp"):
                opens_in_the_page(page, name)
        finally:
            browser.close()
        history = json.loads(urllib.request.urlopen(url + "/history").read())
        outputs = [o for entry in history.values() for o in entry.get("outputs", {}).values() if "images" in o]
        assert outputs and outputs[0]["images"][0]["filename"].endswith(".webp")
        assert (tmp_path / "output" / "usp_video" / outputs[0]["images"][0]["filename"]).stat().st_size > 0

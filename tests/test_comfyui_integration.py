"""A real ComfyUI with this pack: the shipped API workflow over HTTP, Cancel, and shutdown.

Skipped unless COMFYUI_DIR points to a ComfyUI checkout whose requirements are installed in
the Python that runs the tests (or in COMFYUI_PYTHON). See README, "Tests".
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comfyui_server import comfyui_server, group_dir, log_text
from group_helpers import processes_matching

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to start")
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "wan21_t2v_usp_api.json"


def tiny_overrides(tiny_models, steps=3, width=64, height=48, length=9, seed=1):
    return ["--set", "UspGroup.device=cpu", "--set", "UspGroup.cpu_ranks=2",
            "--set", f"2.model_name={Path(tiny_models['dit']).name}",
            "--set", f"3.text_encoder_name={Path(tiny_models['text_encoder']).name}",
            "--set", f"8.vae_name={Path(tiny_models['vae']).name}",
            "--set", f"6.width={width}", "--set", f"6.height={height}", "--set", f"6.length={length}",
            "--set", f"7.steps={steps}", "--set", f"7.seed={seed}"]


def queue(url, out_dir, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "queue", str(WORKFLOW),
                           "--server", url, "--out-dir", str(out_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui")
    models_root = Path(tiny_models["dit"]).parents[1]
    with comfyui_server(COMFYUI_DIR, models_root, work) as url:
        yield url, work
    assert "IMPORT FAILED" not in "\n".join(l for l in log_text(work).splitlines() if "usp-video" in l)
    # ComfyUI has exited: no rank of the groups it started may be left (other groups on the machine,
    # another test run's say, are not this server's)
    time.sleep(1)
    assert processes_matching(str(group_dir(work))) == [], "a group outlived ComfyUI"


def test_pack_loads_under_a_folder_name(server):
    url, work = server
    info = json.loads(urllib.request.urlopen(url + "/object_info").read())
    for node in ("UspGroup", "UspWanModelLoader", "UspTextEncode", "UspWanSampler", "UspVaeDecode"):
        assert node in info, f"{node} missing: see {work / 'comfyui.log'}"
    assert info["UspWanSampler"]["category"] == "USP video"


def test_shipped_api_workflow_runs_over_http(server, tiny_models, tmp_path):
    url, work = server
    result = queue(url, tmp_path, *tiny_overrides(tiny_models))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node 7: 3/3" in result.stdout  # per-step progress over the websocket
    files = list(tmp_path.rglob("*.webp"))
    assert len(files) == 1
    from PIL import Image

    with Image.open(files[0]) as image:  # written by the native SaveAnimatedWEBP node
        assert image.size == (64, 48) and image.n_frames == 9


def test_cancel_over_http_then_next_prompt_runs(server, tiny_models, tmp_path):
    url, work = server
    proc = subprocess.Popen([sys.executable, "-m", "usp_video.distributed.cli", "queue", str(WORKFLOW),
                             "--server", url, "--out-dir", str(tmp_path),
                             *tiny_overrides(tiny_models, steps=400, width=256, height=256, length=21, seed=2)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("node 7: 3/"):
            urllib.request.urlopen(urllib.request.Request(url + "/interrupt", data=b"{}", method="POST")).read()
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert proc.returncode == 1 and "interrupted" in output, output
    steps = [int(l.split()[2].split("/")[0]) for l in output.splitlines() if l.startswith("node 7:")]
    assert max(steps) < 20, f"ran on to step {max(steps)} after the interrupt"
    result = queue(url, tmp_path, *tiny_overrides(tiny_models, seed=3))
    assert result.returncode == 0, result.stdout + result.stderr


def test_errors_reach_the_client(server, tiny_models, tmp_path):
    url, _ = server
    rejected = queue(url, tmp_path, *tiny_overrides(tiny_models), "--set",
                     f"2.model_name={Path(tiny_models['vae']).name}")
    assert rejected.returncode != 0 and "Value not in list: model_name" in rejected.stderr
    failed = queue(url, tmp_path, *tiny_overrides(tiny_models), "--set", "UspGroup.ulysses=3", "--set", "7.seed=4")
    assert failed.returncode != 0
    assert "node 2 (UspWanModelLoader) failed" in failed.stderr
    assert "ulysses=3 does not fit 2 ranks" in failed.stderr and "Valid choices" in failed.stderr

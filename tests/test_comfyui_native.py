"""Our files and conventions against ComfyUI's own code (skipped where ComfyUI is absent).

Set COMFYUI_DIR to a ComfyUI checkout, and COMFYUI_PYTHON to a Python with its requirements and this
pack installed (default: the Python running the tests).
ComfyUI's WanModel and WanVAE load our tiny files strictly; its KSampler (euler, simple,
ModelSamplingSD3 shift, the same seed) must give the latent our sampler gives. The same for
HunyuanVideo (comfyui_reference_hunyuan.py).
"""

import json
import os
import subprocess

import pytest

from comfyui_server import comfyui_python

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI checkout to compare with")


@pytest.fixture(scope="module")
def comparison(tests_dir, tiny_models):
    result = subprocess.run([comfyui_python(), str(tests_dir / "comfyui_reference.py"), COMFYUI_DIR,
                             json.dumps(tiny_models)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip("ComfyUI's requirements are not installed here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["dit_forward", "ksampler_euler", "ksampler_euler_denoise", "vae_decode"])
def test_matches_comfyui(comparison, what):
    assert comparison[what] <= 1e-5, f"{what}: relative error {comparison[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def hunyuan_comparison(tests_dir, tiny_hunyuan):
    result = subprocess.run([comfyui_python(), str(tests_dir / "comfyui_reference_hunyuan.py"), COMFYUI_DIR,
                             json.dumps(tiny_hunyuan)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip("ComfyUI's requirements are not installed here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["hunyuan_dit_forward", "hunyuan_ksampler_euler"])
def test_hunyuan_matches_comfyui(hunyuan_comparison, what):
    """ComfyUI's HunyuanVideo class loads our tiny file (original key layout) through its own key
    conversion; its forward and KSampler (euler, simple, shift 7, embedded guidance 6, cfg 1)
    give our results."""
    assert hunyuan_comparison[what] <= 1e-5, f"{what}: relative error {hunyuan_comparison[what]:.2e} against ComfyUI"

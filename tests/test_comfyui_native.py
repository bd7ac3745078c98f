"""Our files and conventions against ComfyUI's own code (skipped where ComfyUI is absent).

Set COMFYUI_DIR to a ComfyUI checkout, and COMFYUI_PYTHON to a Python with its requirements and this
pack installed (default: the Python running the tests).
ComfyUI's WanModel and WanVAE load our tiny files strictly; its KSampler (euler, simple,
ModelSamplingSD3 shift, the same seed) must give the latent our sampler gives, and its KSamplerAdvanced
the latents of our step range (leftover noise included, mixed with ours either way). The same for
HunyuanVideo (comfyui_reference/hunyuan.py).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from comfyui_server import comfyui_python

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI checkout to compare with")


def run_reference(name: str, argument) -> dict:
    """Run one of the comfyui_reference modules (python -m comfyui_reference NAME) with ComfyUI's Python: its
    JSON of relative errors."""
    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([comfyui_python(), "-m", "comfyui_reference", name, COMFYUI_DIR, json.dumps(argument)],
                            capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip("ComfyUI's requirements are not installed here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def comparison(tiny_models):
    return run_reference("wan21", tiny_models)


@pytest.mark.parametrize("what", ["dit_forward", "ksampler_euler", "ksampler_euler_denoise", "vae_decode",
                                  "advanced_leftover_latent", "advanced_split_usp_usp", "advanced_split_native_usp",
                                  "advanced_split_usp_native", "advanced_end_without_leftover",
                                  "advanced_start_on_empty"])
def test_matches_comfyui(comparison, what):
    assert comparison[what] <= 1e-5, f"{what}: relative error {comparison[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def hunyuan_comparison(tiny_hunyuan):
    return run_reference("hunyuan", tiny_hunyuan)


@pytest.mark.parametrize("what", ["hunyuan_dit_forward", "hunyuan_ksampler_euler"])
def test_hunyuan_matches_comfyui(hunyuan_comparison, what):
    """ComfyUI's HunyuanVideo class loads our tiny file (original key layout) through its own key
    conversion; its forward and KSampler (euler, simple, shift 7, embedded guidance 6, cfg 1)
    give our results."""
    assert hunyuan_comparison[what] <= 1e-5, f"{what}: relative error {hunyuan_comparison[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def wan22_comparison(tmp_path_factory):
    from usp_video.distributed.models.wan22_a14b.tiny import make_tiny_models

    paths = {k: str(v) for k, v in make_tiny_models(tmp_path_factory.mktemp("wan22")).items()}
    return run_reference("wan22", paths)


@pytest.mark.parametrize("what", ["wan22_switch_vs_two_ksampler_advanced", "wan22_two_usp_advanced_vs_two_ksampler_advanced",
                                  "wan22_native_high_usp_low", "wan22_usp_high_native_low",
                                  "wan22_high_leftover_latent"])
def test_wan22_matches_comfyui_two_ksampler_advanced(wan22_comparison, what):
    """ComfyUI's Wan model with each tiny Wan 2.2 expert and two KSamplerAdvanced (euler, split at the
    first step below the boundary) against our one-node switch and our two Advanced samplers."""
    assert 0 < wan22_comparison["k"] < 6
    assert wan22_comparison["wan22_experts_differ"] > 1e-3  # the low-noise expert changed the result
    assert wan22_comparison[what] <= 1e-5, f"{what}: relative error {wan22_comparison[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def ti2v_comparison(tmp_path_factory):
    from usp_video.distributed.models import FAMILIES

    paths = {k: str(v) for k, v in FAMILIES["wan2.2-ti2v-5b"].make_tiny(tmp_path_factory.mktemp("wan22_5b")).items()}
    return run_reference("wan22_5b", paths)


@pytest.mark.parametrize("what", ["ti2v_ksampler_euler", "ti2v_ksampler_euler_denoise"])
def test_ti2v_5b_matches_comfyui(ti2v_comparison, what):
    """ComfyUI's Wan 2.2 model (48-channel latent format) loads our tiny TI2V-5B file; its KSampler
    (euler, simple, shift 5) gives our latent."""
    assert ti2v_comparison[what] <= 1e-5, f"{what}: relative error {ti2v_comparison[what]:.2e} against ComfyUI"


@pytest.mark.parametrize("what", ["ti2v_start_image_ksampler_euler", "ti2v_start_image_batch2_resized"])
def test_ti2v_5b_start_image_matches_comfyui(ti2v_comparison, what):
    """Native Wan22ImageToVideoLatent (a start image through ComfyUI's VAE with our tiny file; batch 2 and an image
    of another size, resized by the node) into native KSampler (euler, cfg 5 / 3), against our sampler given that
    LATENT: its noise_mask as KSamplerX0Inpaint and WAN22.process_timestep apply it (per-frame timesteps)."""
    assert ti2v_comparison[what + "_mask_zeros"] == pytest.approx(1 / 3)  # the first of 3 latent frames is kept
    assert ti2v_comparison[what + "_first_frame_kept"] <= 1e-5
    assert ti2v_comparison[what] <= 1e-5, f"{what}: relative error {ti2v_comparison[what]:.2e} against ComfyUI"


@pytest.mark.parametrize("what", ["fun_control_5b_engine", "fun_control_5b_generic_nodes"])
def test_wan22_fun_control_5b_matches_comfyui(ti2v_comparison, what):
    """Native Wan22FunControlToVideo (ComfyUI's Wan 2.2 VAE: control video, start image, reference image) into
    KSampler on ComfyUI's model of our tiny Fun Control 5B file (148 input channels, ref_conv), against our engine
    and our USP Sampler given the native conditioning."""
    assert ti2v_comparison[what] <= 1e-5, f"{what}: relative error {ti2v_comparison[what]:.2e} against ComfyUI"


def test_wan22_vae_matches_comfyui(ti2v_comparison):
    """ComfyUI's Wan 2.2 VAE (vae2_2.WanVAE at the tiny size) loads our tiny file in its key names and
    decodes to our frames; few of its outputs are clamped, so the clamp hides nothing."""
    assert ti2v_comparison["ti2v_vae_clamped_fraction"] < 0.05
    assert ti2v_comparison["ti2v_vae_decode_max_abs"] <= 1e-4


@pytest.fixture(scope="module")
def vae_encode_comparison(tiny_models, tmp_path_factory):
    from usp_video.distributed.models import FAMILIES

    ti2v = FAMILIES["wan2.2-ti2v-5b"].make_tiny(tmp_path_factory.mktemp("wan22_5b_encode"))
    return run_reference("vae_encode",
                         {"wan21": tiny_models["vae"], "wan22": str(ti2v["vae"])})


@pytest.mark.parametrize("case", ["wan21_9x40x24", "wan21_1x16x32", "wan22_5x48x32"])
def test_vae_encode_matches_comfyuis_vae_encode(vae_encode_comparison, case):
    """ComfyUI's VAE Encode node (comfy.sd.VAE with its WanVAE at the tiny width, our tiny file loaded
    strictly) on the same IMAGE gives our encode's latent."""
    assert vae_encode_comparison[case + "_magnitude"] > 0.1  # a latent worth comparing
    assert vae_encode_comparison[case] <= 1e-4, f"{case}: max abs error {vae_encode_comparison[case]:.2e}"


@pytest.fixture(scope="module")
def fp8_comparison(tiny_models, tmp_path_factory):
    """ComfyUI's own loader and fp8 layers (comfyui_reference/fp8.py) on fp8 files of the tiny Wan DiT."""
    from test_fp8 import write_fp8
    from usp_video.distributed.models.wan21 import dit as wan, tiny

    root = tmp_path_factory.mktemp("fp8_native")
    meta = {wan.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_WAN_CONFIG)}
    files = {"fp8_e4m3fn": write_fp8(tiny_models["dit"], root / "plain.safetensors", meta, False),
             "fp8_scaled": write_fp8(tiny_models["dit"], root / "scaled.safetensors", meta, True)}
    return run_reference("fp8", files)


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_files_match_comfyuis_own_loader(fp8_comparison, storage):
    """The scaled-fp8 rule (weight x scale_weight, the Linear biases rounded to fp8 as ComfyUI's scaled-fp8
    layers do) against ComfyUI's loader and layers; the scaled file must have taken ComfyUI's fp8 path."""
    assert fp8_comparison[storage] <= 1e-5, f"{storage}: relative error {fp8_comparison[storage]:.2e} against ComfyUI"
    if storage == "fp8_scaled":
        assert fp8_comparison["fp8_scaled_comfy_fp8_params"] > 0


@pytest.fixture(scope="module")
def lora_comparison(tmp_path_factory):
    """ComfyUI's UNETLoader + two LoraLoaderModelOnly + KSampler / two KSamplerAdvanced on detectable tiny Wan
    DiTs (comfyui_reference/lora.py), against our engine and our LoRA nodes: one ComfyUI process for all."""
    from comfyui_reference.common import make_detectable_wan
    from comfyui_reference.lora import DITS, LORAS

    return run_reference("lora",
                         make_detectable_wan(tmp_path_factory.mktemp("lora_native"), DITS, LORAS))


@pytest.mark.parametrize("what", ["wan21_no_lora", "wan21_engine", "wan21_nodes", "wan21_engine_after_no_lora",
                                  "wan22_switch_engine", "wan22_two_advanced_engine", "wan22_high_leftover_latent",
                                  "wan22_switch_nodes", "wan22_two_advanced_nodes", "wan21_generic_nodes",
                                  "wan22_switch_generic_nodes", "wan22_two_advanced_generic_nodes"])
def test_loras_match_comfyuis_lora_loader(lora_comparison, what):
    """Two stacked LoRAs (kohya's then a distillation LoRA's: pairs with alpha, diff_b, diff on norms, a 5-D
    patch embedding pair; peft's on one Wan 2.2 expert), strengths 1.0 and 0.6, fp32: ComfyUI's UNETLoader,
    LoraLoaderModelOnly x2 and KSampler (Wan 2.1) or a chain per expert and two KSamplerAdvanced (Wan 2.2 A14B)
    against our engine with SampleRequest.loras and against our USP LoRA nodes feeding our samplers."""
    assert 0 < lora_comparison["wan22_k"] < 4
    for changed in ("wan21_lora_changes_result", "wan22_lora_changes_result", "wan22_low_lora_changes_result"):
        assert lora_comparison[changed] > 0.05, changed  # each chain (the low-noise one too) changes the video
    assert lora_comparison[what] <= 1e-5, f"{what}: relative error {lora_comparison[what]:.2e} against ComfyUI"


def test_lora_modulation_diffs_left_alone_as_comfyui_leaves_them(lora_comparison):
    """ComfyUI 0.3.64 reads a `diff` on Wan's modulation tables but never patches them (its ModelPatcher skips
    parameters of non-leaf modules), while it does patch the norms: lora.py leaves them too, and says so."""
    assert lora_comparison["comfyui_modulation_change"] == 0.0
    assert lora_comparison["comfyui_norm3_change"] > 1e-3
    assert lora_comparison["wan21_modulation_warned"]


@pytest.fixture(scope="module")
def i2v_comparison(tiny_models, tmp_path_factory):
    """ComfyUI's UNETLoader, WanImageToVideo / WanFirstLastFrameToVideo (its VAE Encode) and KSampler /
    KSamplerAdvanced on detectable tiny I2V DiTs (comfyui_reference/i2v.py), against our engine and our samplers:
    one ComfyUI process for all."""
    from comfyui_reference.common import make_detectable_wan
    from comfyui_reference.i2v import DITS, dit_configs

    files = make_detectable_wan(tmp_path_factory.mktemp("i2v_native"), DITS, {}, dit_configs())
    return run_reference("i2v", dict(files, vae=tiny_models["vae"]))


@pytest.mark.parametrize("what", ["wan21_i2v_len5_cfg1_engine", "wan21_i2v_len5_cfg1_nodes",
                                  "wan21_i2v_len9_cfg4_engine", "wan21_i2v_len9_cfg4_nodes",
                                  "wan21_i2v_resized_to_latent_engine", "wan22_i2v_switch_engine",
                                  "wan22_i2v_switch_nodes", "wan22_i2v_two_advanced_nodes", "wan22_flf_switch_engine",
                                  "wan21_i2v_len5_cfg1_generic_nodes", "wan21_i2v_len9_cfg4_generic_nodes",
                                  "wan22_i2v_switch_generic_nodes",
                                  "fun_control_clip_cfg4_engine", "fun_control_clip_cfg4_generic_nodes",
                                  "fun_control_cfg1_engine", "fun_control_cfg1_generic_nodes",
                                  "fun_inp_engine", "fun_inp_generic_nodes", "fun_control_node_concat",
                                  "fun_control_node_generic_nodes", "fun22_reference_engine",
                                  "fun22_reference_generic_nodes", "fun22_no_reference_engine",
                                  "fun22_no_reference_generic_nodes"])
def test_i2v_matches_comfyuis_wan_image_to_video(i2v_comparison, what):
    """Native WanImageToVideo (a start image of another size: its centre-crop resize, VAE Encode; a synthetic
    clip_vision_output for Wan 2.1 I2V) or WanFirstLastFrameToVideo, then KSampler (cfg 1 and 4) or two
    KSamplerAdvanced (Wan 2.2 I2V A14B), fp32: our engine given the tensors those nodes made (also on a latent of
    another size than the start video's: resized to it), and our samplers given the native conditioning. Wan 2.1
    Fun Control (WanFunControlToVideo: control video and start image, with and without CLIP vision) and Fun InP
    (WanFunInpaintToVideo: start and end images, on the I2V layout) the same way; the pack's USP Wan Fun Control
    To Video (our VAE encode) makes native WanFunControlToVideo's conditioning (ComfyUI's VAE) and its video. Wan 2.2
    Fun Control A14B (Wan22FunControlToVideo, with and without a reference image: its tokens in front of the video's)
    across two KSamplerAdvanced, against our expert switch."""
    assert i2v_comparison["wan21_i2v_len5_cfg1_start_frames"] == i2v_comparison["wan21_i2v_len9_cfg4_start_frames"] == 1
    assert i2v_comparison["flf_mask_shape"] == [1, 4, 3, 4, 6]  # the first-last mask per pixel frame, 4 channels
    assert 0 < i2v_comparison["wan22_k"] < 4
    assert i2v_comparison["native_families"] == ["wan2.1", "wan2.1"]  # UNETLoader's WAN21_I2V, WAN21_FunControl2V
    for changed in ("wan21_i2v_clip_vision_changes_result", "wan22_flf_changes_result", "fun_control_changes_result",
                    "fun22_reference_changes_result"):
        assert i2v_comparison[changed] > 1e-2, changed  # the image embedder and the end frame are used
    assert i2v_comparison[what] <= 1e-5, f"{what}: relative error {i2v_comparison[what]:.2e} against ComfyUI"


@pytest.fixture(scope="module")
def vace_comparison(tiny_vace):
    """ComfyUI's UNETLoader, WanVaceToVideo (its VAE Encode), KSampler and TrimVideoLatent on the tiny VACE set
    (comfyui_reference/vace.py), against our engine and our generic sampler: one ComfyUI process for all."""
    return run_reference("vace", tiny_vace)


@pytest.mark.parametrize("what", ["reference_control_engine", "reference_control_generic_nodes",
                                  "reference_control_trimmed", "stacked_engine", "stacked_generic_nodes",
                                  "stacked_trimmed", "single_engine", "text_only_engine", "node_generic_nodes"])
def test_vace_matches_comfyuis_wan_vace_to_video(vace_comparison, what):
    """Native WanVaceToVideo (a control video shorter than the video and of another size, a mask, a reference image:
    trim_latent 1; or two nodes stacked at strengths 1 and 0.6), then KSampler (euler, cfg 4 / 1) and TrimVideoLatent,
    fp32: our engine given the stacked tensors, our generic sampler given the native lists, TrimVideoLatent on our
    LATENT. UNETLoader detects our tiny file as WAN21_Vace, which our native-MODEL path takes as Wan 2.1 VACE."""
    assert vace_comparison["comfy_model_config"] == "WAN21_Vace" and vace_comparison["native_family"] == "wan2.1-vace"
    assert vace_comparison["comfy_vace_blocks"] == 2 and vace_comparison["comfy_vace_mapping"] == [0, 2]
    assert vace_comparison["reference_trim"] == 1 and vace_comparison["stacked_count"] == 2
    assert vace_comparison["reference_control_trimmed_frames"] == [4, 3]
    assert vace_comparison["second_context_changes_result"] > 1e-2  # the second context is used
    # the pack's USP Wan VACE To Video (our VAE encode) makes WanVaceToVideo's conditioning (ComfyUI's VAE)
    assert vace_comparison["node_trim"] == [1, 1] and vace_comparison["node_mask_equal"]
    assert vace_comparison["node_strength"] == [[0.8], [0.8]] and vace_comparison["node_frames"] <= 1e-5
    assert vace_comparison[what] <= 1e-5, f"{what}: relative error {vace_comparison[what]:.2e} against ComfyUI"


def test_vace_start_image_is_wanvacetovideos_control(vace_comparison):
    """The command line's start image for a VACE model (generate --image) is what WanVaceToVideo makes of that image
    as its control video with a mask keeping its frame (resize, gray padding, the inactive / reactive split, the
    mask's 8x8 layout and time sampling); the latents through our VAE encode (== ComfyUI's VAE Encode, 1e-4)."""
    assert vace_comparison["start_image_mask_equal"]
    assert vace_comparison["start_image_frames_magnitude"] > 0.1
    assert vace_comparison["start_image_frames_max_abs"] <= 1e-4


def test_shipped_vace_workflows_fit_comfyuis_own_nodes(vace_comparison):
    """The shipped VACE workflows' native nodes (TrimVideoLatent, LoadVideo, GetVideoComponents, LoadImage) as
    ComfyUI 0.3.64 defines them: every input linked or set is one of theirs, every output type in their order.
    (The workflows run on the tiny set in test_previous_release.)"""
    from usp_video.workflows import make_workflows
    from usp_video.workflows.vace_workflows import vace_workflows

    schemas = vace_comparison["native_schemas"]
    for name, graph in vace_workflows(make_workflows.WAN_T2V).items():
        for node_id, (class_type, _, widgets, links, outputs, _) in graph.items():
            if class_type not in schemas:
                assert class_type.startswith("Usp") or class_type == "SaveAnimatedWEBP", class_type
                continue
            widget_names = [w for w in make_workflows.WIDGETS[class_type] if w != "upload"]
            assert set(links) | set(widget_names) <= set(schemas[class_type]["inputs"]), (name, class_type)
            assert [t for _, t in outputs] == schemas[class_type]["outputs"], (name, class_type)

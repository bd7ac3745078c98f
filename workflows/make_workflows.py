"""Writes the shipped workflows from one definition, in both formats:

    wan21_t2v_usp.json                   UI format (drag into the ComfyUI page / template browser)
    api/wan21_t2v_usp_api.json           API format (POST /prompt, `usp-video queue`)
    NAME.jpg                             the template browser's card picture: title, description, graph

for every workflow of WORKFLOWS; what each one is: its card in cards.py (CARDS).

The API files live in api/: ComfyUI lists every .json directly in workflows/ in its template browser,
where an API-format file cannot open.

Run `python -m usp_video.workflows.make_workflows` after changing a node's inputs; a test checks
that the UI file's widget values convert to exactly the API file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cards import CARDS, card_picture
from .control_workflows import CONTROL_SIZES, CONTROL_SOCKETS, CONTROL_WIDGETS, control_workflows
from .hv15_workflows import SIZES as HV15_SIZES, SOCKETS as HV15_SOCKETS, WIDGETS as HV15_WIDGETS, hv15_workflows
from .vace_workflows import NATIVE_OPTIONAL, VACE_SIZES, VACE_SOCKETS, VACE_WIDGETS, vace_workflows

HERE = Path(__file__).parent
API_DIR = HERE / "api"

NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
            "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
            "杂乱的背景，三条腿，背景人很多，倒着走")

# id: (class_type, title, widget values in widget order, {input: (src_id, slot)}, outputs [(name, type)], pos)
WAN_T2V = {
    1: ("UspGroup", "USP Group", ["auto", "all", 2, "auto", "auto", "auto", "auto", 600, "off", "auto", "on", "offload", "off",
                                 "off", "off", 300], {},
        [("group", "USP_GROUP"), ("info", "STRING")], (40, 60)),
    2: ("UspLoadDiffusionModel", None, ["wan2.1_t2v_1.3B_fp16.safetensors", "none"], {"group": (1, 0)},
        [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
    3: ("UspLoadTextEncoder", None, ["umt5_xxl_fp16.safetensors", "none", ""], {"group": (1, 0)},
        [("text_encoder", "USP_TEXT_ENCODER")], (440, 240)),
    4: ("UspTextEncode", "Positive prompt",
        ["A red fox trots through fresh snow in a birch forest at sunrise, cinematic, soft light"],
        {"text_encoder": (3, 0)}, [("CONDITIONING", "CONDITIONING")], (1040, 60)),
    5: ("UspTextEncode", "Negative prompt", [NEGATIVE], {"text_encoder": (3, 0)},
        [("CONDITIONING", "CONDITIONING")], (1040, 300)),
    6: ("EmptyHunyuanLatentVideo", None, [832, 480, 33, 1], {}, [("LATENT", "LATENT")], (1040, 540)),
    7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 8.0, 0.0, 0.0],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    8: ("UspVaeLoader", None, ["wan_2.1_vae.safetensors"], {"group": (1, 0)}, [("vae", "USP_VAE")], (1460, 760)),
    9: ("UspVaeDecode", None, [], {"vae": (8, 0), "samples": (7, 0)}, [("IMAGE", "IMAGE")], (1900, 60)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/wan21", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
}

HUNYUAN_T2V = {
    1: ("UspGroup", "USP Group", ["auto", "all", 2, "auto", "auto", "auto", "auto", 600, "off", "auto", "on", "offload", "off",
                                 "off", "off", 300], {},
        [("group", "USP_GROUP"), ("info", "STRING")], (40, 60)),
    2: ("UspLoadDiffusionModel", None, ["hunyuan_video_t2v_720p_bf16.safetensors", "none"], {"group": (1, 0)},
        [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
    3: ("UspLoadTextEncoder", None, ["llava_llama3_fp8_scaled.safetensors", "clip_l.safetensors", ""],
        {"group": (1, 0)}, [("text_encoder", "USP_TEXT_ENCODER")], (440, 240)),
    4: ("UspTextEncode", "Positive prompt",
        ["A red fox trots through fresh snow in a birch forest at sunrise, cinematic, soft light"],
        {"text_encoder": (3, 0)}, [("CONDITIONING", "CONDITIONING")], (1040, 60)),
    5: ("UspTextEncode", "Negative prompt (used when cfg > 1)", [""], {"text_encoder": (3, 0)},
        [("CONDITIONING", "CONDITIONING")], (1040, 300)),
    6: ("EmptyHunyuanLatentVideo", None, [848, 480, 73, 1], {}, [("LATENT", "LATENT")], (1040, 540)),
    7: ("UspSampler", None, [42, "fixed", 30, 1.0, "euler", 1.0, 7.0, 0.0, 0.0],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    8: ("UspVaeLoader", None, ["hunyuan_video_vae_bf16.safetensors"], {"group": (1, 0)}, [("vae", "USP_VAE")],
        (1460, 760)),
    9: ("UspVaeDecode", None, [], {"vae": (8, 0), "samples": (7, 0)}, [("IMAGE", "IMAGE")], (1900, 60)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/hunyuan", 24.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
}

def _wan22(sampling: dict) -> dict:
    """Wan 2.2 A14B text-to-video: the Wan graph with both experts loaded, and `sampling` (nodes 7, 11)."""
    graph = {k: v for k, v in WAN_T2V.items() if k != 7}
    graph[2] = ("UspLoadDiffusionModel", None, ["wan2.2_t2v_high_noise_14B_fp16.safetensors",
                                                "wan2.2_t2v_low_noise_14B_fp16.safetensors"], {"group": (1, 0)},
                [("model", "USP_MODEL"), ("info", "STRING")], (440, 60))
    graph[6] = ("EmptyHunyuanLatentVideo", None, [832, 480, 81, 1], {}, [("LATENT", "LATENT")], (1040, 540))
    graph[10] = ("SaveAnimatedWEBP", None, ["usp_video/wan22", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
                 (1900, 240))
    graph.update(sampling)
    return dict(sorted(graph.items()))


# One node switches expert at the boundary (Wan 2.2's T2V config: 40 steps, shift 12, cfg 4 / 3, UniPC).
WAN22_T2V = _wan22({
    7: ("UspSampler", None, [42, "fixed", 40, 4.0, "unipc", 1.0, 12.0, 3.0, 0.875],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
})

# ComfyUI's own layout, two samplers: the high-noise expert runs steps 0..11 and hands its latent with
# the leftover noise to the low-noise expert. With 20 steps and shift 8, step 11 is the first whose sigma
# is below 0.875, so with euler this equals the one-node switch at boundary 0.875.
WAN22_TWO_SAMPLERS = _wan22({
    7: ("UspSamplerAdvanced", "High-noise steps (0 to 11)",
        ["enable", 42, "fixed", 20, 3.5, "euler", 0, 11, "enable", 8.0, "high_noise", 0.0, 0.0],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    11: ("UspSamplerAdvanced", "Low-noise steps (11 to the end)",
         ["disable", 42, "fixed", 20, 3.5, "euler", 11, 10000, "disable", 8.0, "low_noise", 0.0, 0.0],
         {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (7, 0)},
         [("LATENT", "LATENT")], (1460, 620)),
})
WAN22_TWO_SAMPLERS[8] = ("UspVaeLoader", None, ["wan_2.1_vae.safetensors"], {"group": (1, 0)}, [("vae", "USP_VAE")],
                         (1900, 200))
WAN22_TWO_SAMPLERS[9] = ("UspVaeDecode", None, [], {"vae": (8, 0), "samples": (11, 0)}, [("IMAGE", "IMAGE")],
                         (1900, 60))
WAN22_TWO_SAMPLERS[10] = ("SaveAnimatedWEBP", None, ["usp_video/wan22", 16.0, False, 90, "default"],
                          {"images": (9, 0)}, [], (2320, 60))

# Wan 2.2 TI2V-5B, text to video at 1280x704, 121 frames, 24 fps, with the Wan 2.2 VAE.
WAN22_5B = {k: v for k, v in WAN_T2V.items()}
WAN22_5B.update({
    2: ("UspLoadDiffusionModel", None, ["wan2.2_ti2v_5B_fp16.safetensors", "none"], {"group": (1, 0)},
        [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
    6: ("UspWan22ImageToVideoLatent", None, [1280, 704, 121, 1], {"vae": (8, 0)}, [("latent", "LATENT")],
        (1040, 540)),
    7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 5.0, 0.0, 0.0],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    8: ("UspVaeLoader", None, ["wan2.2_vae.safetensors"], {"group": (1, 0)}, [("vae", "USP_VAE")], (1460, 760)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/wan22_5b", 24.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
})

# Wan 2.1 14B with a step-distillation LoRA (lightx2v's, the 2026 default for fast Wan): 4 steps at cfg 1, where
# ComfyUI's own CFG split across GPUs has nothing to split and sequence parallelism does the work.
WAN_T2V_LORA = {k: v for k, v in WAN_T2V.items()}
WAN_T2V_LORA.update({
    2: ("UspLoadDiffusionModel", None, ["wan2.1_t2v_14B_fp16.safetensors", "none"], {"group": (1, 0)},
        [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
    5: ("UspTextEncode", "Negative prompt (unused at cfg 1)", [NEGATIVE], {"text_encoder": (3, 0)},
        [("CONDITIONING", "CONDITIONING")], (1040, 300)),
    7: ("UspSampler", None, [42, "fixed", 4, 1.0, "euler", 1.0, 8.0, 0.0, 0.0],
        {"model": (11, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/wan21_lora", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
    11: ("UspLoraLoader", None, ["Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", 1.0, "all"],
         {"model": (2, 0)}, [("model", "USP_MODEL")], (440, 420)),
})

# Wan 2.1 image to video (480p I2V 14B): the start image through native LoadImage and CLIP vision, the pack's
# image-to-video node (the start video encoded by the group's split VAE encode), the Wan sampler.
WAN_I2V = {k: v for k, v in WAN_T2V.items() if k != 6}
WAN_I2V.update({
    2: ("UspLoadDiffusionModel", None, ["wan2.1_i2v_480p_14B_fp16.safetensors", "none"], {"group": (1, 0)},
        [("model", "USP_MODEL"), ("info", "STRING")], (440, 60)),
    4: ("UspTextEncode", "Positive prompt",
        ["The fox turns its head toward the camera and trots away through the snow, soft morning light"],
        {"text_encoder": (3, 0)}, [("CONDITIONING", "CONDITIONING")], (1040, 60)),
    7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 5.0, 0.0, 0.0],
        {"model": (2, 0), "positive": (15, 0), "negative": (15, 1), "latent_image": (15, 2)},
        [("LATENT", "LATENT")], (1460, 60)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/wan21_i2v", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
    12: ("LoadImage", "Start image", ["example.png", "image"], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
         (40, 660)),
    13: ("CLIPVisionLoader", None, ["clip_vision_h.safetensors"], {}, [("CLIP_VISION", "CLIP_VISION")], (440, 420)),
    14: ("CLIPVisionEncode", None, ["none"], {"clip_vision": (13, 0), "image": (12, 0)},
         [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], (440, 560)),
    15: ("UspWanImageToVideo", None, [832, 480, 81, 1],
         {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), "start_image": (12, 0), "clip_vision_output": (14, 0)},
         [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")], (1040, 560)),
})

# Wan 2.2 I2V A14B from a start image: both I2V experts, the start video through the pack's image-to-video node
# (no CLIP vision: Wan 2.2 I2V takes none), the switch sampler with Wan 2.2's I2V config (40 steps, shift 5,
# cfg 3.5 / 3.5, boundary 0.900).
WAN22_I2V = {k: v for k, v in _wan22({
    7: ("UspSampler", None, [42, "fixed", 40, 3.5, "unipc", 1.0, 5.0, 3.5, 0.9],
        {"model": (2, 0), "positive": (15, 0), "negative": (15, 1), "latent_image": (15, 2)},
        [("LATENT", "LATENT")], (1460, 60)),
}).items() if k != 6}
WAN22_I2V[2] = ("UspLoadDiffusionModel", None, ["wan2.2_i2v_high_noise_14B_fp16.safetensors",
                                                "wan2.2_i2v_low_noise_14B_fp16.safetensors"], {"group": (1, 0)},
                WAN22_I2V[2][4], (440, 60))
WAN22_I2V[4] = WAN_I2V[4]
WAN22_I2V[10] = ("SaveAnimatedWEBP", None, ["usp_video/wan22_i2v", 16.0, False, 90, "default"], {"images": (9, 0)}, [],
                 (1900, 240))
WAN22_I2V[12] = WAN_I2V[12]
WAN22_I2V[15] = ("UspWanImageToVideo", None, [832, 480, 81, 1],
                 {"positive": (4, 0), "negative": (5, 0), "vae": (8, 0), "start_image": (12, 0)},
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")], (1040, 560))

# Wan 2.2 TI2V-5B from a start image: the pack's Wan 2.2 image-to-video latent (start frame and noise_mask).
WAN22_5B_I2V = {k: v for k, v in WAN22_5B.items() if k != 6}
WAN22_5B_I2V.update({
    4: WAN_I2V[4],
    7: ("UspSampler", None, [42, "fixed", 30, 5.0, "unipc", 1.0, 5.0, 0.0, 0.0],
        {"model": (2, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (16, 0)},
        [("LATENT", "LATENT")], (1460, 60)),
    10: ("SaveAnimatedWEBP", None, ["usp_video/wan22_5b_i2v", 24.0, False, 90, "default"], {"images": (9, 0)}, [],
         (1900, 240)),
    12: WAN_I2V[12],
    16: ("UspWan22ImageToVideoLatent", None, [1280, 704, 121, 1], {"vae": (8, 0), "start_image": (12, 0)},
         [("latent", "LATENT")], (1040, 560)),
})

# Wan 2.1 VACE: its graphs and its nodes' sockets, sizes and widgets (vace_workflows.py)
VACE_WORKFLOWS = vace_workflows(WAN_T2V)

WORKFLOWS = {"wan21_t2v_usp": WAN_T2V, "wan21_t2v_lora_usp": WAN_T2V_LORA, "wan21_i2v_usp": WAN_I2V,
             "wan22_i2v_usp": WAN22_I2V, "wan22_ti2v_5b_i2v_usp": WAN22_5B_I2V, "wan22_ti2v_5b_usp": WAN22_5B, "hunyuan_video_t2v_usp": HUNYUAN_T2V, "wan22_t2v_usp": WAN22_T2V,
             "wan22_t2v_usp_two_samplers": WAN22_TWO_SAMPLERS, **control_workflows(WAN_T2V, WAN_I2V),
             **VACE_WORKFLOWS, **hv15_workflows(WAN_T2V)}

# Socket inputs in slot order, for the UI format (widget inputs are not listed there).
_SAMPLER_SOCKETS = [("model", "USP_MODEL,MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                    ("latent_image", "LATENT"), ("group", "USP_GROUP"), ("step_cache", "USP_STEP_CACHE")]
SOCKETS = {
    "UspLoadDiffusionModel": [("group", "USP_GROUP")], "UspLoadTextEncoder": [("group", "USP_GROUP")],
    "UspTextEncode": [("text_encoder", "USP_TEXT_ENCODER")],
    "UspSampler": _SAMPLER_SOCKETS, "UspSamplerAdvanced": _SAMPLER_SOCKETS,
    "UspVaeLoader": [("group", "USP_GROUP")], "UspVaeDecode": [("vae", "USP_VAE"), ("samples", "LATENT")],
    "UspLoraLoader": [("model", "USP_MODEL")],
    "CLIPVisionEncode": [("clip_vision", "CLIP_VISION"), ("image", "IMAGE")],
    "UspWan22ImageToVideoLatent": [("vae", "USP_VAE"), ("start_image", "IMAGE")],
    "UspWanImageToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "USP_VAE"),
                           ("start_image", "IMAGE"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
    "SaveAnimatedWEBP": [("images", "IMAGE")], **VACE_SOCKETS, **CONTROL_SOCKETS, **HV15_SOCKETS,
}

# Node sizes: wide enough that no label or value is cut short with the default model names (checked in
# the page by tests/test_browser.py); USP Group leaves room for its state box (web/js/usp_status.js).
SIZES = {"UspGroup": (360, 540), "UspLoadDiffusionModel": (560, 120), "UspLoadTextEncoder": (440, 150),
         "UspVaeLoader": (400, 90), "UspTextEncode": (380, 200), "UspSampler": (340, 400),
         "UspSamplerAdvanced": (340, 500), "UspLoraLoader": (590, 130),
         "SaveAnimatedWEBP": (400, 460), "EmptyHunyuanLatentVideo": (340, 170), "UspVaeDecode": (300, 80),
         "LoadImage": (340, 340), "CLIPVisionLoader": (420, 90),
         "CLIPVisionEncode": (380, 90), "UspWanImageToVideo": (380, 250), "UspWan22ImageToVideoLatent": (380, 200),
         **VACE_SIZES, **CONTROL_SIZES, **HV15_SIZES}

# Widget names in order, for converting to API format (ours are checked against the nodes' schemas in a test).
WIDGETS = {
    "UspGroup": ["device", "gpus", "cpu_ranks", "ulysses", "ring", "attention", "dtype", "timeout_s", "cfg_parallel",
                 "shard_weights", "vae_split", "placement", "dit_offload", "compile", "fp8_compute", "max_step_s"],
    "UspLoadDiffusionModel": ["model_name", "low_noise_model_name"],
    "UspLoadTextEncoder": ["text_encoder_name", "clip_name", "tokenizer_folder"], "UspTextEncode": ["text"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
    "UspSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "denoise", "shift",
                   "cfg_low_noise", "boundary"],
    "UspSamplerAdvanced": ["add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                           "start_at_step", "end_at_step", "return_with_leftover_noise", "shift", "expert",
                           "cfg_low_noise", "boundary"],
    "UspVaeLoader": ["vae_name"], "UspVaeDecode": [], "UspLoraLoader": ["lora_name", "strength", "expert"],
    "LoadImage": ["image", "upload"], "CLIPVisionLoader": ["clip_name"], "CLIPVisionEncode": ["crop"],
    "UspWanImageToVideo": ["width", "height", "length", "batch_size"],
    "UspWan22ImageToVideoLatent": ["width", "height", "length", "batch_size"],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"], **VACE_WIDGETS,
    **CONTROL_WIDGETS, **HV15_WIDGETS,
}




def to_api(graph: dict) -> dict:
    prompt = {}
    for node_id, (class_type, title, widgets, links, _, _) in graph.items():
        names = [n for n in WIDGETS[class_type]]
        inputs = {name: value for name, value in zip(names, widgets) if name not in ("control_after_generate", "upload")}
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        entry = {"class_type": class_type, "inputs": inputs}
        if title:
            entry["_meta"] = {"title": title}
        prompt[str(node_id)] = entry
    return prompt


def to_ui(graph: dict) -> dict:
    links, nodes, link_id = [], [], 0
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for node_id, (class_type, _, _, node_links, outputs, _) in graph.items():
        for name, (src, slot) in node_links.items():
            link_id += 1
            to_slot = [n for n, _ in SOCKETS[class_type]].index(name)
            link_type = graph[src][4][slot][1]
            links.append([link_id, src, slot, node_id, to_slot, link_type])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(node_id, name)] = link_id
    for order, (node_id, (class_type, title, widgets, _, outputs, pos)) in enumerate(graph.items()):
        node = {
            "id": node_id, "type": class_type, "pos": list(pos), "size": list(SIZES.get(class_type, (340, 120))),
            "flags": {}, "order": order,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": in_links.get((node_id, n)),
                        **({"widget": {"name": n}} if n in WIDGETS.get(class_type, ()) else {})}
                       for n, t in SOCKETS.get(class_type, [])],
            "outputs": [{"name": n, "type": t, "links": out_links.get((node_id, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        nodes.append(node)
    return {"last_node_id": max(graph), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    from usp_video.nodes import NODE_CLASSES

    missing = sorted(set(WORKFLOWS) - set(CARDS))
    if missing:
        raise SystemExit(f"no template card (title, description) in workflows/cards.py CARDS for: {missing}")
    titles = {node_id: cls.GET_SCHEMA().display_name for node_id, cls in NODE_CLASSES.items()}
    for name, graph in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=2, ensure_ascii=False) + "\n")
        (API_DIR / f"{name}_api.json").write_text(json.dumps(to_api(graph), indent=2, ensure_ascii=False) + "\n")
        card_picture(graph, CARDS[name], titles, SIZES, (340, 120)).save(HERE / f"{name}.jpg", quality=88)


if __name__ == "__main__":
    main()

"""The template browser's cards: a title and a one-line description for each shipped workflow, drawn on its
picture (NAME.jpg beside NAME.json) above the graph.

Why on the picture: ComfyUI's /workflow_templates answers a custom pack's templates as bare file names, and the
frontend (the bundled 1.27 and comfyui-frontend-package 1.58) makes a custom template's card title from that
name and its description from the same name with "_" and "-" turned into spaces; only core templates read an
index.json with titles. The file names stay short and stable (the CLI, the README and saved prompts name
them); the picture carries the words.
"""

from __future__ import annotations

CARDS: dict[str, tuple[str, str]] = {
    "wan21_t2v_usp": ("Wan 2.1 text to video", "T2V 1.3B / 14B, the sampling split over the GPUs"),
    "wan21_t2v_lora_usp": ("Wan 2.1 with a LoRA, 4 steps", "T2V 14B + step-distillation LoRA at cfg 1"),
    "wan21_i2v_usp": ("Wan 2.1 image to video", "I2V 14B from a start image, CLIP vision features"),
    "wan21_fun_control_usp": ("Wan 2.1 Fun Control", "a control video (pose, depth, edges) + a start image"),
    "wan21_vace_r2v_usp": ("Wan 2.1 VACE reference to video", "VACE 14B: a subject from a reference image"),
    "wan21_vace_control_usp": ("Wan 2.1 VACE control video", "VACE 14B following a control video"),
    "wan22_t2v_usp": ("Wan 2.2 A14B text to video", "two experts, one sampler switching at the boundary"),
    "wan22_t2v_usp_two_samplers": ("Wan 2.2 A14B, two samplers", "ComfyUI's two-sampler layout, one per expert"),
    "wan22_i2v_usp": ("Wan 2.2 A14B image to video", "I2V experts from a start image"),
    "wan22_ti2v_5b_usp": ("Wan 2.2 TI2V-5B text to video", "the 5B at 720p, its own latent and VAE"),
    "wan22_ti2v_5b_i2v_usp": ("Wan 2.2 TI2V-5B image to video", "the 5B from a start image (noise-masked latent)"),
    "wan22_animate_usp": ("Wan 2.2 Animate", "a character image moved by a pose and a face video"),
    "hunyuan_video_t2v_usp": ("HunyuanVideo text to video", "13B, joint video and text attention"),
    "hunyuan_video15_t2v_usp": ("HunyuanVideo 1.5 text to video", "8.3B at 480p, Qwen2.5-VL + ByT5 text"),
    "hunyuan_video15_i2v_usp": ("HunyuanVideo 1.5 image to video", "480p I2V from a start image, SigLIP features"),
    "hunyuan_video15_i2v_step_distilled_usp": ("HunyuanVideo 1.5 I2V, 8 steps",
                                               "the step-distilled 480p I2V at cfg 1"),
}

BAND = 64  # the picture's title band, in pixels of a 640 x 360 picture


def card_picture(graph: dict, card: tuple[str, str], titles: dict[str, str], sizes: dict, default_size: tuple,
                 size: tuple[int, int] = (640, 360)):
    """The card's picture: the title and description in a band on top, the graph below it as its boxes and
    links, at the positions and sizes of the UI file, each box named as in the page."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, (32, 32, 32))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size[0], BAND], fill=(30, 48, 74))
    for text, (y, font_size, colour) in zip(card, [(8, 24, (240, 240, 240)), (40, 15, (190, 205, 225))]):
        font = ImageFont.load_default(size=font_size)
        if draw.textlength(text, font=font) > size[0] - 28:
            raise ValueError(f"the card text {text!r} is wider than the {size[0]} px picture: shorten it")
        draw.text((14, y), text, fill=colour, font=font)
    _draw_graph(draw, graph, titles, sizes, default_size, (0, BAND, size[0], size[1]))
    return image


def _draw_graph(draw, graph: dict, titles: dict[str, str], sizes: dict, default_size: tuple, area: tuple) -> None:
    from PIL import ImageFont

    boxes = {node_id: (*pos, pos[0] + sizes.get(class_type, default_size)[0],
                       pos[1] + sizes.get(class_type, default_size)[1])
             for node_id, (class_type, _, _, _, _, pos) in graph.items()}
    left, top = min(b[0] for b in boxes.values()) - 20, min(b[1] for b in boxes.values()) - 20
    right, bottom = max(b[2] for b in boxes.values()) + 20, max(b[3] for b in boxes.values()) + 20
    width, height = area[2] - area[0], area[3] - area[1]
    scale = min(width / (right - left), height / (bottom - top))
    offset = (area[0] + (width - (right - left) * scale) / 2, area[1] + (height - (bottom - top) * scale) / 2)

    def at(x: float, y: float) -> tuple[float, float]:
        return offset[0] + (x - left) * scale, offset[1] + (y - top) * scale

    font = ImageFont.load_default(size=max(9, round(15 * scale * 1.6)))
    for node_id, (_, _, _, links, _, _) in graph.items():
        for slot_index, (src, slot) in enumerate(links.values()):
            x0, y0 = at(boxes[src][2], boxes[src][1] + 40 + 20 * slot)
            x1, y1 = at(boxes[node_id][0], boxes[node_id][1] + 40 + 20 * slot_index)
            draw.line([(x0, y0), ((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), (x1, y1)], fill=(150, 170, 110), width=2)
    for node_id, (class_type, title, _, _, _, _) in graph.items():
        x0, y0 = at(*boxes[node_id][:2])
        x1, y1 = at(*boxes[node_id][2:])
        ours = class_type.startswith("Usp")
        draw.rounded_rectangle([x0, y0, x1, y1], radius=6, fill=(53, 53, 53), outline=(90, 140, 200) if ours else (80, 80, 80), width=2)
        draw.rounded_rectangle([x0, y0, x1, y0 + 26 * scale * 1.6], radius=6, fill=(40, 60, 90) if ours else (45, 45, 45))
        name = title or titles.get(class_type, class_type)
        while len(name) > 4 and draw.textlength(name, font=font) > x1 - x0 - 10:
            name = name[:-2].rstrip() + "…"
        draw.text((x0 + 6, y0 + 4 * scale), name, fill=(225, 225, 225), font=font)

"""A small executor of API-format prompts, for tests where ComfyUI is absent.

It runs nodes in dependency order like ComfyUI does (inputs are either literals or
[node_id, output_slot] links; the hidden inputs - UNIQUE_ID, PROMPT - are set on a class clone
as ComfyUI's V3 execution sets them) and caches nothing. The two native nodes the shipped
workflow uses are stood in for with ComfyUI's semantics.

`call(node type, **inputs)` runs one of the pack's nodes the same way and returns its outputs.
"""

from pathlib import Path

import torch

from usp_video.nodes import NODE_CLASSES


class EmptyHunyuanLatentVideo:  # comfy_extras/nodes_hunyuan.py
    FUNCTION = "generate"

    def generate(self, width, height, length, batch_size=1):
        latent = torch.zeros([batch_size, 16, ((length - 1) // 4) + 1, height // 8, width // 8])
        return ({"samples": latent},)


class SaveAnimatedWEBP:  # nodes_images.py: writes <output>/<prefix>_00001_.webp
    FUNCTION = "save_images"
    output_dir = Path(".")

    def save_images(self, images, fps, filename_prefix, lossless, quality, method):
        from PIL import Image

        frames = [Image.fromarray((255.0 * i.numpy()).clip(0, 255).astype("uint8")) for i in images]
        path = self.output_dir / f"{filename_prefix}_00001_.webp"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(path, save_all=True, duration=int(1000.0 / fps), append_images=frames[1:],
                       lossless=lossless, quality=quality)
        return {"ui": {"images": [{"filename": path.name}]}, "result": (images,)}


NATIVE = {"EmptyHunyuanLatentVideo": EmptyHunyuanLatentVideo, "SaveAnimatedWEBP": SaveAnimatedWEBP}


def execute(prompt: dict, output_dir: Path | None = None) -> dict:
    """Run every node of an API-format prompt; returns {node_id: outputs tuple}."""
    results: dict[str, tuple] = {}

    def run(node_id: str):
        if node_id in results:
            return results[node_id]
        node = prompt[node_id]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = run(value[0])[value[1]]
            else:
                kwargs[name] = value
        if node["class_type"] in NODE_CLASSES:
            out = call(node["class_type"], node_id=node_id, prompt=prompt, **kwargs)
        else:
            instance = NATIVE[node["class_type"]]()
            if output_dir is not None and hasattr(instance, "output_dir"):
                instance.output_dir = output_dir
            out = getattr(instance, instance.FUNCTION)(**kwargs)
        results[node_id] = out["result"] if isinstance(out, dict) else out
        return results[node_id]

    for node_id in prompt:
        run(node_id)
    return results


def call(class_type: str, node_id: str = "1", prompt: dict | None = None, dynprompt=None, **inputs) -> tuple:
    """Run the pack's node `class_type` (a V3 node) on these inputs, its hidden inputs set as ComfyUI sets them;
    returns its outputs (a tuple)."""
    cls = NODE_CLASSES[class_type].PREPARE_CLASS_CLONE({"UNIQUE_ID": node_id, "PROMPT": prompt,
                                                         "DYNPROMPT": dynprompt})
    return tuple(cls.EXECUTE_NORMALIZED(**inputs).args)

"""A small executor of API-format prompts, for tests where ComfyUI is absent.

It runs nodes in dependency order like ComfyUI does (inputs are either literals or
[node_id, output_slot] links; hidden UNIQUE_ID is passed as node_id) and caches nothing.
The two native nodes the shipped workflow uses are stood in for with ComfyUI's semantics.
"""

from pathlib import Path

import torch

from usp_video.nodes import NODE_CLASS_MAPPINGS


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
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"]) or NATIVE[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = run(value[0])[value[1]]
            else:
                kwargs[name] = value
        hidden = getattr(cls, "INPUT_TYPES", lambda: {})().get("hidden", {})
        if "node_id" in hidden:
            kwargs["node_id"] = node_id
        instance = cls()
        if output_dir is not None and hasattr(instance, "output_dir"):
            instance.output_dir = output_dir
        out = getattr(instance, cls.FUNCTION)(**kwargs)
        results[node_id] = out["result"] if isinstance(out, dict) else out
        return results[node_id]

    for node_id in prompt:
        run(node_id)
    return results

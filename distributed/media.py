"""What the command line writes: a video as an animated image (write_video) and a latent in ComfyUI's
SaveLatent format (save_latent). Used by the generate pipeline (generate.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_video(frames: torch.Tensor, path: Path, fps: float) -> Path:
    """IMAGE frames [T, H, W, 3] in 0..1 -> animated WebP or GIF."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in (".webp", ".gif"):
        raise ValueError(f"--out {path.name}: supported video formats are .webp and .gif")
    images = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"lossless": False, "quality": 90} if path.suffix.lower() == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, **extra)
    return path


def save_latent(latent: torch.Tensor, path: Path) -> None:
    """The format of ComfyUI's SaveLatent / LoadLatent nodes."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))

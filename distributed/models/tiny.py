"""What the families' tiny random model sets share (for the demo and the tests; nothing is downloaded).

Each family package writes its own set (its tiny.py, FAMILY.make_tiny) in ComfyUI's models/ layout,
with the real architectures shrunk and the real on-disk formats, so that the tiny files load through
exactly the code that loads real checkpoints. `make_all(root)` writes every family's set.
"""

from __future__ import annotations

from pathlib import Path


# The text the tiny tokenizers are trained on (prompts like the demo's and the tests').
CORPUS = """a cat walks on the beach at sunset, waves roll in slowly
a red car drives through a city street at night with neon lights
a dog runs across a green field, camera follows, cinematic lighting
slow motion shot of a hummingbird drinking from a flower
an astronaut rides a horse on the moon, earth in the background
timelapse of clouds over snowy mountains, high quality, detailed
bright colors, overexposed, static, blurred details, subtitles, worst quality, low quality
a bowl of fruit on a wooden table, soft light from a window
""".splitlines()



def make_all(root: str | Path) -> dict[str, dict[str, Path]]:
    """Every family's tiny set under root: {family name: {"dit", "vae", text inputs...: path}}."""
    from . import FAMILIES

    return {name: family.make_tiny(root) for name, family in FAMILIES.items()}

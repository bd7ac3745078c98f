"""Wan 2.2 A14B text-to-video: two experts of the Wan 2.1 14B architecture, the high-noise one for the
steps whose sigma is at or above the boundary, the low-noise one below it (official T2V config: boundary
0.875, shift 12, guidance 4.0 / 3.0, 40 steps, UniPC). The Wan 2.1 VAE and UMT5 text encoder.

Everything that runs is the Wan 2.1 package's (dit, umt5, vae); what this family adds is knowing its
files: an expert's tensors equal a Wan 2.1 14B file's and the other expert's, so the family never claims
a file on its own (claims_files) and tells the experts apart by the loader's slots and their names
(experts.py). Its tiny set is tiny.py.
"""

from __future__ import annotations

from pathlib import Path

from ...formats.checkpoint import CheckpointError
from ..family import Defaults
from ..wan21 import NEGATIVE_PROMPT, Wan21, plan_variant
from . import experts


class Wan22A14B(Wan21):
    name, label, short_name = "wan2.2-a14b", "Wan 2.2 A14B", "wan2.2"
    order = 30
    defaults = Defaults(sampler="unipc", shift=12.0, cfg=(4.0, 3.0), negative_prompt=NEGATIVE_PROMPT, steps=40,
                        boundaries=(0.875,))
    experts = ("high_noise", "low_noise")
    comfy_model_configs = ()  # ComfyUI loads each expert as a Wan 2.1 MODEL (WAN21_T2V); no MODEL is a whole A14B
    claims_files = False
    i2v_clip_vision = False  # Wan 2.2 I2V A14B's experts take the start video alone
    dit_input_channels = (16, 36, 52)  # text to video; image to video and Fun InP; Fun Control (wan21/dit.py)
    # the planner costs the expert on the GPU (Wan 2.1 14B's architecture); `--model wan2.2` names it too
    plan_variants = {"wan2.2-a14b": plan_variant("Wan 2.2 T2V A14B (one expert on the GPU)", "wan2.1-t2v-14b", 14.0e9)}
    reference_times = {}

    def dit_config(self, path: Path, shapes: dict, metadata: dict) -> dict:
        experts.check_expert_shapes(path, shapes, metadata)
        return super().dit_config(path, shapes, metadata)

    def check_dit_folder(self, path: Path) -> None:
        experts.check_expert_folder(path)

    def check_experts(self, paths: list[str], configs: list[dict]) -> list[str]:
        if len(paths) != 2:
            raise CheckpointError(f"{self.label} is two experts (high noise, low noise); got {len(paths)} file(s)")
        return experts.check_pair(paths, configs)

    def teacache_coefficients(self, model):
        # no coefficients were published for Wan 2.2; its experts have Wan 2.1 14B's architecture
        coefficients, note = super().teacache_coefficients(model)
        return coefficients, note + " (none are published for Wan 2.2; uncalibrated for its experts)"

    def magcache_curve(self, model):
        return None, ("MagCache ratios for Wan 2.2 A14B are not carried here (they are calibrated per model); use the "
                      "first-block cache (fbcache)")

    def make_tiny(self, root):
        from .tiny import make_tiny_models

        return make_tiny_models(root)


FAMILY = Wan22A14B()

"""The USP Step Cache node: a step cache for the USP samplers (distributed/sampling/step_cache.py)."""

from __future__ import annotations

from ..distributed.sampling.step_cache import METHODS, CacheSettings
from .group_node import CATEGORY

TIP_STEP_CACHE = ("Optional: a USP Step Cache node. Skips the model's blocks at steps whose input barely changed, "
                  "the same steps on every rank; the skipped steps are shown in the progress line.")


class UspStepCache:
    DESCRIPTION = ("A step cache for a USP sampler: skips the transformer blocks at steps where the first block's "
                   "input (TeaCache) or output (first-block cache) barely changed since the last computed step, or "
                   "where the published magnitude ratios allow it (MagCache), and reuses that step's residual. The measure is taken over every rank's tokens and decided once for "
                   "the group. Faster, not exact: raise the threshold for speed, lower it for fidelity.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "method": ([m for m in METHODS if m != "off"], {"tooltip": (
                "teacache: TeaCache with its published per-model coefficients (Wan 2.1; Wan 2.2 A14B with Wan 2.1 "
                "14B's, uncalibrated; HunyuanVideo; not Wan 2.2 TI2V-5B). fbcache: first-block cache, for any model. "
                "magcache: MagCache with its published magnitude ratios (Wan 2.1 1.3B / 14B, HunyuanVideo).")}),
            "threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                "teacache: the accumulated rescaled change allowed before a step is computed (published settings: "
                "0.1-0.3). fbcache: the relative change of the first block's residual (about 0.05-0.15). magcache: "
                "the accumulated magnitude error (published: 0.12 for Wan, 0.24 for HunyuanVideo). 0 skips nothing.")}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Steps before this fraction of the run are always computed."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Steps from this fraction of the run on are always computed."}),
        }}

    RETURN_TYPES = ("USP_STEP_CACHE",)
    RETURN_NAMES = ("step_cache",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, method, threshold, start_percent, end_percent):
        settings = {"method": method, "threshold": threshold, "start": start_percent, "end": end_percent}
        CacheSettings.from_dict(settings)  # a clear message now, not at the sampler
        return (settings,)


NODES = {"UspStepCache": (UspStepCache, "USP Step Cache (TeaCache / first-block / MagCache)")}

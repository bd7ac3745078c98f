"""The USP Step Cache node: a step cache for the USP samplers (distributed/sampling/step_cache.py)."""

from __future__ import annotations

from ..distributed.sampling.step_cache import METHODS, CacheSettings
from . import socket_types
from .v3 import CATEGORY, io, schema

TIP_STEP_CACHE = ("Optional: a USP Step Cache node. Skips the model's blocks at steps whose input barely changed, "
                  "the same steps on every rank; the skipped steps are shown in the progress line.")


class UspStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspStepCache", display_name="USP Step Cache (TeaCache / first-block / MagCache)", category=CATEGORY,
            description=(
                "A step cache for a USP sampler: skips the transformer blocks at steps where the first block's input "
                "(TeaCache) or output (first-block cache) barely changed since the last computed step, or where the "
                "published magnitude ratios allow it (MagCache), and reuses that step's residual. The measure is "
                "taken over every rank's tokens and decided once for the group. Faster, not exact: raise the "
                "threshold for speed, lower it for fidelity."),
            search_aliases=["teacache", "magcache", "first block cache", "cache"],
            inputs=[
                io.Combo.Input("method", options=[m for m in METHODS if m != "off"], tooltip=(
                    "teacache: TeaCache with its published per-model coefficients (Wan 2.1; Wan 2.2 A14B with Wan 2.1 "
                    "14B's, uncalibrated; HunyuanVideo; not Wan 2.2 TI2V-5B). fbcache: first-block cache, for any "
                    "model. magcache: MagCache with its published magnitude ratios (Wan 2.1 1.3B / 14B, "
                    "HunyuanVideo).")),
                io.Float.Input("threshold", default=0.1, min=0.0, max=10.0, step=0.01, tooltip=(
                    "teacache: the accumulated rescaled change allowed before a step is computed (published settings: "
                    "0.1-0.3). fbcache: the relative change of the first block's residual (about 0.05-0.15). "
                    "magcache: the accumulated magnitude error (published: 0.12 for Wan, 0.24 for HunyuanVideo). 0 "
                    "skips nothing.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps before this fraction of the run are always computed."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps from this fraction of the run on are always computed."),
            ],
            outputs=[socket_types.StepCache.Output("step_cache", tooltip="For a USP sampler's step_cache input.")],
        )

    @classmethod
    def execute(cls, method, threshold, start_percent, end_percent):
        settings = {"method": method, "threshold": threshold, "start": start_percent, "end": end_percent}
        CacheSettings.from_dict(settings)  # a clear message now, not at the sampler
        return io.NodeOutput(settings)


NODES = [UspStepCache]

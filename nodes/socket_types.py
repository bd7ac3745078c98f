"""The pack's own socket types (V3 custom types), one place for all of them.

The generic nodes pass USP_GROUP, USP_MODEL, USP_TEXT_ENCODER, USP_VAE and USP_STEP_CACHE. The deprecated nodes
of earlier releases (deprecated.py) keep the per-family model and text-encoder types their saved workflows'
links name (USP_WAN_MODEL...), so that those workflows load and run unchanged."""

from __future__ import annotations

from .v3 import io

Group = io.Custom("USP_GROUP")
Model = io.Custom("USP_MODEL")
TextEncoder = io.Custom("USP_TEXT_ENCODER")
Vae = io.Custom("USP_VAE")
StepCache = io.Custom("USP_STEP_CACHE")

# earlier releases' per-family sockets (deprecated nodes only)
WanModel = io.Custom("USP_WAN_MODEL")
Wan22Model = io.Custom("USP_WAN22_MODEL")
HunyuanModel = io.Custom("USP_HUNYUAN_MODEL")
HunyuanTextEncoder = io.Custom("USP_HUNYUAN_TEXT_ENCODER")

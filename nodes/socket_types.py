"""The pack's own socket types (V3 custom types), one place for all of them.

The generic nodes pass USP_GROUP, USP_MODEL, USP_TEXT_ENCODER, USP_VAE and USP_STEP_CACHE. The deprecated nodes
of earlier releases (deprecated.py) keep the per-family model and text-encoder types their saved workflows'
links name (USP_WAN_MODEL...), so that those workflows load and run unchanged."""

from __future__ import annotations

from .v3 import custom

Group = custom("USP_GROUP")
Model = custom("USP_MODEL")
TextEncoder = custom("USP_TEXT_ENCODER")
Vae = custom("USP_VAE")
StepCache = custom("USP_STEP_CACHE")

# earlier releases' per-family sockets (deprecated nodes only)
WanModel = custom("USP_WAN_MODEL")
Wan22Model = custom("USP_WAN22_MODEL")
HunyuanModel = custom("USP_HUNYUAN_MODEL")
HunyuanTextEncoder = custom("USP_HUNYUAN_TEXT_ENCODER")

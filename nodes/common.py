"""Words and keys that several node files share: the tooltips of common inputs, and the key under which our
samplers tag a LATENT with its model family. What the nodes share in code lives beside it, one concern a
module: model_socket.py (loading a DiT, the model socket), conditioning.py (reading CONDITIONING),
sampler_run.py (running the sampler with progress, status and Cancel)."""

from __future__ import annotations

# The key of the model family in the LATENTs our samplers return. Native latents carry no tag: a
# latent from a native node cannot be checked against the VAE it is decoded with.
LATENT_TAG = "usp_family"

# Tooltips that several nodes share.
TIP_STEPS = ('Denoising steps. Each step runs the model once (twice when cfg != 1) on all ranks; the time per step is shown on the USP Group node.')
TIP_DENOISE = ('1.0: start from pure noise (text to video). Below 1 re-noises latent_image that much and runs only the last part of the schedule (video to video).')
TIP_TEXT = ("The prompt. Encoded once per new text; the conditioning equals the native text-encode node's.")
TIP_POSITIVE = ("What the video shows: a USP Text Encode's CONDITIONING (or a native text encode's).")
TIP_NEGATIVE = ('What to steer away from; used only when cfg != 1.')
TIP_GROUP = ('From the USP Group node.')

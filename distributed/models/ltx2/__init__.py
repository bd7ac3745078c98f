"""LTX-2 (Lightricks): a video DiT with a synchronized audio stream (issue #37), in progress.

dit.py   the DiT from Lightricks' all-in-one checkpoints or a diffusers folder (diffusers' LTX2VideoTransformer3DModel)
usp.py   its sequence parallelism: video tokens split, audio held whole, the cross-modal attentions exact
vae.py   the video and audio VAEs from the same files (diffusers' AutoencoderKLLTX2Video / AutoencoderKLLTX2Audio)
vocoder.py  LTX-2's vocoder from the same files (diffusers' LTX2Vocoder; LTX-2.3's with bandwidth extension not yet)
tiny.py  the tiny debug config and files in Lightricks' layout

Not yet a ModelFamily (models/__init__.py does not list it): the engine's sampler takes one latent and one velocity,
and LTX-2 denoises two (video and audio) together; the Gemma 3 text encoder (with the text connectors) and LTX-2.3's
vocoder are to come.
"""

"""ComfyUI's own code as the reference: each module here runs ComfyUI's model classes, VAEs, samplers or nodes
on our tiny files and compares them with ours (relative errors, or max abs errors), in a Python that has
ComfyUI's requirements and this pack.

    python -m comfyui_reference NAME COMFYUI_DIR FILES_JSON     (with tests/ on the path)

runs NAME's `compare(files) -> {check: error}` and prints the result as one JSON line. test_comfyui_native.py
runs each as a subprocess, so that importing ComfyUI (its top-level modules, its torch settings) does not touch
the test process. The modules:

    wan21       Wan 2.1 DiT forward, KSampler (euler, denoise), KSamplerAdvanced step ranges, the Wan-VAE decode
    hunyuan     HunyuanVideo's DiT forward and KSampler
    wan22       Wan 2.2 A14B's two experts against KSamplerAdvanced x2
    wan22_5b    Wan 2.2 TI2V-5B's DiT, KSampler and VAE
    vae_encode  VAE Encode (Wan 2.1 and Wan 2.2 VAEs)
    fp8         ComfyUI's fp8 loader and layers on fp8 files
    lora        LoraLoaderModelOnly chains on detectable tiny DiTs, against our engine and LoRA nodes
    i2v         WanImageToVideo + KSampler(Advanced) on detectable image-to-video DiTs
    animate     WanAnimateToVideo + KSampler on the tiny ComfyUI-layout Wan 2.2 Animate DiT, TrimVideoLatent
    animate_node  the pack's USP Wan Animate To Video == WanAnimateToVideo (its outputs, nine input cases)
    vace        WanVaceToVideo (stacked, a reference image) + KSampler + TrimVideoLatent on the tiny VACE DiT
    common      what they share: starting ComfyUI on the CPU, the relative error, ComfyUI's Wan model of a tiny file
"""

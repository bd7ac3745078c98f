"""Every ComfyUI symbol the pack uses outside its public node API, in one list.

ComfyUI's public API for custom nodes is comfy_api (the V3 schema: nodes/v3.py uses comfy_api.latest's io and
ComfyExtension). What it does not cover yet, the pack takes from ComfyUI's own modules; packs break most often
when these move, so each is listed here with why it is needed and whether comfy_api offers an equivalent.
tests/test_comfy_internals.py imports each one from the running ComfyUI (failing with the symbol's name when
one disappears) and checks that nodes/ imports no other ComfyUI module than those listed here.

Only nodes/services.py (and native_nodes.read_native, for the LoRA key map) touch them."""

from __future__ import annotations

# (module, attribute path, what the pack uses it for, the public equivalent if any)
INTERNALS: tuple[tuple[str, str, str, str], ...] = (
    ("folder_paths", "get_filename_list", "the model file lists of the loaders' combos", "none in comfy_api"),
    ("folder_paths", "get_full_path", "a chosen model file's path", "none in comfy_api"),
    ("folder_paths", "get_folder_paths", "the folders searched for .gguf DiTs", "none in comfy_api"),
    ("folder_paths", "folder_names_and_paths", "whether ComfyUI-GGUF's unet_gguf folder is registered",
     "none in comfy_api"),
    ("comfy.utils", "ProgressBar", "the sampler's per-step progress bar with latent previews",
     "comfy_api.latest ComfyAPI.execution.set_progress (async only in 0.3.64; the samplers run synchronously)"),
    ("comfy.latent_formats", "Wan21", "the latent format of the previews (by the family's latent_format name)",
     "none in comfy_api"),
    ("latent_preview", "get_previewer", "the latent preview image of each step (--preview-method)",
     "none in comfy_api"),
    ("comfy.model_management", "processing_interrupted", "Cancel: polled between steps", "none in comfy_api"),
    ("comfy.model_management", "throw_exception_if_processing_interrupted", "Cancel: ComfyUI's own exception",
     "none in comfy_api"),
    ("comfy.model_management", "free_memory", "unload ComfyUI's models from the group's devices before a run",
     "none in comfy_api"),
    ("comfy.model_management", "current_loaded_models", "what ComfyUI holds on the group's devices (the state box)",
     "none in comfy_api"),
    ("comfy.model_management", "soft_empty_cache", "empty ComfyUI's cache before a run", "none in comfy_api"),
    ("server", "PromptServer", "the USP Group node's state box (a websocket event and a GET route)",
     "none in comfy_api"),
    ("comfy.lora", "model_lora_keys_unet", "a native MODEL's LoRA patches checked against its chain",
     "none in comfy_api"),
    ("comfy", "__path__", "the tokenizers ComfyUI ships (HunyuanVideo's default tokenizer folder)",
     "none in comfy_api"),
)

# The top-level ComfyUI modules those come from (checked against nodes/'s imports by the test).
MODULES = tuple(sorted({module.split(".")[0] for module, *_ in INTERNALS} | {"comfy_api"}))

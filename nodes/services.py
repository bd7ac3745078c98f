"""ComfyUI's services (model folders, progress bar, Cancel), with stand-ins where ComfyUI is absent
so that the nodes import and run in tests and tools.

Outside ComfyUI, model files are looked up under $USP_VIDEO_MODELS_DIR/<folder>/ (the same
layout as ComfyUI's models/ folder).
"""

from __future__ import annotations

import os
from pathlib import Path

try:  # inside ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:
    _mm = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None


def _models_dir() -> Path:
    return Path(os.environ.get("USP_VIDEO_MODELS_DIR", "models"))


# Folders whose lists add GGUF files (city96's DiTs): ComfyUI lists diffusion_models with its own extensions,
# which do not include .gguf; ComfyUI-GGUF, where installed, registers "unet_gguf" for the same folders.
GGUF_FOLDERS = {"diffusion_models": ("diffusion_models", "unet_gguf")}


def list_models(folder: str) -> list[str]:
    if IN_COMFYUI:
        names = list(_folder_paths.get_filename_list(folder))
        for extra in GGUF_FOLDERS.get(folder, ()):
            if extra in _folder_paths.folder_names_and_paths:
                roots = [Path(p) for p in _folder_paths.get_folder_paths(extra)]
                names += [str(f.relative_to(r)).replace(os.sep, "/") for r in roots if r.is_dir()
                          for f in r.rglob("*.gguf")]
        return sorted(dict.fromkeys(names))
    root = _models_dir() / folder
    if not root.is_dir():
        return []
    patterns = ("*.safetensors", "*.gguf") if folder in GGUF_FOLDERS else ("*.safetensors",)
    return sorted(str(p.relative_to(root)) for pattern in patterns for p in root.rglob(pattern))


def model_path(folder: str, name: str) -> str:
    if IN_COMFYUI:
        for extra in GGUF_FOLDERS.get(folder, ()):  # a .gguf name may come from either folder's paths
            if name.endswith(".gguf") and extra in _folder_paths.folder_names_and_paths:
                found = _folder_paths.get_full_path(extra, name)
                if found:
                    return found
        found = _folder_paths.get_full_path(folder, name)
        if found is None:  # (ComfyUI 0.3.64 does not check a V3 combo's value against its list before running)
            listed = list_models(folder)
            raise FileNotFoundError(f"{name!r} is not in models/{folder}; the files there: "
                                    f"{', '.join(listed[:20]) + (' ...' if len(listed) > 20 else '') or 'none'}")
        return found
    path = _models_dir() / folder / name
    if not path.exists():
        raise FileNotFoundError(f"{folder}/{name} not found under {_models_dir()} (set USP_VIDEO_MODELS_DIR)")
    return str(path)


def model_folder(kind: str, name: str) -> str:
    """A folder given by name: as given when it exists (an absolute path, or relative to where ComfyUI runs), else
    looked up in ComfyUI's models/<kind> folders (models/text_encoders/<name>, and any extra_model_paths), else a
    FileNotFoundError naming the places tried."""
    given = Path(name).expanduser()
    if given.is_dir():
        return str(given)
    bases = _folder_paths.get_folder_paths(kind) if IN_COMFYUI else [str(_models_dir() / kind)]
    for base in bases:
        if (Path(base) / name).is_dir():
            return str(Path(base) / name)
    raise FileNotFoundError(f"{name!r} is not a folder, nor one in {' or '.join(bases)}")


class Progress:
    """The node's progress bar in the page (ComfyUI) or nothing, with latent previews when the
    user has previews on (ComfyUI's Latent2RGB of the model's latent format, the family's `latent_format`:
    Wan21, HunyuanVideo...). latent_format None: a bar without previews (a VAE decode or encode)."""

    def __init__(self, total: int, node_id: str | None, latent_format: str | None):
        self.bar = _comfy_utils.ProgressBar(total, node_id=node_id) if IN_COMFYUI else None
        self.total = total
        self.value = 0
        self.previewer = None
        if IN_COMFYUI and latent_format is not None:
            try:
                import comfy.latent_formats
                import latent_preview

                self.previewer = latent_preview.get_previewer("cpu", getattr(comfy.latent_formats, latent_format)())
            except Exception:  # previews are a nicety: never fail a run over them
                self.previewer = None

    @property
    def wants_preview(self) -> bool:
        return self.previewer is not None

    def update(self, value: int, total: int | None = None, x0=None) -> None:
        self.value = value
        if self.bar is not None:
            preview = None
            if x0 is not None and self.previewer is not None:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            self.bar.update_absolute(value, total or self.total, preview)


def comfyui_dir() -> Path | None:
    """The ComfyUI checkout this process runs in (its bundled tokenizers live there), if any.

    ComfyUI's `comfy` folder has no __init__.py: it is a namespace package, whose __file__ is None,
    so the checkout is found through its __path__ (folder_paths.base_path can be another folder,
    set by --base-directory)."""
    if not IN_COMFYUI:
        return None
    import comfy

    return Path(next(iter(comfy.__path__))).resolve().parent


def interrupt_requested() -> bool:
    return bool(IN_COMFYUI and _mm.processing_interrupted())


def is_comfy_interrupt(exc: BaseException) -> bool:
    """Is exc ComfyUI's own Cancel (raised by its progress hook, which clears the interrupt flag as it raises)?"""
    return IN_COMFYUI and isinstance(exc, _mm.InterruptProcessingException)


def raise_interrupted() -> None:
    """End the node as cancelled: ComfyUI's interrupt exception (the page then shows 'interrupted', not an error),
    whether or not ComfyUI's flag is still set."""
    if IN_COMFYUI:
        raise _mm.InterruptProcessingException()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's own interrupt exception (the page then shows 'interrupted', not an error)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


def _model_name(loaded) -> str:
    """A ComfyUI LoadedModel's model class (WAN21, UMT5XXlModel...): what its patcher wraps."""
    patcher = loaded.model
    inner = getattr(patcher, "model", patcher)
    return type(inner).__name__


def comfy_models_on(devices: list[str]) -> dict[str, list[str]]:
    """What ComfyUI's model management holds loaded (its current_loaded_models) on each of these devices."""
    held = {device: [] for device in devices}
    if IN_COMFYUI:
        for loaded in list(_mm.current_loaded_models):
            device = str(loaded.device)
            if device in held and not loaded.is_dead():
                held[device].append(_model_name(loaded))
    return held


def group_devices(config) -> list[str]:
    """The devices (as this process names them) a group's ranks use: its GPUs (config.gpus, else every one this
    process sees), or the CPU; none without a group config (the tests' samplers with api.sample in-process)."""
    if config is None:
        return []
    if config.device != "cuda":
        return ["cpu"]
    import torch

    return [f"cuda:{i}" for i in (config.gpus or range(torch.cuda.device_count()))]


def free_comfy_models(devices: list[str]) -> dict[str, list[str]]:
    """Before the group loads or runs: unload ComfyUI's own models from the devices the group uses (ComfyUI's
    free_memory for each, asking for more than any card has: every model there goes; its models on other devices
    stay) and empty its cache (soft_empty_cache). Returns {device: the models unloaded}, and shows on the USP
    Group node what ComfyUI still holds on those devices."""
    if not IN_COMFYUI:
        return {}
    import torch

    unloaded = {}
    for device in devices:
        gone = _mm.free_memory(1e30, torch.device(device))
        unloaded[device] = [_model_name(m) for m in gone or []]
    _mm.soft_empty_cache()
    publish_status(comfy_unloaded={d: names for d, names in unloaded.items() if names} or None,
                   comfy_models=comfy_models_on(devices))
    return unloaded


# -- the group's state, shown on the USP Group node in the page (web/js/usp_status.js) ---------------

STATUS_EVENT = "usp_video.status"  # the websocket event the page listens to
STATUS_ROUTE = "/usp_video/status"  # GET: the latest state, for a page opened later
_status: dict = {}
_shown_run_dir: list[str | None] = [None]  # the group whose state is shown (kept here, not sent to the page)


def publish_status(**fields) -> dict:
    """Update the group's state (None removes a field) and send it to the page; returns it.

    Fields: group (its configuration), state ("ready", "sampling step 3/20", ...), cards (a line per GPU),
    comfy_models ({device: ComfyUI's models loaded there}), comfy_unloaded ({device: the models unloaded before
    the run}), model, degrees, weights, free (bytes per rank), last_run."""
    for key, value in fields.items():
        if value is None:
            _status.pop(key, None)
        else:
            _status[key] = value
    _status["text"] = status_text(_status)
    if IN_COMFYUI:
        try:
            from server import PromptServer

            PromptServer.instance.send_sync(STATUS_EVENT, dict(_status))
        except Exception:  # the state on the node is a nicety: never fail a run over it
            pass
    return dict(_status)


def current_status() -> dict:
    return dict(_status)


def clear_status() -> dict:
    """Forget the state of a group that was stopped (or replaced by another)."""
    _status.clear()
    _shown_run_dir[0] = None
    return publish_status()


def note_group(group, config) -> None:
    """The group a node is about to use (started, or restarted after a crash or a Free Group): a group
    other than the one shown replaces the state, so that no other group's model or memory is shown."""
    run_dir = str(group.run_dir)
    if run_dir != _shown_run_dir[0]:
        clear_status()
        _shown_run_dir[0] = run_dir
        publish_status(group=config.describe(), state="ready", cards=card_lines(group) or None)


def card_lines(group) -> list[str]:
    """The group's GPUs (cards.Card) as the state box and the group's info show them, and its start's warnings."""
    from ..distributed.cards import card_lines as lines

    return lines(getattr(group, "cards", [])) + [f"warning: {w}" for w in getattr(group, "warnings", [])]


def status_text(status: dict) -> str:
    """The lines shown on the node."""
    if "group" not in status:
        return "no group running"
    lines = [f"{status.get('state', 'ready')}: {status['group']}"]
    if "model" in status:
        lines.append(f"model: {status['model']}")
    if "degrees" in status:
        lines.append(status["degrees"])
    if "weights" in status:
        lines.append(f"weights per rank: {status['weights']}")
    for line in status.get("cards", []):
        lines.append(line)
    if "comfy_models" in status:
        lines.append("ComfyUI's models there: " + "; ".join(
            f"{device} {', '.join(names) or 'none'}" for device, names in status["comfy_models"].items()))
    if "comfy_unloaded" in status:
        lines.append("unloaded from them before the run: " + "; ".join(
            f"{device} {', '.join(names)}" for device, names in status["comfy_unloaded"].items()))
    if "free" in status:
        lines.append("free memory: " + ", ".join(f"rank {rank} {free / 2**30:.1f} GiB"
                                                 for rank, free in enumerate(status["free"])))
    if "last_run" in status:
        lines.append(f"last run: {status['last_run']}")
    return "\n".join(lines)


def _register_status_route() -> None:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get(STATUS_ROUTE)
    async def _get_status(request):
        return web.json_response(dict(_status) or {"text": status_text({})})


if IN_COMFYUI:
    try:
        _register_status_route()
    except Exception:  # imported by a ComfyUI tool without a server: no page to show it in
        pass

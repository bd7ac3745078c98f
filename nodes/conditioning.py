"""CONDITIONING as the USP samplers read it: ComfyUI's [[tensor, dict]] -> the text tensor and the dict, with every
key the sampler would not apply refused by name (a family's node file takes the keys its model applies: Wan's
image-to-video inputs in wan_nodes.py, HunyuanVideo's pooled output and guidance in hunyuan_nodes.py)."""

from __future__ import annotations

# What a native conditioning's dict may carry that the USP samplers do not apply, and the node that puts it
# there (for the message). Anything else unknown is refused too, under its own name.
_NOT_APPLIED = {
    "start_percent": "ConditioningSetTimestepRange", "end_percent": "ConditioningSetTimestepRange",
    "area": "ConditioningSetArea", "strength": "ConditioningSetArea / ConditioningSetMask",
    "set_area_to_bounds": "ConditioningSetMask", "mask": "ConditioningSetMask", "mask_strength": "ConditioningSetMask",
    "control": "a ControlNet apply node", "control_apply_to_uncond": "a ControlNet apply node",
    "gligen": "GLIGENTextBoxApply", "hooks": "a hook node (SetClipHooks, CreateHookLora...)",
    "concat_latent_image": "an image-to-video node (WanImageToVideo...)",
    "concat_mask": "an image-to-video node (WanImageToVideo...)",
    "clip_vision_output": "CLIPVisionEncode / an image-to-video node",
    "reference_latents": "ReferenceLatent", "noise_augmentation": "an unCLIP node",
    "vace_frames": "WanVaceToVideo, for a Wan VACE model: load one, e.g. wan2.1_vace_14B_fp16",
    "vace_mask": "WanVaceToVideo", "vace_strength": "WanVaceToVideo",
    "pose_video_latent": "WanAnimateToVideo, for a Wan 2.2 Animate model", "face_video_pixels": "WanAnimateToVideo",
}
# Keys whose value is applied whatever the family (the text's own attention mask) or means nothing here.
_ALWAYS = {"attention_mask"}
# A timestep range covering every step changes nothing: accepted.
_WHOLE_RANGE = {"start_percent": 0.0, "end_percent": 1.0}


def conditioning_parts(conditioning, name: str, applies: tuple[str, ...] = ()):
    """CONDITIONING ([[tensor, dict]]) -> (tensor, dict); only plain text conditioning is supported.

    A native conditioning whose dict carries an attention_mask (ComfyUI drops it when nothing is
    masked) keeps only its unmasked tokens, which is what the model attends to. applies: the other keys
    of the dict the calling sampler uses (HunyuanVideo's pooled_output and guidance). Any other key set
    (a timestep range, an area or mask, a ControlNet, image-to-video inputs...) is refused by name: the
    sampler would ignore it, and the video would silently not be what the graph asks for."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name}: expected CONDITIONING from a text-encode node")
    if len(conditioning) > 1:
        raise ValueError(f"{name}: combined/area conditioning ({len(conditioning)} entries) is not supported; "
                         "connect a single text encode")
    tensor, extra = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    extra = extra if isinstance(extra, dict) else {}
    ignored = [key for key, value in extra.items()
               if value is not None and key not in _ALWAYS and key not in applies
               and not (key in _WHOLE_RANGE and value == _WHOLE_RANGE[key])]
    if ignored:
        named = ", ".join(f"{key} (from {_NOT_APPLIED[key]})" if key in _NOT_APPLIED else key for key in ignored)
        raise ValueError(f"{name}: this conditioning carries {named}, which the USP sampler does not apply; "
                         "remove that node between the text encode and the sampler (the USP sampler takes plain "
                         "text conditioning" + (f", with {', '.join(applies)}" if applies else "") + ")")
    mask = extra.get("attention_mask")
    if mask is not None and tensor.shape[0] == 1:
        tensor = tensor[:, mask[0].bool()]
    return tensor, extra


def _penultimate(value, name: str):
    hidden = getattr(value, "penultimate_hidden_states", None)
    if hidden is None:
        raise ValueError(f"{name}: its clip_vision_output has no penultimate_hidden_states (not a CLIPVisionEncode "
                         "output?)")
    return hidden


def _last_hidden(value, name: str):
    hidden = getattr(value, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{name}: its clip_vision_output has no last_hidden_state (not a CLIPVisionEncode output?)")
    return hidden


def _stacked(value, name: str):
    """WanVaceToVideo's list of tensors (one [B, C, T, H, W] per node; several nodes append) -> [B, K, C, T, H, W]."""
    import torch

    entries = list(value) if isinstance(value, (list, tuple)) else [value]
    if not entries or not all(isinstance(t, torch.Tensor) and t.dim() == 5 for t in entries):
        raise ValueError(f"{name}: expected WanVaceToVideo's list of [batch, channels, frames, height, width] "
                         f"tensors, got {[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in entries]}")
    if len({tuple(t.shape) for t in entries}) > 1:
        raise ValueError(f"{name}: the stacked WanVaceToVideo inputs differ in shape "
                         f"({', '.join(str(tuple(t.shape)) for t in entries)}): give every WanVaceToVideo node the "
                         "same width, height, length and reference image use")
    return torch.stack(entries, dim=1)


def _strengths(value, name: str):
    """WanVaceToVideo's list of strengths (floats, one per node) -> [1, K]."""
    import torch

    entries = list(value) if isinstance(value, (list, tuple)) else [value]
    if not entries or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in entries):
        raise ValueError(f"{name}: vace_strength must be WanVaceToVideo's list of numbers, got {entries!r}")
    return torch.tensor([[float(s) for s in entries]])


def _last_reference(value, name: str):
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: its reference_latents is not a list of latents (from ReferenceLatent or "
                         "Wan22FunControlToVideo)")
    return value[-1]  # the model takes the last one, as ComfyUI's WAN21.extra_conds


def _index(value, name: str):
    import torch

    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: its concat_mask_index must be an integer, got {value!r}")
    return torch.tensor(value)


# A family's conditioning tensor whose ComfyUI conditioning key differs from its own name, or whose value is
# read from ComfyUI's object (CLIPVisionEncode's output -> its penultimate hidden states for Wan's CLIP-H, its last
# hidden state for HunyuanVideo 1.5's SigLIP; WanVaceToVideo's lists
# -> stacked tensors; reference_latents -> the last one; concat_mask_index -> a tensor), and how. Other tensors
# keep their name and value end to end (concat_latent_image, ...).
FROM_COMFY = {"clip_vision": ("clip_vision_output", _penultimate),
              "siglip": ("clip_vision_output", _last_hidden),
              "vace_frames": ("vace_frames", lambda value, name: _stacked(value, f"{name}.vace_frames")),
              "vace_mask": ("vace_mask", lambda value, name: _stacked(value, f"{name}.vace_mask")),
              "vace_strength": ("vace_strength", _strengths),
              "reference_latent": ("reference_latents", _last_reference),
              "concat_mask_index": ("concat_mask_index", _index)}


def family_conditioning(conditioning, name: str, family) -> tuple[dict, dict[str, float]]:
    """A sampler's side of a CONDITIONING for a model of `family`: ({"tokens", ...the family's cond_keys the
    conditioning carries}, {family option: value} that the conditioning sets, e.g. FluxGuidance's guidance).
    Any key the family does not apply is refused by name (conditioning_parts)."""
    comfy_keys = {FROM_COMFY.get(key, (key,))[0]: key for key in family.cond_keys if key != "tokens"}
    tokens, extra = conditioning_parts(conditioning, name, tuple(comfy_keys) + tuple(family.options))
    cond = {"tokens": tokens}
    for comfy_key, key in comfy_keys.items():
        if extra.get(comfy_key) is not None:
            read = FROM_COMFY[key][1] if key in FROM_COMFY else (lambda value, _: value)
            cond[key] = read(extra[comfy_key], name)
    options = {key: float(extra[key]) for key in family.options if extra.get(key) is not None}
    return cond, options

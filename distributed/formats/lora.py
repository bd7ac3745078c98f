"""LoRAs on a loaded DiT, on every rank: read from the file names ComfyUI 0.3.64 accepts, applied unmerged.

Which files. A LoRA names the layers it changes after the base model's file (the original / ComfyUI key
names), in the layouts ComfyUI 0.3.64's comfy/lora.py maps for these models: `diffusion_model.<name>` and
`lora_unet_<name with _ for .>` for every model (Wan Fun's `lora_unet__` too), and for HunyuanVideo also
`transformer.<name>` in diffusion-pipe's names (`img_attn_qkv`, `img_mod.linear`, `img_mlp.fc1`: the
family's `lora_aliases`). Per layer: `lora_up` / `lora_down` (or `lora_B` / `lora_A`, `lora.up` / `lora.down`,
`lora_linear_layer.up` / `.down`) with an optional `alpha` (scale alpha / rank, else 1); `diff` (a full
difference of the weight) and `diff_b` (of its bias), as distillation LoRAs carry them. LoHa, LoKr, GLoRA, OFT,
BOFT, DoRA, LoCon's `lora_mid` and `set_weight` are refused by name.

Where it goes. The family's key conversion (the loader's source map: model tensor <- rows of file tensors)
says which rows of which model tensor each file tensor became, so a LoRA on HunyuanVideo's fused q/k/v
(or linear1: q/k/v/mlp) is split by rows exactly as its loader splits the weight.

How it is applied, and why unmerged. A Linear layer gets a forward hook that adds
scale * up(down(x)) (and diff x, diff_b) to its output: the stored weight never changes. That is what lets
a LoRA apply to fp8 and GGUF weights (no permanent dequantization, no rounding back into fp8) and to
FSDP-sharded weights (the hook runs where the layer runs, on the gathered weight's output), and a new
strength or list replaces the hooks without reading the base model again. The cost is two rank-r
matmuls per layer (about 2 x r / width of the layer's own: 2.5% at rank 64 on Wan 14B). Other tensors
(norm weights, biases: small) are merged, with a backup of the rank's rows to restore. Wan's modulation tables
are left alone, with a warning, as ComfyUI 0.3.64 leaves them (_comfyui_never_patches).
In fp32 the result equals ComfyUI's merged weights to float rounding (tests/comfyui_reference/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .tensor_file import CheckpointError

# (up, down) tensor name suffixes of the plain LoRA layouts ComfyUI reads (comfy/weight_adapter/lora.py)
PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
         ("lora.up.weight", "lora.down.weight"), ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"))
FULL = ("diff", "diff_b")
# Adapter kinds ComfyUI knows that are not implemented here: refused by name, never half applied.
UNSUPPORTED = {"hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa", "hada_t1": "LoHa",
               "hada_t2": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr",
               "lokr_w2_a": "LoKr", "lokr_w2_b": "LoKr", "lokr_t2": "LoKr", "a1.weight": "GLoRA",
               "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "oft_blocks": "OFT", "oft_diag": "OFT",
               "rescale": "OFT", "boft_blocks": "BOFT", "dora_scale": "DoRA", "lora_mid.weight": "LoCon (lora_mid)",
               "set_weight": "set_weight (a replaced weight)", "reshape_weight": "reshape_weight",
               "w_norm": "a norm LoRA (w_norm)", "b_norm": "a norm LoRA (b_norm)"}

Rows = tuple[str, int, int]


@dataclass
class Patch:
    """One change a LoRA makes to one tensor of the base file (file_key: its unprefixed original name).
    kind "lora": scale x up @ down; kind "diff": scale x diff."""
    file_key: str
    kind: str
    tensors: tuple[torch.Tensor, ...]
    scale: float


@dataclass
class LoraReport:
    """What a LoRA file matched: keys in all, layers changed, and the keys that matched nothing."""
    name: str
    keys: int = 0
    layers: int = 0
    unmatched: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)  # matched, but left alone as ComfyUI leaves them

    def warning(self) -> str | None:
        said = []
        if self.unmatched:
            said.append(f"LoRA {self.name}: {len(self.unmatched)} of {self.keys} keys match no layer of the model and "
                        f"are not applied (e.g. {', '.join(self.unmatched[:3])}); {self.layers} layers are changed")
        if self.not_applied:
            said.append(f"LoRA {self.name}: {len(self.not_applied)} of its tensors change modulation tables (e.g. "
                        f"{', '.join(self.not_applied[:2])}), which ComfyUI 0.3.64 reads but never applies; not "
                        "applied here either, so that the video is ComfyUI's")
        return "; ".join(said) or None


def stem_lookup(file_keys: list[str], aliases: Callable[[str], list[str]] = lambda stem: []) -> dict[str, str]:
    """{LoRA key stem: the base file tensor it changes} for the layouts ComfyUI 0.3.64 accepts (module
    docstring): a weight's stem (its name less `.weight`) under `diffusion_model.` and `lora_unet_`, and the
    family's aliases; any other tensor (a bias, a modulation table) under `diffusion_model.<name>`."""
    lookup = {}
    for key in file_keys:
        if key.endswith(".weight"):
            stem = key[: -len(".weight")]
            lookup[f"diffusion_model.{stem}"] = key
            lookup[f"lora_unet_{stem.replace('.', '_')}"] = key
            for alias in aliases(stem):
                lookup[alias] = key
        else:
            lookup[f"diffusion_model.{key}"] = key
    return lookup


def _split(key: str) -> tuple[str, str] | None:
    """A LoRA tensor name -> (stem, suffix) for the suffixes this reader knows (the pairs, alpha, diff), or
    None."""
    for up, down in PAIRS:
        for suffix in (up, down):
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], suffix
    for suffix in ("alpha", *FULL):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    for suffix in ("_lora.up.weight", "_lora.down.weight"):  # diffusers' old layout: <stem>_lora.up.weight
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix.replace("_lora.", "lora.")
    return None


def read_lora(path: str | Path, strength: float, file_shapes: dict[str, list[int]],
              aliases: Callable[[str], list[str]] = lambda stem: [], what: str = "the model") -> tuple[list[Patch], LoraReport]:
    """The patches a LoRA file makes to a base model whose file holds file_shapes ({unprefixed name: shape}),
    at this strength. Raises CheckpointError, naming the file, for an adapter kind not implemented, a LoRA
    that matches no layer of the model, or shapes that do not fit."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA {path.name}: only .safetensors LoRA files are read")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for truncated or foreign files
        raise CheckpointError(f"LoRA {path.name} is not a readable .safetensors file ({exc})") from exc
    state = {("lora_unet_" + k[len("lora_unet__"):] if k.startswith("lora_unet__") else k): v
             for k, v in state.items()}  # Wan Fun's LoRAs (ComfyUI's convert_lora_wan_fun)
    kinds = sorted({UNSUPPORTED[s] for k in state for s in UNSUPPORTED if k.endswith("." + s)})
    if kinds:
        raise CheckpointError(f"LoRA {path.name} is a {' / '.join(kinds)} adapter, which is not implemented; "
                              "use a plain LoRA (lora_up/lora_down or lora_A/lora_B, with diff/diff_b)")
    lookup = stem_lookup(list(file_shapes), aliases)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    report = LoraReport(path.name, keys=len(state))
    for key, value in state.items():
        parts = _split(key)
        if parts is None or parts[0] not in lookup:
            report.unmatched.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = value
    if not groups:
        sample = ", ".join(list(state)[:2]) or "none"
        raise CheckpointError(f"LoRA {path.name}: none of its {len(state)} keys names a layer of {what} (its keys: "
                              f"{sample}, ...); is it a LoRA for another model?")
    patches = []
    for stem, parts in groups.items():
        file_key = lookup[stem]
        if _comfyui_never_patches(file_key):
            report.not_applied.append(stem)
            continue
        patches += _patches(path.name, stem, parts, file_key, file_shapes, strength, report)
    report.layers = len({p.file_key for p in patches})
    return patches, report


def _patches(name: str, stem: str, parts: dict[str, torch.Tensor], file_key: str,
             file_shapes: dict[str, list[int]], strength: float, report: LoraReport) -> list[Patch]:
    shape = list(file_shapes[file_key])
    out = []
    for up_name, down_name in PAIRS:
        if up_name in parts or down_name in parts:
            if up_name not in parts or down_name not in parts:
                raise CheckpointError(f"LoRA {name}: {stem} has {up_name if up_name in parts else down_name} "
                                      "without its pair")
            up, down = parts[up_name].float(), parts[down_name].float()
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            rank = down.shape[0]
            if up.shape[1] != rank or [up.shape[0], down.shape[1]] != [shape[0], _row_size(shape)]:
                raise CheckpointError(f"LoRA {name}: {stem} is up {list(up.shape)} x down {list(down.shape)}, which "
                                      f"does not fit the model's {file_key} {shape}; a LoRA for another size of "
                                      "this model?")
            alpha = parts.get("alpha")
            scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
            out.append(Patch(file_key, "lora", (up, down), scale))
    if "diff" in parts:
        diff = parts["diff"].float()
        if diff.numel() != _numel(shape):
            raise CheckpointError(f"LoRA {name}: {stem}.diff {list(diff.shape)} does not fit the model's {file_key} "
                                  f"{shape}")
        out.append(Patch(file_key, "diff", (diff.reshape(shape),), strength))
    if "diff_b" in parts:
        bias = file_key[: -len("weight")] + "bias" if file_key.endswith(".weight") else None
        if bias is None or bias not in file_shapes:
            report.unmatched.append(f"{stem}.diff_b")
        else:
            diff = parts["diff_b"].float()
            if diff.numel() != _numel(file_shapes[bias]):
                raise CheckpointError(f"LoRA {name}: {stem}.diff_b {list(diff.shape)} does not fit the model's {bias} "
                                      f"{list(file_shapes[bias])}")
            out.append(Patch(bias, "diff", (diff.reshape(file_shapes[bias]),), strength))
    if "alpha" in parts and not any(p.kind == "lora" for p in out):
        report.unmatched.append(f"{stem}.alpha")
    return out


def _comfyui_never_patches(file_key: str) -> bool:
    """ComfyUI 0.3.64 maps a LoRA's key for every tensor but patches only the parameters of modules that hold
    no submodule parameters (model_patcher.py _load_list: "skip random weights in non leaf modules"). Of these
    families' tensors that leaves out exactly Wan's modulation tables (blocks.N.modulation, head.modulation:
    listed from ComfyUI's WanModel and HunyuanVideo); a `diff` on them would change our video, not ComfyUI's."""
    return file_key.endswith(".modulation")


def _row_size(shape: list[int]) -> int:
    return _numel(shape[1:]) if len(shape) > 1 else 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------------------
# Applying the patches to a model.

def inverse_source(source: dict[str, list[Rows]]) -> dict[str, list[tuple[str, int, int, int]]]:
    """{file tensor: [(model tensor, its first model row, first file row, stop file row)]} from a loader's
    source map ({model tensor: [(file tensor, first row, stop row)]})."""
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for model_key, ranges in source.items():
        at = 0
        for file_key, begin, end in ranges:
            out.setdefault(file_key, []).append((model_key, at, begin, end))
            at += end - begin
    return out


class _Adapters:
    """The unmerged changes of one Linear layer, kept as buffers of the layer (so that they move with it when
    the placement parks a model in host memory or brings it back): `pairs` low-rank pairs (down [r, in], scaled
    up [out, r], placed at the layer's output rows), `weights` full weight differences, and a bias difference."""

    def __init__(self, pairs: int, weights: int, bias: bool):
        self.pairs, self.weights, self.bias = pairs, weights, bias

    def __call__(self, module, args, output):
        x, held = args[0], module._buffers
        for i in range(self.pairs):
            down, up = held[f"usp_lora_down_{i}"], held[f"usp_lora_up_{i}"]
            output = output + F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype))
        for i in range(self.weights):
            output = output + F.linear(x, held[f"usp_lora_weight_{i}"].to(x.device, x.dtype))
        if self.bias:
            output = output + held["usp_lora_bias"].to(output.device, output.dtype)
        return output


@dataclass
class LoraState:
    """What apply() did to a model, for remove() to undo (the caller keeps it): the forward hooks, the (layer,
    name) of their buffers, a backup of this rank's rows of each merged tensor."""

    handles: list = field(default_factory=list)
    backups: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Deltas:
    """The patches per model tensor: a Linear layer's (down, up) pairs, full weight differences and bias
    difference (hooked); any other tensor's whole difference (merged)."""

    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_linear(self, owner: str, module: torch.nn.Linear, kind: str, patch: Patch, at: int, begin: int,
                   end: int) -> None:
        rows = end - begin
        if kind == "bias":
            delta = self.biases.setdefault(owner, torch.zeros(module.out_features))
            delta[at:at + rows] += patch.scale * patch.tensors[0].reshape(-1)[begin:end]
        elif patch.kind == "lora":
            up, down = patch.tensors
            placed = torch.zeros(module.out_features, up.shape[1])
            placed[at:at + rows] = patch.scale * up[begin:end]
            self.pairs.setdefault(owner, []).append((down, placed))
        else:
            placed = torch.zeros(module.out_features, module.in_features)
            placed[at:at + rows] = patch.scale * patch.tensors[0].reshape(-1, module.in_features)[begin:end]
            self.weights.setdefault(owner, []).append(placed)

    def add_merged(self, model_key: str, param: torch.Tensor, patch: Patch, at: int, begin: int, end: int) -> None:
        whole = self.merged.setdefault(model_key, torch.zeros(param.shape))
        delta = patch.tensors[0] @ patch.tensors[1] if patch.kind == "lora" else patch.tensors[0]
        delta = (patch.scale * delta).reshape(-1, *param.shape[1:]) if param.dim() else patch.scale * delta
        if param.dim():
            whole[at:at + end - begin] += delta[begin:end]
        else:
            whole += delta.reshape(())


def apply(model: torch.nn.Module, source: dict[str, list[Rows]], patches: list[Patch], dtype: torch.dtype) -> LoraState:
    """Apply patches (read_lora's, of any number of LoRAs) to a model loaded from the file whose source map
    this is (the rows of each model tensor in the file). Linear layers: forward hooks (unmerged) whose tensors
    are buffers of the layer, in `dtype` on the layer's device; other tensors: merged into this rank's rows,
    with a backup. Returns the state, which remove(model, state) undoes (an earlier one first: loras.py)."""
    inverse = inverse_source(source)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    deltas = _Deltas()
    for patch in patches:
        for model_key, at, begin, end in inverse.get(patch.file_key, []):
            owner, _, kind = model_key.rpartition(".")
            module = modules.get(owner)
            if isinstance(module, torch.nn.Linear) and kind in ("weight", "bias"):
                deltas.add_linear(owner, module, kind, patch, at, begin, end)
            else:
                deltas.add_merged(model_key, params[model_key], patch, at, begin, end)
    new = LoraState()
    _hook(modules, deltas, dtype, new)
    _merge(params, deltas.merged, new)
    return new


def _hook(modules: dict[str, torch.nn.Module], deltas: _Deltas, dtype: torch.dtype, state: LoraState) -> None:
    """The unmerged part: each Linear layer's tensors as its buffers, and a forward hook that adds them."""
    pairs, weights, biases = deltas.pairs, deltas.weights, deltas.biases
    for owner in dict.fromkeys([*pairs, *weights, *biases]):
        module = modules[owner]
        device = _device_of(module)  # dit_offload: the host, where the layer's shards wait (copied per call)
        held = {}
        for i, (down, up) in enumerate(pairs.get(owner, [])):
            held[f"usp_lora_down_{i}"], held[f"usp_lora_up_{i}"] = down, up
        for i, weight in enumerate(weights.get(owner, [])):
            held[f"usp_lora_weight_{i}"] = weight
        if owner in biases:
            held["usp_lora_bias"] = biases[owner]
        for name, tensor in held.items():
            module.register_buffer(name, tensor.to(device, dtype), persistent=False)
            state.buffers.append((owner, name))
        state.handles.append(module.register_forward_hook(
            _Adapters(len(pairs.get(owner, [])), len(weights.get(owner, [])), owner in biases)))


def _merge(params: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], state: LoraState) -> None:
    """The merged part: each tensor's difference added to this rank's rows, after a backup of them."""
    from .streamed import _my_rows

    with torch.no_grad():
        for model_key, delta in merged.items():
            local, first = _my_rows(params[model_key])
            state.backups[model_key] = local.detach().to("cpu", copy=True)
            rows = delta[first:first + local.shape[0]] if local.dim() else delta
            local.copy_((local.float() + rows.to(local.device)).to(local.dtype))


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a layer's weight is held (an FSDP shard's local device, for a sharded one)."""
    weight = module.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.device


def remove(model: torch.nn.Module, state: LoraState | None) -> None:
    """Undo apply() (state: what it returned; None: nothing applied): the hooks removed, the buffers
    dropped, the merged tensors' rows restored from their backups."""
    from .streamed import _my_rows

    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    modules = dict(model.named_modules())
    for owner, name in state.buffers:
        modules[owner]._buffers.pop(name, None)
    if state.backups:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for model_key, backup in state.backups.items():
                local, _ = _my_rows(params[model_key])
                local.copy_(backup.to(local.device))


__all__ = ["Patch", "LoraReport", "LoraState", "read_lora", "apply", "remove", "stem_lookup", "inverse_source"]

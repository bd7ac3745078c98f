"""The generic loader nodes: a diffusion model (one file, or a two-expert model's two), text encoders, the text
encode, and a LoRA on a loaded model. The model family comes from the files, as ComfyUI's own loaders find it;
nothing here names a family."""

from __future__ import annotations

import math

from ..distributed import api, models
from ..distributed.formats.checkpoint import read_header
from . import services, socket_types
from .common import TIP_GROUP, TIP_TEXT
from .model_socket import ModelSocket, load_model
from .v3 import CATEGORY, advanced, io, schema

NONE = "none"

TIP_LORA = ("A LoRA from models/loras (.safetensors): lora_up/lora_down or lora_A/lora_B (with alpha), and the "
            "diff/diff_b keys of distillation LoRAs, in ComfyUI's key names for this model.")
TIP_STRENGTH = "How much of the LoRA to add (ComfyUI's strength_model): 1.0 as trained, 0 for none, negative to subtract."
# every family's expert names (Wan 2.2 A14B: high_noise, low_noise), for the LoRA and sampler expert choices
EXPERT_NAMES = list(dict.fromkeys(name for family in models.FAMILIES.values() for name in family.experts))
ALL_EXPERTS = "all"


def load_diffusion_model(group, model_name: str, low_noise_model_name: str = NONE) -> tuple[ModelSocket, str]:
    """The generic loader's work: one file, or a two-expert model's files in expert order; the family is the
    files' (api.check_model)."""
    names = [model_name] + ([low_noise_model_name] if low_noise_model_name not in ("", NONE) else [])
    return load_model(group, names if len(names) > 1 else names[0], None)


class UspLoadDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = services.list_models("diffusion_models")
        return schema(
            node_id="UspLoadDiffusionModel", display_name="USP Load Diffusion Model", category=CATEGORY,
            description=("Loads a video diffusion model on every rank of the USP group; its family (Wan 2.1, Wan 2.2, "
                         "HunyuanVideo...) is read from the file, as ComfyUI's Load Diffusion Model does. A "
                         "two-expert model (Wan 2.2 A14B) takes its low-noise file too; both stay loaded."),
            search_aliases=["UNETLoader", "load diffusion model", "multi-gpu loader", "wan loader", "hunyuan loader"],
            inputs=[
                socket_types.Group.Input("group", tooltip=TIP_GROUP),
                io.Combo.Input("model_name", options=files, tooltip=(
                    "A DiT from models/diffusion_models (.safetensors in fp16, bf16 or fp8_e4m3fn, or .gguf); for a "
                    "two-expert model, its high-noise expert.")),
                io.Combo.Input("low_noise_model_name", options=[NONE, *files], default=NONE, tooltip=(
                    "none for a one-file model. Wan 2.2 A14B: the low-noise expert (late steps), e.g. "
                    "wan2.2_t2v_low_noise_14B_fp16.safetensors.")),
            ],
            outputs=[socket_types.Model.Output("model", tooltip="For USP Sampler, USP Sampler Advanced and USP LoRA."),
                     io.String.Output("info", tooltip="What was loaded, and how it is split across the ranks.")],
        )

    @classmethod
    def execute(cls, group, model_name, low_noise_model_name=NONE):
        return io.NodeOutput(*load_diffusion_model(group, model_name, low_noise_model_name))


def text_encoder_socket(group, files: list[str], tokenizer_folder: str = "") -> dict:
    """The text-encoder socket for these weight files (their order: the family's text parts' order): the family
    whose text encoding takes that many files; a part that is a tokenizer folder is tokenizer_folder, or the
    tokenizers ComfyUI ships."""
    by_parts = {}
    for family in models.FAMILIES.values():  # families sharing a text encoder (the Wan ones) give one entry
        if family.text_parts:  # (a family whose text is encoded by ComfyUI's own nodes only takes no part here)
            by_parts.setdefault(tuple(part.input for part in family.text_parts), family)
    counted = [f for f in by_parts.values() if len([p for p in f.text_parts if not p.tokenizers]) == len(files)]
    # families taking as many files tell theirs apart by the files' tensors (their headers, read here)
    headers = [read_header(services.model_path("text_encoders", name))[0] for name in files] if len(counted) > 1 else []
    fitting = [f for f in counted if len(counted) == 1 or f.takes_text_files(headers)]
    if not fitting and counted:
        found = "; ".join(models.describe_keys(h) for h in headers)
        takes = "; ".join(f"{f.label} takes " + ", ".join(p.help.split(" .safetensors")[0] for p in f.text_parts
                                                          if not p.tokenizers) for f in counted)
        raise ValueError(f"the text encoder files {', '.join(files)} ({found}) are not those of "
                         f"{' or '.join(f.label for f in counted)}: {takes}")
    if not fitting:
        counts = sorted({len([p for p in f.text_parts if not p.tokenizers]) for f in by_parts.values()})
        raise ValueError(f"{len(files)} text encoder file(s) given; the families take {' or '.join(map(str, counts))}")
    if len(fitting) > 1:
        raise ValueError(f"{len(files)} text encoder file(s) fit {' and '.join(f.label for f in fitting)}; the files "
                         "alone do not say which")
    family = fitting[0]
    paths = iter(services.model_path("text_encoders", name) for name in files)
    chosen = {}
    for part in family.text_parts:
        if part.tokenizers:
            folder = tokenizer_folder.strip()
            folder = services.model_folder("text_encoders", folder) if folder else services.comfyui_dir()
            if folder is None:
                raise ValueError("tokenizer_folder: outside ComfyUI there are no bundled tokenizers; give a folder "
                                 "with llama/ and clip/ (e.g. from `usp-video make-tiny-models`)")
            chosen[part.input] = str(folder)
        else:
            chosen[part.input] = next(paths)
    return {"group": group, "family": family.name, "files": chosen}


class UspLoadTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = services.list_models("text_encoders")
        return schema(
            node_id="UspLoadTextEncoder", display_name="USP Load Text Encoder", category=CATEGORY,
            description=("Loads a video model's text encoder(s) on rank 0 of the USP group (sharded across the ranks "
                         "when it does not fit): UMT5 for Wan; LLaVA-Llama-3 with CLIP-L for HunyuanVideo. The same "
                         "files as native CLIPLoader / DualCLIPLoader."),
            search_aliases=["CLIPLoader", "DualCLIPLoader", "load clip", "umt5", "text encoder"],
            inputs=[
                socket_types.Group.Input("group", tooltip=TIP_GROUP),
                io.Combo.Input("text_encoder_name", options=files, tooltip=(
                    "From models/text_encoders: umt5_xxl_fp16.safetensors (Wan), or "
                    "llava_llama3_fp8_scaled.safetensors (HunyuanVideo, with clip_name).")),
                io.Combo.Input("clip_name", options=[NONE, *files], default=NONE, tooltip=(
                    "none for Wan. HunyuanVideo: clip_l.safetensors.")),
                advanced(io.String.Input, "tokenizer_folder", default="", tooltip=(
                    "HunyuanVideo: a folder with the Llama 3 and CLIP tokenizers (a path, or a folder's name in "
                    "models/text_encoders). Empty: the ones ComfyUI ships.")),
            ],
            outputs=[socket_types.TextEncoder.Output("text_encoder", tooltip="For USP Text Encode.")],
        )

    @classmethod
    def execute(cls, group, text_encoder_name, clip_name=NONE, tokenizer_folder=""):
        files = [text_encoder_name] + ([clip_name] if clip_name not in ("", NONE) else [])
        return io.NodeOutput(text_encoder_socket(group, files, tokenizer_folder))


def encode_text(text_encoder: dict, text: str) -> list:
    """A prompt's CONDITIONING with a USP text encoder, in ComfyUI's format: [[tokens, {the family's other
    tensors under their ComfyUI names (pooled_output)}]]."""
    cond = api.encode(text_encoder["group"], text_encoder["family"], text_encoder["files"], text)
    return [[cond["tokens"], {key: value for key, value in cond.items() if key != "tokens"}]]


class UspTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspTextEncode", display_name="USP Text Encode", category=CATEGORY,
            description=("Encodes a prompt with a USP text encoder; the CONDITIONING equals native CLIPTextEncode's "
                         "with the same files (HunyuanVideo's carries CLIP-L's pooled output too)."),
            search_aliases=["CLIPTextEncode", "prompt", "text encode"],
            inputs=[socket_types.TextEncoder.Input("text_encoder", tooltip="From USP Load Text Encoder."),
                    io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=TIP_TEXT)],
            outputs=[io.Conditioning.Output("CONDITIONING")],
        )

    @classmethod
    def execute(cls, text_encoder, text):
        return io.NodeOutput(encode_text(text_encoder, text))


def with_lora(model: dict, paths: list[str], lora_path: str, strength: float) -> dict:
    """A copy of a model socket whose experts in `paths` get one more LoRA at the end of their chain. Nothing is
    read here: every rank applies the chain when the sampler runs (unmerged: a new strength never reloads)."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    chains = {path: list(chain) for path, chain in model.get("loras", {}).items()}
    for path in paths:
        chains[path] = chains.get(path, []) + [[lora_path, float(strength)]]
    return {**model, "loras": chains}


def expert_paths(model: ModelSocket, expert: str, input_name: str = "expert") -> list[str]:
    """The DiT files of the model socket that `expert` names ("all", or one of its family's expert names)."""
    if expert == ALL_EXPERTS:
        return list(model["experts"])
    family = models.get(model["info"]["family"])
    if expert not in family.experts or len(model["experts"]) != len(family.experts):
        has = f"its experts: {', '.join(family.experts)}" if family.experts else "it is one model, not experts"
        raise ValueError(f"{input_name}: this {model['info']['model']} has no expert {expert!r} ({has}); "
                         f"choose {ALL_EXPERTS}")
    return [model["experts"][family.experts.index(expert)]]


class UspLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="UspLoraLoader", display_name="USP LoRA", category=CATEGORY,
            description=("Adds a LoRA to a USP model; chain several. Every rank applies it when the sampler runs; a "
                         "new strength does not reload the model. A two-expert model takes a LoRA per expert "
                         "(distillation LoRAs come as a high-noise and a low-noise file)."),
            search_aliases=["LoraLoaderModelOnly", "lora"],
            inputs=[socket_types.Model.Input("model", tooltip="From USP Load Diffusion Model (or another USP LoRA)."),
                    io.Combo.Input("lora_name", options=services.list_models("loras"), tooltip=TIP_LORA),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=TIP_STRENGTH),
                    io.Combo.Input("expert", options=[ALL_EXPERTS, *EXPERT_NAMES], default=ALL_EXPERTS, tooltip=(
                        "Which expert of a two-expert model takes it (Wan 2.2 A14B: high_noise for the early steps, "
                        "low_noise for the late ones); all for every other model."))],
            outputs=[socket_types.Model.Output("model")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, expert=ALL_EXPERTS):
        paths = expert_paths(model, expert)
        return io.NodeOutput(with_lora(model, paths, services.model_path("loras", lora_name), strength))


NODES = [UspLoadDiffusionModel, UspLoadTextEncoder, UspTextEncode, UspLoraLoader]

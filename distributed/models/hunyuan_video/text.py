"""HunyuanVideo's text encoders: the LLaVA-Llama-3 text model plus CLIP-L (transformers).

As HunyuanVideo (and ComfyUI's DualCLIPLoader type hunyuan_video) encodes a prompt:
  - Llama: the prompt inside HunyuanVideo's system template; hidden states of the third-to-last
    layer; the template tokens cropped off, leaving the prompt's tokens and the closing <|eot_id|>
    (at most 256 tokens, HunyuanVideo's max_sequence_length). No padding: [1, tokens, 4096].
  - CLIP-L: the prompt in 77 tokens; the pooled output (final-norm EOS token, no projection): [1, 768].

Weights come from ComfyUI's text_encoders files (llava_llama3_*.safetensors, clip_l.safetensors)
or diffusers folders (text_encoder / text_encoder_2). Tokenizers come from a folder: ComfyUI's own
(comfy/text_encoders/llama_tokenizer and comfy/sd1_tokenizer), a diffusers pipeline folder
(tokenizer / tokenizer_2), or a folder with llama/ and clip/ subfolders (our tiny models).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header

LLAMA_CONFIG_KEY = "usp_video.llama_config"
CLIP_CONFIG_KEY = "usp_video.clip_config"
MAX_TOKENS = 256
LLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes "
    "of the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and "
    "transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")

# The text model of xtuner/llava-llama-3-8b-v1_1-transformers (what HunyuanVideo ships).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                vocab_size=128320)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", eos_token_id=49407,
              projection_dim=768)


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", keep_fp8: bool = True,
               shard=None):
    """The Llama text model of LLaVA-Llama-3 from ComfyUI's llava_llama3_*.safetensors (fp16/bf16/fp8,
    scaled fp8) or a diffusers text_encoder folder. A single file is read tensor by tensor into a model
    built on the meta device (formats/streamed.py; its lm_head is not read); with shard(model) (FSDP2 over
    the ranks) each rank reads only its shards. The decoder layers' Linear weights of an fp8 file stay
    in fp8 (formats/fp8.py). A folder loads whole (from_pretrained), then is sharded."""
    from transformers import LlamaConfig, LlamaModel

    path = Path(path)
    if path.is_dir():
        model = from_folder(LlamaModel, path, dtype, device, "a diffusers text_encoder (LlamaModel) folder")
        if shard is not None:
            shard(model)
        return model
    shapes, metadata = read_header(path)
    keys = {k.removeprefix("model.") for k in shapes}
    if "embed_tokens.weight" not in keys or "layers.0.self_attn.q_proj.weight" not in keys:
        raise CheckpointError(f"{path.name} is not a Llama text encoder; HunyuanVideo needs "
                              "llava_llama3_fp8_scaled.safetensors (or _fp16) in models/text_encoders")
    config = config_from_metadata(metadata, LLAMA_CONFIG_KEY)
    if config is None:
        vocab, hidden = shapes.get("model.embed_tokens.weight", shapes.get("embed_tokens.weight"))[0]
        layers = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("layers."))
        kv = shapes[next(k for k in shapes if k.endswith("layers.0.self_attn.k_proj.weight"))][0][0]
        inter = shapes[next(k for k in shapes if k.endswith("layers.0.mlp.gate_proj.weight"))][0][0]
        config = dict(LLAMA_8B, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      intermediate_size=inter, num_attention_heads=hidden // 128, num_key_value_heads=kv // 128)
    model = streamed.load(lambda: LlamaModel(LlamaConfig(**config)), path,
                          lambda state: {k: v for k, v in state.items() if not k.startswith("lm_head.")}, dtype,
                          device, "a Llama text model", keep_within=("layers.",) if keep_fp8 else (), shard=shard,
                          prefixes=("model.",))
    model.rotary_emb = type(model.rotary_emb)(model.config).to(device)  # non-persistent buffers: not in the file
    return model


def load_clip_l(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """CLIP-L's text model from ComfyUI's clip_l.safetensors (read tensor by tensor, formats/streamed.py;
    small: never sharded) or a diffusers text_encoder_2 folder (loaded whole, from_pretrained)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    if path.is_dir():
        return from_folder(CLIPTextModel, path, dtype, device, "a diffusers text_encoder_2 (CLIPTextModel) folder")
    shapes, metadata = read_header(path)
    if "text_model.embeddings.token_embedding.weight" not in shapes:
        raise CheckpointError(f"{path.name} is not a CLIP text encoder; HunyuanVideo needs clip_l.safetensors "
                              "in models/text_encoders")
    config = config_from_metadata(metadata, CLIP_CONFIG_KEY)
    if config is None:
        vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"][0]
        layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
        config = dict(CLIP_L, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64,
                      intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0][0],
                      max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0][0])
    with torch.device("meta"):
        prefixed = any(k.startswith("text_model.") for k in CLIPTextModel(CLIPTextConfig(**config)).state_dict())

    def convert(state: dict) -> dict:
        # the text model's weights (not the projection, nor the position ids: a buffer built below);
        # transformers 5 names them without the "text_model." prefix
        return {(k if prefixed else k.removeprefix("text_model.")): v for k, v in state.items()
                if k.startswith("text_model.") and not k.endswith("position_ids")}

    model = streamed.load(lambda: CLIPTextModel(CLIPTextConfig(**config)), path, convert, dtype, device,
                          "CLIP-L's text model", prefixes=())
    embeddings = getattr(model, "text_model", model).embeddings
    embeddings.register_buffer("position_ids", torch.arange(config["max_position_embeddings"], device=device)
                               .unsqueeze(0), persistent=False)
    return model


def tokenizer_folders(folder: str | Path) -> tuple[Path, Path]:
    """(llama, clip) tokenizer folders inside `folder` (see module docstring)."""
    folder = Path(folder)
    for llama, clip in (("llama", "clip"), ("tokenizer", "tokenizer_2"),
                        ("comfy/text_encoders/llama_tokenizer", "comfy/sd1_tokenizer"),
                        ("text_encoders/llama_tokenizer", "sd1_tokenizer")):
        if (folder / llama).is_dir() and (folder / clip).is_dir():
            return folder / llama, folder / clip
    raise CheckpointError(f"no tokenizers found in {folder}: expected llama/ and clip/ subfolders, a diffusers "
                          "HunyuanVideo folder (tokenizer/, tokenizer_2/) or a ComfyUI folder "
                          "(comfy/text_encoders/llama_tokenizer, comfy/sd1_tokenizer)")


def load_tokenizers(folder: str | Path):
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    llama_dir, clip_dir = tokenizer_folders(folder)
    if not (llama_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{llama_dir} has no tokenizer.json (the Llama 3 tokenizer file); copy it from "
                              "ComfyUI's comfy/text_encoders/llama_tokenizer or the HunyuanVideo tokenizer folder")
    llama = PreTrainedTokenizerFast.from_pretrained(str(llama_dir), local_files_only=True)
    clip = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    return llama, clip


class HunyuanTextEncoder:
    def __init__(self, llama, clip, llama_tokenizer, clip_tokenizer):
        self.llama, self.clip = llama, clip
        self.llama_tokenizer, self.clip_tokenizer = llama_tokenizer, clip_tokenizer
        self.prefix_ids = llama_tokenizer(LLAMA_TEMPLATE.split("{}")[0])["input_ids"]
        self.crop_start = len(self.prefix_ids)  # 95 with the Llama 3 tokenizer

    def llama_ids(self, prompt: str) -> torch.Tensor:
        ids = self.llama_tokenizer(LLAMA_TEMPLATE.format(prompt))["input_ids"]
        if ids[: self.crop_start] != self.prefix_ids:
            raise ValueError("the Llama tokenizer splits HunyuanVideo's prompt template differently from the "
                             "template alone; is it the Llama 3 tokenizer?")
        return torch.tensor([ids[: self.crop_start + MAX_TOKENS]])

    def third_to_last_layer(self, ids: torch.Tensor) -> torch.Tensor:
        """hidden_states[-3] of the Llama: the output of its third-to-last layer, taken with a hook
        (transformers' own output_hidden_states does not see layers wrapped by FSDP)."""
        taken = {}

        def take(module, args, output):
            taken["hidden"] = output[0] if isinstance(output, tuple) else output

        handle = self.llama.layers[-3].register_forward_hook(take)
        try:
            self.llama(input_ids=ids)
        finally:
            handle.remove()
        return taken["hidden"]

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [1, n, hidden] float32, pooled [1, 768] float32) on the CPU."""
        device = next(self.llama.parameters()).device
        ids = self.llama_ids(prompt).to(device)
        tokens = self.third_to_last_layer(ids)[:, self.crop_start:]
        clip_ids = self.clip_tokenizer(prompt, padding="max_length", truncation=True,
                                       max_length=self.clip.config.max_position_embeddings,
                                       return_tensors="pt")["input_ids"]
        pooled = self.clip(input_ids=clip_ids.to(next(self.clip.parameters()).device)).pooler_output
        return tokens.float().cpu(), pooled.float().cpu()


# -- tiny tokenizers (for the tiny model set) --------------------------------------------------------

def write_tiny_tokenizers(folder: str | Path, corpus: list[str]) -> Path:
    """A small Llama-3-style byte-level BPE (with its special tokens) and a CLIP-format
    vocabulary, in the same file formats as the real ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    llama_dir, clip_dir = folder / "llama", folder / "clip"
    llama_dir.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + [LLAMA_TEMPLATE], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(llama_dir / "tokenizer.json"))
    (llama_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "model_max_length": 8192}))

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level characters CLIP's BPE works on
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    (clip_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77}))
    return folder

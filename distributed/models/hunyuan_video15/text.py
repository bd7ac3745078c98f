"""HunyuanVideo 1.5's text encoders (transformers classes), as its reference pipeline encodes a prompt:

  - Qwen2.5-VL 7B's text model (3584 wide): the prompt in Qwen's chat template under HunyuanVideo 1.5's system
    message, hidden states of the third-to-last layer (hidden_states[-3]), the template's head (system turn and
    the user header) cropped off: [1, n, 3584] (the prompt's tokens and the template's tail, no padding);
  - ByT5 (the Glyph-SDXL-v2 byt5-small, 1472 wide): the quoted texts of the prompt ("...", “...”, ‘...’, as
    ComfyUI's tokenizer finds them) as 'Text "...". ', last hidden state: [1, g, 1472]; nothing when the prompt
    quotes nothing.

Weights from ComfyUI's text_encoders files (qwen_2.5_vl_7b(_fp8_scaled).safetensors: the language model under
`model.`, the vision tower and lm_head left unread; byt5_small_glyphxl_fp16.safetensors: T5 names) or
transformers folders. The Qwen tokenizer from a folder (tokenizer.json + tokenizer_config.json; ComfyUI's
comfy/text_encoders/qwen25_tokenizer, a diffusers HunyuanVideo 1.5 folder's tokenizer/, or qwen/ of ours); ByT5's
needs no file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, config_from_metadata, from_folder, read_header

QWEN_CONFIG_KEY = "usp_video.qwen25vl_config"
BYT5_CONFIG_KEY = "usp_video.byt5_config"
MAX_TOKENS = 1000  # the reference pipeline's tokenizer_max_length
# The reference pipeline's system message, verbatim (its line continuations keep the indentation's spaces).
SYSTEM = ("You are a helpful assistant. Describe the video by detailing the following aspects:         "
          "1. The main content and theme of the video.         "
          "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
          "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
          "4. background environment, light, style and atmosphere.         "
          "5. camera angles, movements, and transitions used in the video.")
TEMPLATE = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Qwen2.5-VL 7B's language model
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=128000,
               vocab_size=152064, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
BYT5_SMALL = dict(d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12, vocab_size=1510,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def is_qwen_keys(keys: set[str]) -> bool:
    return "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.bias" in keys


def is_byt5_keys(keys: set[str]) -> bool:
    return "encoder.block.0.layer.0.SelfAttention.o.weight" in keys


def _count(keys, prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix))


def load_qwen(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", keep_fp8: bool = True, shard=None):
    """Qwen2.5-VL's language model (transformers' Qwen2_5_VLTextModel) from ComfyUI's single file (streamed, each
    rank reading its shards with shard(model); fp8 layers kept fp8) or a folder (loaded whole, then sharded)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    path = Path(path)
    if path.is_dir():
        model = from_folder(Qwen2_5_VLTextModel, path, dtype, device, "a Qwen2.5-VL text model folder")
        if shard is not None:
            shard(model)
        return model
    shapes, metadata = read_header(path)
    if not is_qwen_keys(set(shapes)):
        raise CheckpointError(f"{path.name} is not a Qwen2.5-VL text encoder; HunyuanVideo 1.5 needs "
                              "qwen_2.5_vl_7b_fp8_scaled.safetensors (or the fp16 one) in models/text_encoders")
    config = config_from_metadata(metadata, QWEN_CONFIG_KEY)
    if config is None:
        vocab, hidden = shapes["model.embed_tokens.weight"][0]
        heads = shapes["model.layers.0.self_attn.q_proj.weight"][0][0] // 128
        config = dict(QWEN_7B, vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                      num_hidden_layers=_count(shapes, "model.layers."),
                      num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0][0] // 128,
                      intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0][0])
    model = streamed.load(lambda: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**config)), path,
                          lambda state: {k: v for k, v in state.items() if not k.startswith(("visual.", "lm_head."))},
                          dtype, device, "Qwen2.5-VL's text model", keep_within=("layers.",) if keep_fp8 else (),
                          shard=shard, prefixes=("model.",))
    model.rotary_emb = type(model.rotary_emb)(model.config).to(device)  # non-persistent buffers: not in the file
    return model


def load_byt5(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """The ByT5 glyph encoder (transformers' T5EncoderModel) from ComfyUI's byt5_small_glyphxl file (small: never
    sharded) or a folder."""
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    if path.is_dir():
        return from_folder(T5EncoderModel, path, dtype, device, "a ByT5 (T5EncoderModel) folder")
    shapes, metadata = read_header(path)
    if not is_byt5_keys(set(shapes)):
        raise CheckpointError(f"{path.name} is not a ByT5 text encoder; HunyuanVideo 1.5 needs "
                              "byt5_small_glyphxl_fp16.safetensors in models/text_encoders")
    config = config_from_metadata(metadata, BYT5_CONFIG_KEY)
    if config is None:
        vocab, d_model = shapes["shared.weight"][0]
        heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][0][1]
        config = dict(BYT5_SMALL, vocab_size=vocab, d_model=d_model, num_heads=heads,
                      d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0][0] // heads,
                      num_layers=_count(shapes, "encoder.block."),
                      d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0][0])

    def convert(state: dict) -> dict:
        state = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
        state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
        return {k: v for k, v in state.items() if v is not None}

    return streamed.load(lambda: T5EncoderModel(T5Config(**config)), path, convert, dtype, device, "ByT5",
                         prefixes=())


def tokenizer_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    for sub in ("qwen", "tokenizer", "comfy/text_encoders/qwen25_tokenizer", "text_encoders/qwen25_tokenizer"):
        if (folder / sub / "tokenizer.json").is_file():
            return folder / sub
    raise CheckpointError(f"no Qwen tokenizer in {folder}: expected qwen/tokenizer.json, a diffusers HunyuanVideo 1.5 "
                          "folder (tokenizer/) or a ComfyUI folder (comfy/text_encoders/qwen25_tokenizer)")


def load_tokenizer(folder: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_folder(folder)), local_files_only=True)


def glyph_text(prompt: str) -> str | None:
    """The quoted texts of a prompt as ByT5 reads them (ComfyUI's HunyuanImageTokenizer): 'Text "a". Text "b". '."""
    found = [*re.findall(r'\"(.*?)\"', prompt), *re.findall(r"‘(.*?)’", prompt), *re.findall(r"“(.*?)”", prompt)]
    return "".join(f'Text "{text}". ' for text in found) or None


def _layer_output(layers, index: int, run) -> torch.Tensor:
    """The output of layers[index] during run() (a hook: transformers' own hidden states miss FSDP-wrapped layers)."""
    taken = {}

    def take(module, args, output):
        taken["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = layers[index].register_forward_hook(take)
    try:
        run()
    finally:
        handle.remove()
    return taken["hidden"]


class HunyuanVideo15TextEncoder:
    def __init__(self, qwen, byt5, tokenizer):
        from transformers import ByT5Tokenizer

        self.qwen, self.byt5, self.tokenizer, self.byt5_tokenizer = qwen, byt5, tokenizer, ByT5Tokenizer()
        self.prefix_ids = tokenizer(TEMPLATE.split("{}")[0], add_special_tokens=False)["input_ids"]
        self.crop_start = len(self.prefix_ids)  # the reference pipeline's 108 with Qwen's tokenizer

    def qwen_ids(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(TEMPLATE.format(prompt or " "), add_special_tokens=False)["input_ids"]
        if ids[: self.crop_start] != self.prefix_ids:
            raise ValueError("the Qwen tokenizer splits HunyuanVideo 1.5's prompt template differently from the "
                             "template alone; is it Qwen2.5's tokenizer?")
        return torch.tensor([ids[: self.crop_start + MAX_TOKENS]])

    @torch.no_grad()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        """-> {"tokens": [1, n, 3584], "conditioning_byt5small": [1, g, 1472] when the prompt quotes text}, float32
        on the CPU."""
        device = next(self.qwen.parameters()).device
        ids = self.qwen_ids(prompt).to(device)
        hidden = _layer_output(self.qwen.layers, -3, lambda: self.qwen(input_ids=ids))
        out = {"tokens": hidden[:, self.crop_start:].float().cpu()}
        glyphs = glyph_text(prompt)
        if glyphs is not None:
            byt5_ids = torch.tensor([self.byt5_tokenizer(glyphs)["input_ids"]], device=next(self.byt5.parameters()).device)
            out["conditioning_byt5small"] = self.byt5(input_ids=byt5_ids).last_hidden_state.float().cpu()
        return out


# -- the tiny Qwen tokenizer (for the tiny model set) -------------------------------------------------------

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_tokenizer(folder: str | Path, corpus: list[str]) -> Path:
    """A small byte-level BPE with Qwen's special tokens and a Qwen-style chat template, in the real file format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder) / "qwen"
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + [TEMPLATE], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE}))
    return folder.parent

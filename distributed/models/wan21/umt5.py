"""UMT5 text encoder for Wan 2.1 (transformers' UMT5EncoderModel), from ComfyUI's text_encoders
single file (tokenizer carried under the key "spiece_model") or a diffusers pipeline folder.

Output follows native ComfyUI CLIPTextEncode with a Wan umt5 model: hidden states
[1, max(512, n), d_model] where n counts the prompt tokens plus EOS, and every position past n
is zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...formats import streamed
from ...formats.checkpoint import CheckpointError, from_folder, read_header

MIN_LENGTH = 512
EOS_ID, PAD_ID = 1, 0


class Umt5TextEncoder:
    def __init__(self, model, spiece_proto: bytes):
        import sentencepiece

        self.model = model
        self.tokenizer = sentencepiece.SentencePieceProcessor(model_proto=spiece_proto)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt) + [EOS_ID]

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, max(512, n), d_model] float32, zero past the n real tokens."""
        ids = self.tokenize(prompt)
        length = max(MIN_LENGTH, len(ids))
        input_ids = torch.full((1, length), PAD_ID, dtype=torch.long)
        input_ids[0, : len(ids)] = torch.tensor(ids)
        mask = torch.zeros((1, length), dtype=torch.long)
        mask[0, : len(ids)] = 1
        device = next(self.model.parameters()).device
        hidden = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = hidden.float().cpu()
        hidden[:, len(ids):] = 0
        return hidden


def umt5_config_from_shapes(shapes: dict) -> dict:
    heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][0][1]
    vocab, d_model = shapes["shared.weight"][0]
    return dict(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
    )


def load_umt5(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", keep_fp8: bool = True,
              shard=None) -> Umt5TextEncoder:
    """UMT5's encoder with its tokenizer. A single file is read tensor by tensor into a model built on the
    meta device (formats/streamed.py); with shard(model) (FSDP2 over the ranks) each rank reads only its
    shards. The embedding is one parameter under two names (shared, encoder.embed_tokens), read once from
    the file's shared.weight. The blocks' Linear weights of an fp8 file stay in fp8 (formats/fp8.py), but
    `wo`, which transformers keeps in float32. A diffusers folder loads whole (from_pretrained), then is
    sharded."""
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if path.is_dir():
        spiece = next((p for p in (path / "spiece.model", path.parent / "tokenizer" / "spiece.model") if p.is_file()), None)
        if spiece is None or not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: expected a diffusers 'text_encoder' folder (config.json) with "
                                  "a sibling 'tokenizer' folder holding spiece.model")
        model = from_folder(UMT5EncoderModel, path, dtype, device, "a transformers UMT5EncoderModel folder", shard)
        return Umt5TextEncoder(model, spiece.read_bytes())

    shapes, _ = read_header(path)
    if "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" not in shapes:
        from .. import describe_keys

        kind = "a T5 text encoder without UMT5's per-layer position bias" if "shared.weight" in shapes \
            else describe_keys(shapes)
        raise CheckpointError(f"{path.name} is not a UMT5 text encoder ({kind}); Wan 2.1 needs "
                              "umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    if "spiece_model" not in shapes:
        raise CheckpointError(f"{path.name} carries no tokenizer (key 'spiece_model'); use ComfyUI's "
                              "repackaged umt5_xxl file, which does")
    spiece = streamed.TensorFile(path).read("spiece_model").numpy().tobytes()
    config = UMT5Config(**umt5_config_from_shapes(shapes))
    model = streamed.load(lambda: UMT5EncoderModel(config), path, _convert, dtype, device, "UMT5",
                          keep_within=("encoder.block.",) if keep_fp8 else (), shard=shard, prefixes=())
    return Umt5TextEncoder(model, spiece)


def _convert(state: dict) -> dict:
    """ComfyUI's umt5 file -> UMT5EncoderModel's names: the tokenizer is not a weight, and the encoder's
    embedding is the shared one."""
    state = {k: v for k, v in state.items() if k != "spiece_model"}
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    return state

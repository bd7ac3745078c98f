"""File formats, apart from the model families: what every family reads its files with.

- tensor_file.py: the leaf. CheckpointError, the safetensors header parser, TensorFile (rows read on demand
  with positional reads). It imports nothing from the pack.
- fp8.py: fp8 weights kept in fp8 (ComfyUI's fp8 and "scaled fp8" files), fp8 compute.
- gguf.py: GGUF DiT files (city96's), kept quantized, dequantized per layer.
- checkpoint.py: the format dispatch (safetensors or GGUF header; pickles refused) and the helpers a
  family's loader uses (prefixes, dequantize, build on the meta device).
- streamed.py: a single file loaded tensor by tensor onto a meta model, each rank reading only its shards.
- lora.py: LoRA files read and applied unmerged on a loaded DiT.

Bottom up: tensor_file <- fp8, gguf <- checkpoint <- streamed <- lora. A family (models/<family>/) uses these
through its key conversion; nothing here knows a family: what differs per family is handed in (a key
conversion, the modules to keep compact, a LoRA's layer aliases).
"""

"""What the families' tiny random model sets share (for the demo and the tests; nothing is downloaded).

Each family package writes its own set (its tiny.py, FAMILY.make_tiny) in ComfyUI's models/ layout,
with the real architectures shrunk and the real on-disk formats, so that the tiny files load through
exactly the code that loads real checkpoints. `make_all(root)` writes every family's set.

Each family's tiny.py also carries its tiny debug config (as torchtitan's per-model debug configs): the inputs
of one forward of its tiny DiT, `tiny_inputs(shape, ...)`, and the fields of a SampleRequest for it,
`tiny_request(family, experts, shape, ...)`. The parity tests reach them by family name (tests/parity_targets.py),
so that the family's facts (latent channels, text width, pooled vector, guidance) are written once, there.
"""

from __future__ import annotations

from pathlib import Path


# The text the tiny tokenizers are trained on (prompts like the demo's and the tests').
CORPUS = """a cat walks on the beach at sunset, waves roll in slowly
a red car drives through a city street at night with neon lights
a dog runs across a green field, camera follows, cinematic lighting
slow motion shot of a hummingbird drinking from a flower
an astronaut rides a horse on the moon, earth in the background
timelapse of clouds over snowy mountains, high quality, detailed
bright colors, overexposed, static, blurred details, subtitles, worst quality, low quality
a bowl of fruit on a wooden table, soft light from a window
""".splitlines()



def make_all(root: str | Path) -> dict[str, dict[str, Path]]:
    """Every family's tiny set under root: {family name: {"dit", "vae", text inputs...: path}}."""
    from . import FAMILIES

    return {name: family.make_tiny(root) for name, family in FAMILIES.items()}


# city96's rules for what stays unquantized (ComfyUI-GGUF tools/convert.py): 1-D and small tensors, and
# the modulation tables, stay F32.
_GGUF_SMALL = 1024
_GGUF_F32_KEYS = (".modulation", "scale_shift_table")
# For random K-quant blocks (the gguf package cannot write them): the fp16 scale fields of each type, and a
# scale that keeps the weights' magnitudes below about 0.1 (as a trained model's are).
_RANDOM_BLOCK_SCALES = {"Q2_K": ((80, 82), 0.1 / 45), "Q3_K": ((108,), 0.1 / 128), "Q4_K": ((0, 2), 0.1 / 945),
                        "Q5_K": ((0, 2), 0.1 / 1953), "Q6_K": ((208,), 0.1 / 4064)}


def save_gguf(state: dict, path: str | Path, arch: str, qtype: str, seed: int = 0,
              metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write a DiT state dict (original / ComfyUI key names) as city96's GGUF files are written: `arch` in
    general.architecture ("wan", "hyvid"); 1-D, small and modulation tensors in F32; the others in qtype
    (F16 where their rows are not whole blocks of qtype and cannot be reshaped into 256-value rows; city96
    reshapes such a tensor to rows of 256 values, with its shape in `comfy.gguf.orig_shape.<name>`, as it
    does for Wan's 5-D patch_embedding). K-quants, which the gguf package cannot write, are random blocks
    (the file then holds other weights than `state`: a tiny test model's weights are random anyway).
    metadata: string fields to add (a tiny model's config, as its .safetensors file carries it).
    Returns {name: ggml type written}."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    written = {}
    for name, tensor in state.items():
        data = tensor.float().numpy()
        target = qtype
        if data.ndim <= 1 or data.size <= _GGUF_SMALL or any(k in name for k in _GGUF_F32_KEYS):
            target = "F32"
        block = gguf.GGML_QUANT_SIZES[kind[target]][0]
        if data.ndim > 4 or (data.ndim > 1 and data.shape[-1] % block and data.size % 256 == 0):
            writer.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in data.shape])
            data = data.reshape(-1, 256) if data.size % 256 == 0 else data.reshape(data.shape[0], -1)
        if data.shape[-1] % block:
            target = "F16"
        if target in _RANDOM_BLOCK_SCALES:
            fields, scale = _RANDOM_BLOCK_SCALES[target]
            size = gguf.GGML_QUANT_SIZES[kind[target]][1]
            blocks = rng.integers(0, 256, size=(data.size // block, size), dtype=np.uint8)
            for at in fields:
                values = (rng.uniform(0.2, 1.0, size=len(blocks)) * scale).astype(np.float16)
                blocks[:, at:at + 2] = values.view(np.uint8).reshape(-1, 2)
            raw = blocks.reshape(*data.shape[:-1], data.shape[-1] // block * size)
        else:
            raw = gguf.quants.quantize(data, kind[target])
        writer.add_tensor(name, raw, raw_dtype=kind[target])
        written[name] = target
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# The LoRA layouts the tiny sets carry (ComfyUI 0.3.64 reads each): kohya's (diffusion_model., lora_up/down,
# alpha), peft's under lora_unet_ (lora_A/lora_B, no alpha), a distillation LoRA's (pairs plus diff_b on the
# biases and diff on the q/k norms), and diffusion-pipe's for HunyuanVideo (transformer., the original names).
LORA_LAYOUTS = ("kohya", "peft", "distill", "diffusion_pipe")


def save_tiny_lora(shapes: dict[str, list[int]], path: str | Path, layout: str, within: tuple[str, ...],
                   seed: int = 0, rank: int = 4, aliases=None) -> Path:
    """A random LoRA, in one of LORA_LAYOUTS, for the 2-D weights of a DiT file (shapes: {original name:
    shape}) inside the modules named by `within` (the blocks). aliases(stem) -> [names]: the family's other
    LoRA names (diffusion_pipe takes its `transformer.` one)."""
    from safetensors.torch import save_file
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if not key.startswith(within) or len(shape) != 2 or not key.endswith(".weight"):
            continue
        stem = key[: -len(".weight")]
        down = torch.randn(rank, shape[1], generator=g) * 0.2
        up = torch.randn(shape[0], rank, generator=g) * 0.2
        if layout == "kohya" or layout == "distill":
            out[f"diffusion_model.{stem}.lora_down.weight"], out[f"diffusion_model.{stem}.lora_up.weight"] = down, up
            out[f"diffusion_model.{stem}.alpha"] = torch.tensor(float(rank) / 2)
            if layout == "distill" and f"{stem}.bias" in shapes:
                out[f"diffusion_model.{stem}.diff_b"] = torch.randn(shape[0], generator=g) * 0.05
        elif layout == "peft":
            name = f"lora_unet_{stem.replace('.', '_')}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        elif layout == "diffusion_pipe":
            name = next(a for a in aliases(stem) if a.startswith("transformer."))
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            raise ValueError(f"layout must be one of {', '.join(LORA_LAYOUTS)}, got {layout!r}")
    if layout == "distill":  # a full difference on the 1-D q/k norm weights, as distillation LoRAs carry
        for key, shape in sorted(shapes.items()):
            if key.startswith(within) and key.endswith(("norm_q.weight", "norm_k.weight")):
                out[f"diffusion_model.{key[: -len('.weight')]}.diff"] = torch.randn(shape, generator=g) * 0.05
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path

"""Regional torch.compile: each DiT block's forward compiled on its own, after USP and FSDP are applied.

Only `block.forward` is replaced by its compiled version; the module's hooks run around it, outside
the graphs, as before: the USP hooks (block 0's pre-hook shards the tokens) and FSDP2's (gather a
block's weight shards before it runs, free them after). The blocks of one model share one code
object, so one compilation serves them all (a new token count compiles once more, then with dynamic
shapes). Inside a block, multi-rank USP attention (its collectives, the ring's point-to-point passes)
and the third-party kernels run eagerly between graphs (usp_attention.py, kernels.py).

The group's `compile` option: off (the default everywhere), on (torch's inductor: generates Triton
kernels on GPUs, C++ on CPU, so it needs a C++ compiler there), aot_eager (traces the blocks through
torch.compile's front end without generating code: checks that compilation leaves the results
unchanged, on any machine; no speed gain).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Iterable

import torch

COMPILE = ("off", "on", "aot_eager")
# The torch.compile backend of each mode (a name, or a callable with torch.compile's backend signature)
BACKEND_OF: dict[str, object] = {"on": "inductor", "aot_eager": "aot_eager"}


def _cxx_compiler() -> str | None:
    return next((path for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name
                 for path in [shutil.which(name)] if path), None)


def check_compile(mode: str, device: torch.device | str) -> None:
    """ValueError when the compile mode is unknown or cannot run on this device."""
    if mode not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {mode!r}")
    if mode != "on":
        return
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("compile 'on' (inductor) generates Triton kernels on GPUs, and the triton package is not "
                         "installed: install it (pip install triton) or use compile 'off'")
    if device.type == "cpu" and _cxx_compiler() is None:
        raise ValueError("compile 'on' (inductor) generates C++ on CPU, and no C++ compiler was found (g++, clang++ "
                         "or $CXX): install one, use compile 'aot_eager' (checks compilation, no speed gain) or 'off'")


def compile_blocks(blocks: Iterable[torch.nn.Module], mode: str) -> int:
    """Compile each block's forward in place (its hooks stay outside the graphs); the number compiled."""
    if mode == "off":
        return 0
    # LoRAs (formats/lora.py) are forward hooks on the blocks' layers, added, changed and removed between runs;
    # by default torch does not guard compiled graphs on module hooks, so a graph compiled before a LoRA came
    # would run without it, silently. Guarding on them recompiles when the hooks change.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    count = 0
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=BACKEND_OF[mode])
        count += 1
    return count


def is_compiled(block: torch.nn.Module) -> bool:
    """Was this block's forward replaced by compile_blocks?"""
    return "forward" in vars(block) and hasattr(vars(block)["forward"], "_torchdynamo_orig_callable")

"""Where the models that are not running wait: on the device, or in host memory.

The group's `placement` option (GroupConfig.placement):
  keep     every model stays on the device once loaded (fastest; the most device memory).
  offload  a text encoder goes to host memory as soon as its prompt is encoded, and back to the
           device for the next prompt; an expert of a model made of several (Wan 2.2 A14B) waits in
           host memory while the other runs, and is loaded there when it is not the one to run
           first. The device memory they held is handed back (torch.cuda.empty_cache) at once.
  cpu      text encoders are loaded on the CPU and run there (they never take device memory, and
           are never sharded); the experts as with offload.

A move is torch's own `module.to(device)`: FSDP2-sharded modules support it (FSDPModule._apply
reshards, moves each rank's shards and re-registers them), so a rank only ever moves its shards.
On a CPU group the device is the host: the moves are no-ops, but the bookkeeping (`where`) is the
same, and the tests check it there.

A DiT loaded with the group's dit_offload is "offloaded": its FSDP shards always live in host memory
and FSDP copies each block's to the device as it runs, so it is never moved (moving it to the device
would undo the offload, and it takes no device memory while idle).
"""

from __future__ import annotations

import torch

from .config import PLACEMENTS

HOST = torch.device("cpu")


def modules_of(loaded) -> list[torch.nn.Module]:
    """The torch modules of a loaded model: the object itself, or the modules it holds as attributes
    (a text encoder wrapping its transformers model), or none (a tokenizer)."""
    if isinstance(loaded, torch.nn.Module):
        return [loaded]
    if isinstance(loaded, (tuple, list)):
        return [m for item in loaded for m in modules_of(item)]
    return [v for v in vars(loaded).values() if isinstance(v, torch.nn.Module)] if hasattr(loaded, "__dict__") else []


class Placement:
    """Moves loaded models between the device and host memory as the placement says, and remembers
    where each one is (`where`: slot -> "device", "host", "cpu" or "offloaded"), for the group's status and
    the tests."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {mode!r}")
        self.mode, self.device = mode, device
        self.where: dict[str, str] = {}

    @property
    def text_device(self) -> torch.device:
        """Where text encoders are loaded and run."""
        return HOST if self.mode == "cpu" else self.device

    @property
    def parks_text(self) -> bool:
        return self.mode == "offload"

    @property
    def parks_idle_experts(self) -> bool:
        return self.mode != "keep"

    def loaded(self, slot: str, where: str) -> None:
        """A model was loaded: on the "device", in "host" memory (an idle expert), on the "cpu" to run
        there (text encoders with placement cpu), or "offloaded" (a DiT with dit_offload); the last two are
        never moved."""
        self.where[slot] = where

    def forget(self, slot: str) -> None:
        self.where.pop(slot, None)

    def bring(self, slot: str, loaded) -> None:
        """To the device (before it runs), if it waits in host memory."""
        if self.where.get(slot) == "host":
            self._move(loaded, self.device)
            self.where[slot] = "device"

    def park(self, slot: str, loaded) -> None:
        """To host memory (it is idle), handing the device memory back."""
        if self.where.get(slot) == "device":
            self._move(loaded, HOST)
            self.where[slot] = "host"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _move(loaded, device: torch.device) -> None:
        for module in modules_of(loaded):
            module.to(device)

"""The GPUs a group is about to use, as this process sees them: what each card is, whether the machine can run a
group at all, and what differs between the cards.

The probe (`probe_cards`, torch's device properties and peer-access query; neither allocates on the cards) is
handed in, so that tests can describe any machine: a 5090 beside a 4090, cards without peer-to-peer, none at all.
Nothing here starts a process; client.UspGroup.start calls `check_machine` before it launches the ranks.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable, Sequence

# Dense bf16 tensor-core operations per streaming multiprocessor per clock, from the vendors' spec sheets (peak
# TFLOP/s / (SMs x boost clock)): V100/T4 1024, A100 2048, GeForce Ampere/Ada/Blackwell 512 (fp32 accumulate),
# H100 4096, B200 8192. Used only to name the slowest card of a mixed group; unknown architectures count 1024.
BF16_OPS_PER_SM_CLOCK = {(7, 0): 1024, (7, 5): 1024, (8, 0): 2048, (8, 6): 512, (8, 7): 512, (8, 9): 512,
                         (9, 0): 4096, (10, 0): 8192, (12, 0): 512}


@dataclass(frozen=True)
class Card:
    """One GPU. index: as this process numbers it (the group's `gpus` input); peers: the indices of the group's
    other cards it reaches peer-to-peer (NVLink or PCIe P2P; without it, traffic goes through host memory)."""

    index: int
    name: str
    memory_bytes: int
    capability: tuple[int, int]
    multiprocessors: int = 0
    clock_khz: int = 0
    peers: tuple[int, ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    @property
    def estimated_tflops(self) -> float:
        """Peak dense bf16 TFLOP/s as estimated from the SMs, the clock and the architecture (0 when unknown)."""
        per_clock = BF16_OPS_PER_SM_CLOCK.get(tuple(self.capability), 1024)
        return self.multiprocessors * self.clock_khz * 1e3 * per_clock / 1e12

    def describe(self, all_indices: Sequence[int]) -> str:
        others = [i for i in all_indices if i != self.index]
        if not others:
            p2p = ""
        elif set(others) <= set(self.peers):
            p2p = ", peer-to-peer with every other card"
        elif not self.peers:
            p2p = ", no peer-to-peer (through host memory)"
        else:
            p2p = f", peer-to-peer with GPU {','.join(map(str, self.peers))} only"
        return (f"GPU {self.index}: {self.name}, {self.memory_gib:.1f} GiB, capability "
                f"{self.capability[0]}.{self.capability[1]}{p2p}")


CardProbe = Callable[[Sequence[int]], list[Card]]


def probe_cards(indices: Sequence[int]) -> list[Card]:
    """The cards of these indices, from torch (cudaGetDeviceProperties and cudaDeviceCanAccessPeer)."""
    import torch

    cards = []
    for i in indices:
        props = torch.cuda.get_device_properties(i)
        peers = tuple(j for j in indices if j != i and torch.cuda.can_device_access_peer(i, j))
        cards.append(Card(i, props.name, int(props.total_memory), (props.major, props.minor),
                          int(props.multi_processor_count), int(getattr(props, "clock_rate", 0)), peers))
    return cards


def check_platform(system: str | None = None) -> None:
    """A ValueError on native Windows, before anything starts: the group's GPU collectives need NCCL, which
    torch does not ship for Windows, and its launcher needs a POSIX system."""
    system = platform.system() if system is None else system
    if system == "Windows":
        raise ValueError("usp-video groups do not run on native Windows: the ranks' GPU collectives need NCCL, which "
                         "torch does not ship for Windows. Run ComfyUI inside WSL2 (Ubuntu; NVIDIA's CUDA on WSL "
                         "driver gives the GPUs to it) or on Linux")


def all_peer_to_peer(cards: Sequence[Card]) -> bool:
    """Does every card reach every other peer-to-peer?"""
    indices = {c.index for c in cards}
    return all(indices - {c.index} <= set(c.peers) for c in cards)


def smallest_memory(cards: Sequence[Card]) -> Card:
    """The card with the least memory: the group's plans and pre-flights are sized to it (every rank holds the
    same share)."""
    return min(cards, key=lambda c: (c.memory_bytes, c.index))


def slowest(cards: Sequence[Card]) -> Card:
    return min(cards, key=lambda c: (c.estimated_tflops, c.index))


def mixed_warning(cards: Sequence[Card]) -> str | None:
    """A warning when the cards differ (model or memory), naming the slowest and the smallest; None when alike."""
    if len({(c.name, c.capability, c.memory_bytes) for c in cards}) <= 1:
        return None
    slow, small = slowest(cards), smallest_memory(cards)
    return (f"the group's GPUs differ ({'; '.join(f'GPU {c.index} {c.name}' for c in cards)}): every step waits for "
            f"the slowest card, GPU {slow.index} ({slow.name}, about {slow.estimated_tflops:.0f} bf16 TFLOP/s "
            f"estimated), and every rank gets an equal share, so plans are sized to the smallest memory, GPU "
            f"{small.index} ({small.name}, {small.memory_gib:.1f} GiB). Pick alike cards with the USP Group's gpus "
            "input (e.g. '0,1') for the fastest group")


def link_of(cards: Sequence[Card]) -> str:
    """The planner's link (planner.LINKS) for these cards: 'pcie' (through host memory) when a pair has no
    peer-to-peer; else 'nvlink' (peer-to-peer does not tell NVLink from PCIe P2P: USP_VIDEO_LINK says better)."""
    return "nvlink" if all_peer_to_peer(cards) else "pcie"


def check_machine(indices: Sequence[int], probe: CardProbe = probe_cards,
                  system: str | None = None) -> tuple[list[Card], list[str]]:
    """Before a GPU group starts: the platform check, then (cards, warnings). indices: the group's GPUs."""
    check_platform(system)
    cards = probe(indices) if indices else []
    warning = mixed_warning(cards) if cards else None
    return cards, [warning] if warning else []


def card_lines(cards: Sequence[Card]) -> list[str]:
    """One line per card for the group's info and the state box."""
    return [c.describe([d.index for d in cards]) for c in cards]

"""Sequence-parallel degrees, their validation, and the process groups of the 2-D mesh.

The sequence-parallel (SP) group of N ranks is laid out as a (ring, ulysses) grid:
global rank g = ring_rank * ulysses_degree + ulysses_rank. Ulysses groups are therefore
contiguous ranks (fastest links, usually the same node); ring groups stride across them.
Shard g of the token sequence lives on rank g, so after the Ulysses all-to-all each rank of
ring position c holds the contiguous chunk c of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


def valid_factorizations(world_size: int, num_heads: int) -> list[tuple[int, int]]:
    """All (ulysses_degree, ring_degree) pairs with product world_size and heads % ulysses == 0,
    largest Ulysses first."""
    pairs = []
    for ulysses in range(world_size, 0, -1):
        if world_size % ulysses == 0 and num_heads % ulysses == 0:
            pairs.append((ulysses, world_size // ulysses))
    return pairs


def resolve_degrees(world_size: int, num_heads: int, ulysses: int | str = "auto",
                    ring: int | str = "auto") -> tuple[int, int]:
    """Turn user degrees (ints or "auto") into a valid (ulysses_degree, ring_degree).

    "auto" prefers Ulysses as large as the heads and ranks allow (one all-to-all pair per layer
    is cheaper than a ring pass on fast links) and gives the rest to Ring.
    Raises ValueError naming every offending value and the valid choices.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    choices = valid_factorizations(world_size, num_heads)
    listed = ", ".join(f"ulysses={u} ring={r}" for u, r in choices)
    auto_u, auto_r = ulysses in ("auto", 0, None), ring in ("auto", 0, None)
    for name, value in (("ulysses", ulysses), ("ring", ring)):
        if not (value in ("auto", 0, None) or (isinstance(value, int) and value >= 1)):
            raise ValueError(f"{name} degree must be 'auto' or an integer >= 1, got {value!r}")
    if auto_u and auto_r:
        return choices[0]
    if auto_u:
        matches = [(u, r) for u, r in choices if r == ring]
    elif auto_r:
        matches = [(u, r) for u, r in choices if u == ulysses]
    else:
        matches = [(u, r) for u, r in choices if (u, r) == (ulysses, ring)]
    if matches:
        return matches[0]
    problems = []
    if not auto_u and num_heads % ulysses != 0:
        problems.append(f"ulysses={ulysses} does not divide the model's {num_heads} attention heads")
    if not auto_u and not auto_r and ulysses * ring != world_size:
        problems.append(f"ulysses x ring = {ulysses} x {ring} = {ulysses * ring}, but the group has {world_size} ranks")
    if not problems:
        given = f"ulysses={ulysses}" if not auto_u else f"ring={ring}"
        problems.append(f"{given} does not fit {world_size} ranks")
    raise ValueError("; ".join(problems) + f". Valid choices for {world_size} ranks and {num_heads} heads: {listed}")


@dataclass
class SequenceParallel:
    """The degrees and groups one rank needs for USP. Degree 1 everywhere means one process.

    Groups are None when the degree is 1, so a single process needs no torch.distributed.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = field(default=None, repr=False)  # all SP ranks
    ulysses_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses_degree


def build_sequence_parallel(ulysses_degree: int, ring_degree: int,
                            timeout: timedelta | None = None) -> SequenceParallel:
    """Create the Ulysses and Ring subgroups on an initialised default process group.

    Every rank must call this with the same degrees (new_group is collective). Subgroups do not
    inherit the default group's timeout: pass it, or a stuck peer blocks them for torch's default.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if ulysses_degree * ring_degree != world_size:
        raise ValueError(f"ulysses x ring = {ulysses_degree} x {ring_degree} != world size {world_size}")
    sp = SequenceParallel(ulysses_degree, ring_degree, rank, group=dist.group.WORLD)
    for r in range(ring_degree):  # contiguous Ulysses groups
        ranks = list(range(r * ulysses_degree, (r + 1) * ulysses_degree))
        group = dist.new_group(ranks, timeout=timeout) if ulysses_degree > 1 else None
        if rank in ranks:
            sp.ulysses_group = group
    for u in range(ulysses_degree):  # strided Ring groups
        ranks = list(range(u, world_size, ulysses_degree))
        group = dist.new_group(ranks, timeout=timeout) if ring_degree > 1 else None
        if rank in ranks:
            sp.ring_group = group
    return sp

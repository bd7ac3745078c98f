"""Sequence-parallel degrees, their validation, and the process groups of the 2-D mesh.

The sequence-parallel (SP) group of N ranks is laid out as a (ring, ulysses) grid:
SP rank g = ring_rank * ulysses_degree + ulysses_rank. Ulysses groups are therefore
contiguous ranks (fastest links, usually the same node); ring groups stride across them.
Shard g of the token sequence lives on SP rank g, so after the Ulysses all-to-all each rank of
ring position c holds the contiguous chunk c of the sequence.

With CFG-parallel (cfg degree 2) the world is a (cfg, ring, ulysses) mesh: ranks [0, N) form the
SP group that runs the conditional pass, ranks [N, 2N) the one that runs the unconditional pass,
and rank l of one half pairs with rank l of the other (cfg_group) to exchange their results.
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
    rank: int = 0  # within the SP group
    group: dist.ProcessGroup | None = field(default=None, repr=False)  # all SP ranks
    ulysses_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cfg_degree: int = 1
    cfg_rank: int = 0  # 0: the conditional pass, 1: the unconditional one
    cfg_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses_degree


def build_sequence_parallel(ulysses_degree: int, ring_degree: int, timeout: timedelta | None = None,
                            cfg_degree: int = 1) -> SequenceParallel:
    """Create the SP, Ulysses, Ring (and CFG) subgroups on an initialised default process group.

    Every rank must call this with the same degrees (new_group is collective). Subgroups do not
    inherit the default group's timeout: pass it, or a stuck peer blocks them for torch's default.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    n = ulysses_degree * ring_degree
    if cfg_degree not in (1, 2) or n * cfg_degree != world_size:
        raise ValueError(f"cfg x ulysses x ring = {cfg_degree} x {ulysses_degree} x {ring_degree} "
                         f"!= world size {world_size}")
    sp = SequenceParallel(ulysses_degree, ring_degree, rank % n, cfg_degree=cfg_degree, cfg_rank=rank // n)

    def new_group(ranks: list[int], needed: bool):
        group = dist.new_group(ranks, timeout=timeout) if needed else None
        return group if rank in ranks else None

    for c in range(cfg_degree):
        base = c * n
        if cfg_degree == 1:
            sp.group = dist.group.WORLD
        elif (group := new_group(list(range(base, base + n)), n > 1)) is not None:
            sp.group = group
        for r in range(ring_degree):  # contiguous Ulysses groups
            if (group := new_group(list(range(base + r * ulysses_degree, base + (r + 1) * ulysses_degree)),
                                   ulysses_degree > 1)) is not None:
                sp.ulysses_group = group
        for u in range(ulysses_degree):  # strided Ring groups
            if (group := new_group(list(range(base + u, base + n, ulysses_degree)), ring_degree > 1)) is not None:
                sp.ring_group = group
    for local in range(n if cfg_degree > 1 else 0):  # pairs across the halves
        if (group := new_group([local + c * n for c in range(cfg_degree)], True)) is not None:
            sp.cfg_group = group
    return sp

"""Run on N gloo ranks by test_vae_split.py (see usp_video.distributed.testing.spawn): every split VAE
decode and encode case of one world size in the same ranks, so that the ranks start once."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the spawned rank imports this file by its path


def make_engine(rank=0, world_size=1, vae_split=False):
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    return Engine(GroupConfig(ranks=world_size, vae_split=vae_split), rank=rank)


def encode_frames(shape, seed=7) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 from a seed: every rank builds the same video."""
    return torch.rand(*shape, 3, generator=torch.Generator().manual_seed(seed))


def split_encode_rank(rank, world_size, vae, shape):
    engine = make_engine(rank, world_size, vae_split=True)
    progress = []
    latent = engine.encode_video(vae, encode_frames(shape), lambda done, total: progress.append((done, total)))
    return {"latent": latent, "progress": torch.tensor(progress)} if latent is not None else {}


def split_cases(rank, world_size, cases):
    """cases: [{"kind": "decode" | "encode", **the kind's arguments}, ...] (decode: parity_targets.vae_split_rank);
    each case's results come back under "<index>/"."""
    from parity_targets import vae_split_rank

    kinds = {"decode": vae_split_rank, "encode": split_encode_rank}
    out = {}
    for i, case in enumerate(cases):
        case = dict(case)
        for name, value in kinds[case.pop("kind")](rank, world_size, **case).items():
            out[f"{i}/{name}"] = value
    return out

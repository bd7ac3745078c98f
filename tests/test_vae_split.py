"""Parallel VAE decode (Wan-VAE and HunyuanVideo's): the frame's rows split across the ranks with
halo exchange, against the one-process decode of the whole frame (exact method: max abs error <= 1e-4)."""

import pytest
import torch

from parity_targets import make_engine
from usp_video.distributed.parallel.spawn import run_ranks
from usp_video.distributed.parallel.vae_split import row_split


def test_row_split_covers_the_rows_once():
    for rows in (2, 5, 6, 45, 90):
        for ranks in (1, 2, 3, 4):
            bounds = row_split(rows, ranks)
            assert [r for a, b in bounds for r in range(a, b)] == list(range(rows))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.parametrize("world_size,shape", [(2, (3, 10, 8)), (3, (2, 7, 6)), (4, (3, 9, 8)), (4, (2, 3, 4))],
                         ids=["2-ranks", "3-ranks-uneven", "4-ranks-uneven", "4-ranks-fewer-rows"])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_split_decode_matches_one_process(tests_dir, tiny_models, tiny_hunyuan, family, world_size, shape):
    vae = tiny_models["vae"] if family == "wan" else tiny_hunyuan["vae"]
    latent = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(5))
    expected = make_engine().decode(vae, latent)
    results = run_ranks(f"{tests_dir}/parity_targets.py:vae_split_rank", world_size,
                        dict(vae_path=vae, shape=shape), timeout=240)
    frames = results[0]["frames"]
    assert all(not r for r in results[1:])  # only rank 0 returns the frames
    assert frames.shape == expected.shape
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.9  # not a saturated, trivial picture
    err = float((frames - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"

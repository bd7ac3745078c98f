"""Parallel VAE decode (Wan-VAE and HunyuanVideo's): the frame's rows split across the ranks with
halo exchange, against the one-process decode of the whole frame (exact method: max abs error <= 1e-4)."""

import pytest
import torch

from parity_targets import make_engine
from usp_video.distributed.models.hunyuan_video.tiny import TINY_HUNYUAN_VAE_TILES
from usp_video.distributed.parallel.spawn import run_ranks
from usp_video.distributed.parallel.vae_split import row_split


def test_row_split_covers_the_rows_once():
    for rows in (2, 5, 6, 45, 90):
        for ranks in (1, 2, 3, 4):
            bounds = row_split(rows, ranks)
            assert [r for a, b in bounds for r in range(a, b)] == list(range(rows))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


SMALL_TILES = TINY_HUNYUAN_VAE_TILES  # a 3x9x8 latent makes 3 x 3 x 3 = 27 tiles of uneven sizes


@pytest.mark.parametrize("world_size,shape", [(2, (3, 10, 8)), (3, (2, 7, 6)), (4, (3, 9, 8)), (4, (2, 3, 4))],
                         ids=["2-ranks", "3-ranks-uneven", "4-ranks-uneven", "4-ranks-fewer-rows"])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_split_decode_matches_one_process(tests_dir, tiny_models, tiny_hunyuan, family, world_size, shape):
    """Wan: rows split with halo exchange, against the whole decode. HunyuanVideo: tiles shared out,
    against the one-process tiled decode (its normal decode)."""
    vae = tiny_models["vae"] if family == "wan" else tiny_hunyuan["vae"]
    tiling = SMALL_TILES if family == "hunyuan" else None
    latent = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(5))
    engine = make_engine()
    if tiling:
        engine.vae(vae).enable_tiling(**tiling)
    expected = engine.decode(vae, latent)
    results = run_ranks(f"{tests_dir}/parity_targets.py:vae_split_rank", world_size,
                        dict(vae_path=vae, shape=shape, tiling=tiling), timeout=240)
    frames = results[0]["frames"]
    assert all(not r for r in results[1:])  # only rank 0 returns the frames
    # rank 0 reports every decoder call: a latent frame (Wan), a tile (HunyuanVideo, test_decode_reports_...)
    calls = engine.vae(vae).usp_family.decoder_calls(engine.vae(vae), latent)
    assert family == "hunyuan" or calls == shape[0]
    assert results[0]["progress"].tolist() == [[k, calls] for k in range(1, calls + 1)]
    assert frames.shape == expected.shape
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.9  # not a saturated, trivial picture
    err = float((frames - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"


def test_hunyuan_tiles_are_shared_out(tiny_hunyuan):
    """The tiled decode calls the decoder once per tile; every rank decodes only its share."""
    from usp_video.distributed.parallel.vae_split import TileDecoder

    engine = make_engine()
    vae = engine.vae(tiny_hunyuan["vae"])
    vae.enable_tiling(**SMALL_TILES)
    latent = torch.randn(1, 16, 3, 9, 8, generator=torch.Generator().manual_seed(5))
    counts = []
    for rank in range(3):
        tiles = TileDecoder(vae.decoder, rank, 3, lambda tile: torch.Size(
            (tile.shape[0], 3, (tile.shape[2] - 1) * vae.temporal_compression_ratio + 1,
             tile.shape[3] * vae.spatial_compression_ratio, tile.shape[4] * vae.spatial_compression_ratio)))
        vae.decoder.forward = tiles
        try:
            with torch.no_grad():
                out = vae.decode(latent).sample
        finally:
            del vae.decoder.forward
        assert out.is_meta and len(tiles.shapes) == 27
        counts.append(sorted(tiles.mine))
    assert counts == [list(range(r, 27, 3)) for r in range(3)]


@pytest.mark.parametrize("family,shape,tiling,calls", [
    ("wan", (5, 4, 6), None, 5),  # one decoder call per latent frame
    ("hunyuan", (3, 9, 8), SMALL_TILES, 27),  # one per tile
    ("hunyuan", (2, 4, 4), None, 1),  # within one tile
])
def test_decode_reports_progress_per_decoder_call(tiny_models, tiny_hunyuan, family, shape, tiling, calls):
    """The VAE decode's progress moves once per latent frame (Wan) or tile (HunyuanVideo), up to the
    count the family predicts, and the frames are the same as without progress."""
    vae = tiny_models["vae"] if family == "wan" else tiny_hunyuan["vae"]
    engine = make_engine()
    if tiling:
        engine.vae(vae).enable_tiling(**tiling)
    latent = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(5))
    events = []
    frames = engine.decode(vae, latent, lambda done, total: events.append((done, total)))
    assert events == [(k, calls) for k in range(1, calls + 1)]
    assert torch.equal(frames, engine.decode(vae, latent))

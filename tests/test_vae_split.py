"""Parallel VAE decode (Wan-VAE, the Wan 2.2 VAE and HunyuanVideo's) and encode (Wan 2.1 and Wan 2.2 VAEs): the frame's rows
split across the ranks with halo exchange (or HunyuanVideo's tiles shared out), against the one-process
decode / encode of the whole frame (exact method: max abs error <= 1e-4); the encode through the group and
its node, and bad frames refused by name. Against ComfyUI's own VAE Encode: test_comfyui_native.py."""

import pytest
import torch

from parity_targets import encode_frames, make_engine, vae_split_rank
from usp_video.distributed import api
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group
from usp_video.distributed.models.hunyuan_video.tiny import TINY_HUNYUAN_VAE_TILES
from usp_video.distributed.testing.spawn import run_ranks
from usp_video.distributed.parallel.vae_split import row_split


def test_row_split_covers_the_rows_once():
    for rows in (2, 5, 6, 45, 90):
        for ranks in (1, 2, 3, 4):
            bounds = row_split(rows, ranks)
            assert [r for a, b in bounds for r in range(a, b)] == list(range(rows))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


SMALL_TILES = TINY_HUNYUAN_VAE_TILES  # a 3x9x8 latent makes 3 x 3 x 3 = 27 tiles of uneven sizes

# world size -> latent shapes [T, H, W] of the decode cases (each with the Wan-VAE and HunyuanVideo's)
DECODES = {2: [(3, 10, 8)], 3: [(2, 7, 6)], 4: [(3, 9, 8), (2, 3, 4)]}
DECODE_IDS = {(3, 10, 8): "2-ranks", (2, 7, 6): "3-ranks-uneven", (3, 9, 8): "4-ranks-uneven", (2, 3, 4): "4-ranks-fewer-rows"}
# world size -> latent shape of the Wan 2.2 VAE's decode case (48 channels, 16x16 space)
WAN22_DECODES = {2: (2, 4, 6), 3: (3, 5, 4), 4: (2, 7, 6)}
# world size -> encode cases: (VAE, frames [F, H, W]); rows per rank in latent rows (8 px Wan 2.1, 16 px Wan 2.2)
ENCODES = {
    2: [("wan2.1", (5, 40, 48)),    # 5 rows: 3, 2
        ("wan2.2", (5, 48, 32))],   # 3 rows: 2, 1
    3: [("wan2.1", (9, 56, 16)),    # 7 rows: 3, 2, 2; three encoder chunks (1, 4, 4 frames)
        ("wan2.2", (5, 64, 32))],   # 4 rows: 2, 1, 1
    4: [("wan2.1", (5, 48, 24)),    # 6 rows: 2, 2, 1, 1
        ("wan2.2", (1, 80, 32)),    # 5 rows: 2, 1, 1, 1; one frame (an image)
        ("wan2.1", (5, 24, 16))],   # 3 rows, fewer than the ranks: rank 0 encodes alone
}


@pytest.fixture(scope="module")
def vaes(tiny_models, tiny_hunyuan, tiny_5b) -> dict:
    return {"wan": tiny_models["vae"], "hunyuan": tiny_hunyuan["vae"], "wan2.1": tiny_models["vae"],
            "wan2.2": tiny_5b["vae"]}


def decode_case(vaes, family, shape) -> dict:
    return dict(kind="decode", vae_path=vaes[family], shape=list(shape), tiling=SMALL_TILES if family == "hunyuan" else None)


def encode_case(vaes, vae, shape) -> dict:
    return dict(kind="encode", vae=vaes[vae], shape=list(shape))


def wan22_decode_case(vaes, shape) -> dict:
    return dict(kind="decode", vae_path=vaes["wan2.2"], shape=list(shape), channels=48)


@pytest.fixture(scope="module")
def split_run(tests_dir, vaes):
    """split_run(world_size, case) -> every rank's results of that case: all the decode and encode cases of
    one world size run in one spawn (parity_targets.vae_case), the first time one of them is asked for."""
    runs = {}

    def run(world_size: int, case: dict) -> list[dict]:
        cases = [decode_case(vaes, family, shape) for shape in DECODES[world_size] for family in ("wan", "hunyuan")]
        cases += [encode_case(vaes, vae, shape) for vae, shape in ENCODES[world_size]]
        cases += [wan22_decode_case(vaes, WAN22_DECODES[world_size])]
        if world_size not in runs:
            runs[world_size] = run_ranks(f"{tests_dir}/parity_targets.py:run_cases", world_size,
                                         dict(target="vae_case", cases=cases), timeout=60 + 40 * len(cases))
        i = cases.index(case)
        return [{k.split("/", 1)[1]: v for k, v in ranked.items() if k.startswith(f"{i}/")} for ranked in runs[world_size]]
    return run


@pytest.mark.parametrize("world_size,shape", [(n, shape) for n, shapes in DECODES.items() for shape in shapes],
                         ids=[DECODE_IDS[shape] for shapes in DECODES.values() for shape in shapes])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_split_decode_matches_one_process(vaes, split_run, family, world_size, shape):
    """Wan: rows split with halo exchange, against the whole decode. HunyuanVideo: tiles shared out,
    against the one-process tiled decode (its normal decode)."""
    vae = vaes[family]
    tiling = SMALL_TILES if family == "hunyuan" else None
    latent = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(5))
    engine = make_engine()
    if tiling:
        engine.vae(vae).enable_tiling(**tiling)
    expected = engine.decode(vae, latent)
    results = split_run(world_size, decode_case(vaes, family, shape))
    frames = results[0]["frames"]
    assert all(not r for r in results[1:])  # only rank 0 returns the frames
    # rank 0 reports every decoder call: a latent frame (Wan), a tile (HunyuanVideo, test_decode_reports_...)
    calls = engine.vae_coder.loaded_vae(vae).family.decoder_calls(engine.vae(vae), latent)
    assert family == "hunyuan" or calls == shape[0]
    assert results[0]["progress"].tolist() == [[k, calls] for k in range(1, calls + 1)]
    assert frames.shape == expected.shape
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.9  # not a saturated, trivial picture
    err = float((frames - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"


@pytest.mark.parametrize("world_size,shape", WAN22_DECODES.items(), ids=["2-ranks", "3-ranks-uneven", "4-ranks-uneven"])
def test_split_wan22_vae_decode_matches_one_process(vaes, split_run, world_size, shape):
    """The Wan 2.2 VAE (Wan 2.2 TI2V-5B's: 48 channels, 16x16 space) split by rows, against one process."""
    expected = vae_split_rank(0, 1, vaes["wan2.2"], shape, channels=48)["frames"]
    assert expected.shape == (4 * (shape[0] - 1) + 1, shape[1] * 16, shape[2] * 16, 3)
    results = split_run(world_size, wan22_decode_case(vaes, shape))
    err = float((results[0]["frames"] - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"


@pytest.mark.parametrize("world_size,vae,shape", [(n, vae, shape) for n, cases in ENCODES.items() for vae, shape in cases],
                         ids=[f"{n}-ranks-{vae}-{'x'.join(map(str, shape))}" for n, cases in ENCODES.items()
                              for vae, shape in cases])
def test_split_encode_matches_one_process(vaes, split_run, world_size, vae, shape):
    """The frames' rows split (whole latent rows per rank: every stride-2 downsampling starts at an even row,
    and takes one row from the rank below), against the one-process encode, with its temporal chunks."""
    expected = make_engine().encode_video(vaes[vae], encode_frames(shape))
    results = split_run(world_size, encode_case(vaes, vae, shape))
    assert all(not r for r in results[1:])  # only rank 0 returns the latent
    latent = results[0]["latent"]
    s = 16 if vae == "wan2.2" else 8
    assert expected.shape == (1, 48 if vae == "wan2.2" else 16, (shape[0] - 1) // 4 + 1, shape[1] // s, shape[2] // s)
    assert latent.shape == expected.shape
    assert expected.abs().max() > 0.1  # a latent worth comparing
    err = float((latent - expected).abs().max())
    assert err <= 1e-4, f"max abs error {err:.2e}"
    calls = expected.shape[2]  # one encoder call per latent frame, reported on rank 0
    assert results[0]["progress"].tolist() == [[k, calls] for k in range(1, calls + 1)]


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


def test_encode_node_through_the_group(tiny_models):
    """USP VAE Encode on a 2-rank group (vae_split on): the one-process latent, tagged with the VAE's family,
    progress per latent frame; an RGBA IMAGE is encoded by its RGB, and the input is left unchanged."""
    from comfy_executor import call

    frames = encode_frames((5, 40, 16))
    rgba = torch.cat([frames, torch.ones(5, 40, 16, 1)], dim=-1)
    before = rgba.clone()
    group = GroupConfig(ranks=2)
    try:
        events = []
        latent, family = api.encode_video(group, tiny_models["vae"], frames, on_progress=events.append)
        (out,) = call("UspVaeEncode", pixels=rgba, vae={"group": group, "path": tiny_models["vae"]})
    finally:
        free_group()
    expected = make_engine().encode_video(tiny_models["vae"], frames)
    assert family == "wan2.1" and out["usp_family"] == "wan2.1"
    assert [(e["step"], e["total"]) for e in events] == [(1, 2), (2, 2)]
    assert float((latent - expected).abs().max()) <= 1e-4
    assert torch.equal(out["samples"], latent)
    assert torch.equal(rgba, before)


@pytest.mark.parametrize("vae,shape,message", [
    ("wan2.1", (6, 16, 16), r"pixels has 6 frames; the Wan 2.1 VAE encodes 1 \+ 4k frames .*trim to 5 or extend to 9"),
    ("wan2.1", (0, 16, 16), r"pixels has 0 frames.*give at least 1 frame"),
    ("wan2.1", (5, 20, 16), r"pixels is 16x20 pixels; .* multiples of 8: crop or scale to 16x16"),
    ("wan2.2", (5, 40, 32), r"pixels is 32x40 pixels; the Wan 2.2 TI2V-5B VAE .* multiples of 16: crop or scale to 32x32"),
    ("wan2.1", (5, 16), r"pixels must be video frames \[frames, height, width, 3\]"),
])
def test_bad_frames_are_refused_before_the_group_runs(vaes, vae, shape, message):
    frames = torch.rand(*shape, 3) if len(shape) == 3 else torch.rand(*shape)
    with pytest.raises(ValueError, match=message):
        api.encode_video(GroupConfig(ranks=2), vaes[vae], frames)


def test_bad_frames_values_and_other_vaes_are_refused(vaes, tiny_hunyuan):
    with pytest.raises(ValueError, match="NaN"):
        api.encode_video(GroupConfig(ranks=2), vaes["wan2.1"], torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(ValueError, match="floating-point"):
        api.encode_video(GroupConfig(ranks=2), vaes["wan2.1"], torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="HunyuanVideo VAE does not encode video here yet"):
        api.encode_video(GroupConfig(ranks=2), tiny_hunyuan["vae"], torch.rand(1, 16, 16, 3))
    with pytest.raises(ValueError, match="HunyuanVideo VAE does not encode video here yet"):  # on the ranks too
        make_engine().encode_video(tiny_hunyuan["vae"], torch.rand(1, 16, 16, 3))
    with pytest.raises(ValueError, match="pixels has 6 frames"):  # the ranks check what a raw request carries
        make_engine().encode_video(vaes["wan2.1"], torch.rand(6, 16, 16, 3))

"""HunyuanVideo, N ranks against one process: the DiT forward and a 4-step run.

The reference is diffusers' stock model in one process, fed text padded with masked tokens as
the reference pipeline pads it; our ranks crop the padding and shard video (and text, when its
length divides the degree) tokens."""

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import hunyuan_forward, hunyuan_request, make_engine
from usp_video.distributed.parallel.mesh import valid_factorizations

HEADS = 12  # the tiny model's
CASES = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]
UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 video tokens: divides none of 2, 3, 4
EVEN = (3, 4, 8)     # 3 x 2 x 4 = 24 video tokens
TEXT_WHOLE, TEXT_SHARDED = 7, 12  # 7 divides none of 2, 3, 4 (kept whole); 12 divides all (sharded)


@pytest.fixture(scope="module")
def stock(tiny_hunyuan):
    from usp_video.distributed.models.hunyuan_video.dit import load_hunyuan_transformer

    model = load_hunyuan_transformer(tiny_hunyuan["dit"])  # diffusers' own attention processors
    return {(shape, n): hunyuan_forward(model, shape, n) for shape in (UNEVEN, EVEN)
            for n in (TEXT_WHOLE, TEXT_SHARDED)}


def test_world_size_one_matches_stock_diffusers(tiny_hunyuan, stock):
    model = make_engine().dit(tiny_hunyuan["dit"])
    for (shape, text_len), expected in stock.items():
        assert expected.abs().max() > 0
        assert rel_error(hunyuan_forward(model, shape, text_len), expected) <= 1e-6


FORWARD_CASES = ([(*case, UNEVEN, TEXT_WHOLE) for case in CASES] + [(*case, UNEVEN, TEXT_SHARDED) for case in CASES]
                 + [(*case, EVEN, TEXT_WHOLE) for case in CASES if case[0] == 4])


@pytest.fixture(scope="module")
def forward_runs(tests_dir, tiny_hunyuan):
    return Batched(tests_dir, "hunyuan_forward_rank", [
        (n, dict(ulysses=u, ring=r, dit_path=tiny_hunyuan["dit"], shape=s, text_len=t))
        for n, u, r, s, t in FORWARD_CASES])


@pytest.mark.parametrize("world_size,ulysses,ring,shape,text_len", FORWARD_CASES,
                         ids=[f"{n}x{u}x{r}-video{s[0] * s[1] * s[2] // 4}-text{t}" for n, u, r, s, t in FORWARD_CASES])
def test_dit_forward_parity(forward_runs, tiny_hunyuan, stock, world_size, ulysses, ring, shape, text_len):
    results = forward_runs(world_size, ulysses=ulysses, ring=ring, dit_path=tiny_hunyuan["dit"], shape=shape,
                           text_len=text_len)
    for rank, result in enumerate(results):
        err = rel_error(result["out"], stock[(shape, text_len)])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def sampled(tiny_hunyuan):
    engine = make_engine()
    return {cfg: engine.sample(hunyuan_request(tiny_hunyuan["dit"], UNEVEN, cfg)).latent for cfg in (1.0, 3.0)}


def cfg_of(world_size, ulysses):
    # cfg 1 (HunyuanVideo's default: one pass, embedded guidance) and, over the cases, real CFG
    # with a positive of 12 tokens and a negative of 7 (two forwards of different text lengths)
    return 3.0 if (world_size + ulysses) % 2 else 1.0


@pytest.fixture(scope="module")
def sample_runs(tests_dir, tiny_hunyuan):
    return Batched(tests_dir, "hunyuan_sample_rank", [
        (n, dict(ulysses=u, ring=r, dit_path=tiny_hunyuan["dit"], shape=UNEVEN, cfg=cfg_of(n, u)))
        for n, u, r in CASES], timeout_per_case=120)


@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
def test_four_step_sampling_parity(sample_runs, tiny_hunyuan, sampled, world_size, ulysses, ring):
    cfg = cfg_of(world_size, ulysses)
    results = sample_runs(world_size, ulysses=ulysses, ring=ring, dit_path=tiny_hunyuan["dit"], shape=UNEVEN,
                          cfg=cfg)
    expected = sampled[cfg]
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} (cfg {cfg})"

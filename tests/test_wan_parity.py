"""N ranks against one process: the DiT forward and a full 4-step sampling run."""

import pytest
import torch

from conftest import rel_error
from parity_targets import dit_forward, dit_inputs, make_engine, sample_request
from usp_video.distributed.parallel.mesh import valid_factorizations
from usp_video.distributed.parallel.spawn import run_ranks

HEADS = 12  # the tiny model's, as the 1.3B model's
CASES = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]
UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 tokens: divides none of 2, 3, 4
EVEN = (3, 4, 8)     # 3 x 2 x 4 = 24 tokens: divides all


@pytest.fixture(scope="module")
def reference(tiny_models):
    engine = make_engine()
    return {shape: dit_forward(engine, tiny_models["dit"], shape) for shape in (UNEVEN, EVEN)}


def test_world_size_one_matches_stock_diffusers(tiny_models, reference):
    from usp_video.distributed.models.wan import load_wan_transformer

    stock = load_wan_transformer(tiny_models["dit"])  # diffusers' own attention processors
    x, t, context = dit_inputs(UNEVEN)
    with torch.no_grad():
        expected = stock(x, t, context, return_dict=False)[0]
    assert rel_error(reference[UNEVEN], expected) <= 1e-6


@pytest.mark.parametrize("shape", [UNEVEN, EVEN], ids=["35-tokens", "24-tokens"])
@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
def test_dit_forward_parity(tests_dir, tiny_models, reference, world_size, ulysses, ring, shape):
    results = run_ranks(f"{tests_dir}/parity_targets.py:dit_forward_rank", world_size,
                        dict(ulysses=ulysses, ring=ring, dit_path=tiny_models["dit"], shape=shape), timeout=180)
    for rank, result in enumerate(results):
        err = rel_error(result["out"], reference[shape])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def sampled(tiny_models):
    engine = make_engine()
    return {s: engine.sample(sample_request(tiny_models["dit"], UNEVEN, sampler=s)) for s in ("unipc", "euler")}


@pytest.mark.parametrize("world_size,ulysses,ring", [(1, 1, 1)] + CASES)
def test_four_step_sampling_parity(tests_dir, tiny_models, sampled, world_size, ulysses, ring):
    sampler = "unipc" if (world_size + ulysses) % 2 else "euler"  # both samplers, over the cases
    if world_size == 1:
        results = [{"latent": make_engine().sample(sample_request(tiny_models["dit"], UNEVEN, sampler=sampler))}]
    else:
        results = run_ranks(f"{tests_dir}/parity_targets.py:sample_rank", world_size,
                            dict(ulysses=ulysses, ring=ring, dit_path=tiny_models["dit"], shape=UNEVEN,
                                 sampler=sampler), timeout=240)
    expected = sampled[sampler]
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} ({sampler})"


@pytest.mark.parametrize("variant", ["batch2", "cfg1", "denoise", "unequal_text"])
def test_sampler_variants_parity(tests_dir, tiny_models, variant):
    from parity_targets import variant_request

    expected = make_engine().sample(variant_request(tiny_models["dit"], variant))
    results = run_ranks(f"{tests_dir}/parity_targets.py:sample_variant_rank", 3,
                        dict(ulysses=1, ring=3, dit_path=tiny_models["dit"], variant=variant), timeout=240)
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} ({variant})"

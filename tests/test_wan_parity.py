"""N ranks against one process: the DiT forward and a full 4-step sampling run."""

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import dit_forward, dit_inputs, make_engine, sample_request
from usp_video.distributed.parallel.mesh import valid_factorizations
from usp_video.distributed.testing.spawn import run_ranks

HEADS = 12  # the tiny model's, as the 1.3B model's
CASES = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]
UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 tokens: divides none of 2, 3, 4
EVEN = (3, 4, 8)     # 3 x 2 x 4 = 24 tokens: divides all


@pytest.fixture(scope="module")
def reference(tiny_models):
    engine = make_engine()
    return {shape: dit_forward(engine, tiny_models["dit"], shape) for shape in (UNEVEN, EVEN)}


def test_world_size_one_matches_stock_diffusers(tiny_models, reference):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    stock = load_wan_transformer(tiny_models["dit"])  # diffusers' own attention processors
    x, t, context = dit_inputs(UNEVEN)
    with torch.no_grad():
        expected = stock(x, t, context, return_dict=False)[0]
    assert rel_error(reference[UNEVEN], expected) <= 1e-6


# Compiled blocks (compile aot_eager) on Ulysses and Ring factorizations, with and without FSDP sharding,
# run in the same spawned ranks as the plain forwards.
COMPILED = [(2, 2, 1, "off"), (2, 1, 2, "on"), (4, 1, 4, "off"), (4, 2, 2, "on")]


def compiled_case(dit_path, ulysses, ring, shard):
    return dict(ulysses=ulysses, ring=ring, dit_path=dit_path, shape=UNEVEN, compile="aot_eager", shard_weights=shard)


@pytest.fixture(scope="module")
def forward_runs(tests_dir, tiny_models):
    return Batched(tests_dir, "dit_forward_rank", [(n, dict(ulysses=u, ring=r, dit_path=tiny_models["dit"], shape=s))
                                                    for n, u, r in CASES for s in (UNEVEN, EVEN)]
                   + [(n, compiled_case(tiny_models["dit"], u, r, sh)) for n, u, r, sh in COMPILED])


@pytest.mark.parametrize("shape", [UNEVEN, EVEN], ids=["35-tokens", "24-tokens"])
@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
def test_dit_forward_parity(forward_runs, tiny_models, reference, world_size, ulysses, ring, shape):
    results = forward_runs(world_size, ulysses=ulysses, ring=ring, dit_path=tiny_models["dit"], shape=shape)
    for rank, result in enumerate(results):
        err = rel_error(result["out"], reference[shape])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"


@pytest.mark.parametrize("world_size,ulysses,ring,shard", [(1, 1, 1, "off")] + COMPILED)
def test_compiled_blocks_match_one_process(forward_runs, tiny_models, reference, world_size, ulysses, ring, shard):
    """N ranks with every block compiled == one process without compile (35 tokens: padded shards)."""
    from parity_targets import compiled_forward

    if world_size == 1:
        results = [compiled_forward(0, 1, 1, 1, tiny_models["dit"], UNEVEN)]
    else:
        results = forward_runs(world_size, **compiled_case(tiny_models["dit"], ulysses, ring, shard))
    for rank, result in enumerate(results):
        blocks = int(result["blocks"])
        assert int(result["compiled"]) == blocks, f"rank {rank}: {int(result['compiled'])} of {blocks} blocks compiled"
        # every block ran compiled graphs (with several ranks, one before and one after each attention's collectives)
        assert int(result["graph_runs"]) >= blocks, f"rank {rank}: compiled graphs ran {int(result['graph_runs'])} times"
        assert int(result["fsdp"]) == (blocks if shard == "on" else 0), f"rank {rank}: FSDP sharding lost"
        err = rel_error(result["out"], reference[UNEVEN])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} (ulysses={ulysses} ring={ring} shard={shard})"


@pytest.fixture(scope="module")
def sampled(tiny_models):
    engine = make_engine()
    return {s: engine.sample(sample_request(tiny_models["dit"], UNEVEN, sampler=s)) for s in ("unipc", "euler")}


def sampler_of(world_size, ulysses):
    return "unipc" if (world_size + ulysses) % 2 else "euler"  # both samplers, over the cases


@pytest.fixture(scope="module")
def sample_runs(tests_dir, tiny_models):
    return Batched(tests_dir, "sample_rank", [
        (n, dict(ulysses=u, ring=r, dit_path=tiny_models["dit"], shape=UNEVEN, sampler=sampler_of(n, u)))
        for n, u, r in CASES], timeout_per_case=120)


@pytest.mark.parametrize("world_size,ulysses,ring", [(1, 1, 1)] + CASES)
def test_four_step_sampling_parity(sample_runs, tiny_models, sampled, world_size, ulysses, ring):
    sampler = sampler_of(world_size, ulysses)
    if world_size == 1:
        results = [{"latent": make_engine().sample(sample_request(tiny_models["dit"], UNEVEN, sampler=sampler))}]
    else:
        results = sample_runs(world_size, ulysses=ulysses, ring=ring, dit_path=tiny_models["dit"], shape=UNEVEN,
                              sampler=sampler)
    expected = sampled[sampler]
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} ({sampler})"


VARIANTS = ["batch2", "cfg1", "denoise", "unequal_text"]


@pytest.fixture(scope="module")
def variant_runs(tests_dir, tiny_models):
    return Batched(tests_dir, "sample_variant_rank", [
        (3, dict(ulysses=1, ring=3, dit_path=tiny_models["dit"], variant=v)) for v in VARIANTS], timeout_per_case=120)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_variants_parity(variant_runs, tiny_models, variant):
    from parity_targets import variant_request

    expected = make_engine().sample(variant_request(tiny_models["dit"], variant))
    results = variant_runs(3, ulysses=1, ring=3, dit_path=tiny_models["dit"], variant=variant)
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} ({variant})"


@pytest.fixture(scope="module")
def two_experts(tiny_models, tmp_path_factory):
    """The tiny Wan DiT and a second one of the same architecture with other weights."""
    from usp_video.distributed.models.wan21.tiny import make_tiny_models

    other = make_tiny_models(tmp_path_factory.mktemp("expert2"), seed=1)["dit"]
    return [tiny_models["dit"], str(other)]


def test_each_step_runs_on_the_expert_of_its_sigma(two_experts):
    """Expert 0 for sigma >= the boundary, expert 1 below it; both stay loaded (no reload at the switch)."""
    from parity_targets import experts_request
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    engine = make_engine()
    sigmas = sampling_sigmas(4, 5.0, 1.0)  # the steps evaluate sigmas[0..3]
    calls = {path: 0 for path in two_experts}
    for path in two_experts:
        engine.dit(path).register_forward_pre_hook(lambda *_, path=path: calls.__setitem__(path, calls[path] + 1))
    mixed = engine.sample(experts_request(two_experts, [float(sigmas[2])]))
    assert list(calls.values()) == [3, 1]  # one batched (cond + uncond) forward per step
    below_all = engine.sample(experts_request(two_experts, [1e-6]))  # no evaluated sigma is below it
    assert engine.load_counts["dit"] == 2  # each expert loaded once
    alone = [make_engine().sample(experts_request([path], [])) for path in two_experts]
    assert all(rel_error(mixed, a) > 1e-3 for a in alone)  # both experts shaped the result
    assert torch.equal(below_all, alone[0])


@pytest.mark.parametrize("world_size,ulysses,ring", [(2, 1, 2), (3, 3, 1)])
def test_two_expert_sampling_parity(tests_dir, two_experts, world_size, ulysses, ring):
    from parity_targets import experts_request
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    boundaries = [float(sampling_sigmas(4, 5.0, 1.0)[1])]
    expected = make_engine().sample(experts_request(two_experts, boundaries))
    results = run_ranks(f"{tests_dir}/parity_targets.py:experts_sample_rank", world_size,
                        dict(ulysses=ulysses, ring=ring, experts=two_experts, boundaries=boundaries), timeout=240)
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"

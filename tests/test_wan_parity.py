"""Wan 2.1 on one process: the parallelized DiT against diffusers' stock model, and the expert switch of a
sampling run. N ranks against one process, for every family: test_parity.py."""

import torch

from conftest import rel_error
from parity_targets import experts_request, forward, inputs, make_engine

UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 tokens


def test_world_size_one_matches_stock_diffusers(tiny_models):
    from usp_video.distributed.models.wan21.dit import load_wan_transformer

    stock = load_wan_transformer(tiny_models["dit"])  # diffusers' own attention processors
    with torch.no_grad():
        expected = stock(*inputs("wan2.1", UNEVEN), return_dict=False)[0]
    assert rel_error(forward(make_engine(), "wan2.1", tiny_models["dit"], UNEVEN), expected) <= 1e-6


def test_each_step_runs_on_the_expert_of_its_sigma(two_experts):
    """Expert 0 for sigma >= the boundary, expert 1 below it; both stay loaded (no reload at the switch)."""
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    engine = make_engine()
    sigmas = sampling_sigmas(4, 5.0, 1.0)  # the steps evaluate sigmas[0..3]
    calls = {path: 0 for path in two_experts}
    for path in two_experts:
        engine.dit(path).register_forward_pre_hook(lambda *_, path=path: calls.__setitem__(path, calls[path] + 1))
    mixed = engine.sample(experts_request(two_experts, [float(sigmas[2])])).latent
    assert list(calls.values()) == [3, 1]  # one batched (cond + uncond) forward per step
    below_all = engine.sample(experts_request(two_experts, [1e-6])).latent  # no evaluated sigma is below it
    assert engine.load_counts["dit"] == 2  # each expert loaded once
    alone = [make_engine().sample(experts_request([path], [])).latent for path in two_experts]
    assert all(rel_error(mixed, a) > 1e-3 for a in alone)  # both experts shaped the result
    assert torch.equal(below_all, alone[0])

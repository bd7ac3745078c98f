"""CFG-parallel: a cfg degree of 2 runs the conditional and unconditional passes on the two halves
of the group at once (each half sequence parallel) and combines them exactly: N ranks against one
process, for Wan (equal text lengths) and HunyuanVideo (a 12-token positive, a 7-token negative)."""

import pytest

from conftest import rel_error
from parity_targets import hunyuan_request, make_engine, sample_request
from usp_video.distributed.testing.spawn import run_ranks

CASES = [(2, 1, 1), (4, 2, 1), (4, 1, 2)]  # world size, ulysses, ring (cfg degree 2)


@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_cfg_parallel_matches_one_process(tests_dir, tiny_models, tiny_hunyuan, family, world_size, ulysses, ring):
    dit = tiny_models["dit"] if family == "wan" else tiny_hunyuan["dit"]
    cfg = 5.0 if family == "wan" else 3.0
    request = (sample_request(dit, (5, 2, 14), sampler="euler", cfg=cfg) if family == "wan"
               else hunyuan_request(dit, (5, 2, 14), cfg=cfg))
    expected = make_engine().sample(request).latent
    results = run_ranks(f"{tests_dir}/parity_targets.py:cfg_parallel_sample_rank", world_size,
                        dict(ulysses=ulysses, ring=ring, dit_path=dit, family=family, cfg=cfg), timeout=240)
    for rank, result in enumerate(results):
        err = rel_error(result["latent"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"


def test_cfg_one_with_cfg_parallel_runs_the_one_pass_on_both_halves(tests_dir, tiny_hunyuan):
    dit = tiny_hunyuan["dit"]
    expected = make_engine().sample(hunyuan_request(dit, (5, 2, 14), cfg=1.0)).latent
    results = run_ranks(f"{tests_dir}/parity_targets.py:cfg_parallel_sample_rank", 2,
                        dict(ulysses=1, ring=1, dit_path=dit, family="hunyuan", cfg=1.0), timeout=240)
    for result in results:
        assert rel_error(result["latent"], expected) <= 1e-5


def test_cfg_parallel_needs_an_even_group():
    with pytest.raises(ValueError, match="cfg_parallel degree must be 1 or 2 and divide the 3 ranks"):
        make_engine(world_size=3, cfg_degree=2)


def test_cfg_parallel_group_through_the_client(tiny_models):
    """The group's own path: GroupConfig(cfg_parallel=2) launches a cfg x ulysses x ring mesh."""
    import torch

    from usp_video.distributed import api
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.registry import free_group

    request = sample_request(tiny_models["dit"], (5, 2, 14), sampler="unipc", cfg=5.0)
    expected = make_engine().sample(request).latent
    group = GroupConfig(ranks=4, cfg_parallel=2, ulysses=2, ring=1)
    try:
        info = api.load_dit(group, tiny_models["dit"])
        assert (info["cfg_parallel"], info["ulysses"], info["ring"]) == (2, 2, 1)
        latent, reply = api.sample(group, request)
        assert reply["cfg_parallel"] == 2
        assert rel_error(latent, expected) <= 1e-5 and torch.isfinite(latent).all()
    finally:
        free_group()


@pytest.mark.parametrize("kwargs,message", [
    (dict(ranks=3, cfg_parallel=2), "needs an even number of ranks, got 3"),
    (dict(ranks=4, cfg_parallel=2, ulysses=4, ring=1), "ulysses x ring = 4 x 1 = 4, but the group has 2 ranks per cfg half"),
    (dict(ranks=4, cfg_parallel=3), "cfg_parallel must be 1 (off) or 2"),
])
def test_cfg_parallel_config_is_checked(kwargs, message):
    from usp_video.distributed.config import GroupConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GroupConfig(**kwargs)

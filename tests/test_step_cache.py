"""Step caches under sequence parallelism: N ranks against one process with TeaCache, the
first-block cache and MagCache on (the same steps skipped, the latent within 1e-5), on uneven token counts, and
the reason the decision is reduced across the group: the ranks' own measures disagree."""

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import cached_request, cached_run, make_engine
from usp_video.distributed.sampling.step_cache import CacheSettings, polynomial

# per family and method, a threshold at which the tiny models' runs both skip and compute steps
THRESHOLDS = {("wan", "fbcache"): 0.11, ("wan", "teacache"): 0.05, ("wan", "magcache"): 0.12,
              ("hunyuan", "fbcache"): 0.4, ("hunyuan", "teacache"): 0.1, ("hunyuan", "magcache"): 0.24}
MESHES = [(2, 2, 1), (2, 1, 2), (3, 3, 1), (3, 1, 3), (4, 2, 2), (4, 4, 1)]
CASES = [(n, dict(ulysses=u, ring=r, family=f, method=m, threshold=t))
         for n, u, r in MESHES for (f, m), t in THRESHOLDS.items()]


def dit_of(family, tiny_models, tiny_hunyuan):
    return tiny_models["dit"] if family == "wan" else tiny_hunyuan["dit"]


@pytest.fixture(scope="module")
def one_process(tiny_models, tiny_hunyuan):
    engine = make_engine()
    return {(f, m): cached_run(engine, cached_request(dit_of(f, tiny_models, tiny_hunyuan), f, m, t))
            for (f, m), t in THRESHOLDS.items()}


@pytest.fixture(scope="module")
def rank_runs(tests_dir, tiny_models, tiny_hunyuan):
    return Batched(tests_dir, "cached_sample_rank",
                   [(n, dict(case, dit_path=dit_of(case["family"], tiny_models, tiny_hunyuan))) for n, case in CASES],
                   timeout_per_case=60)


@pytest.mark.parametrize("family,method", list(THRESHOLDS))
def test_the_tiny_runs_both_skip_and_compute(one_process, family, method):
    """The thresholds above make each run a real test: some steps skipped, some computed after the first."""
    skipped = one_process[(family, method)]["skipped"].tolist()
    assert skipped and len(skipped) < 9, skipped


@pytest.mark.parametrize("world_size,ulysses,ring", [m for m in MESHES])
@pytest.mark.parametrize("family,method", list(THRESHOLDS))
def test_n_ranks_skip_the_same_steps_as_one_process(rank_runs, one_process, tiny_models, tiny_hunyuan, family, method,
                                                     world_size, ulysses, ring):
    expected = one_process[(family, method)]
    results = rank_runs(world_size, ulysses=ulysses, ring=ring, family=family, method=method,
                        threshold=THRESHOLDS[(family, method)],
                        dit_path=dit_of(family, tiny_models, tiny_hunyuan))
    for rank, result in enumerate(results):
        assert result["skipped"].tolist() == expected["skipped"].tolist(), f"rank {rank}"
        err = rel_error(result["latent"], expected["latent"])
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"
        if expected["trace"].numel():  # the measure decided on: the whole sequence's, as in one process
            torch.testing.assert_close(result["trace"][:, 2], expected["trace"][:, 2], rtol=1e-4, atol=1e-9)


def test_the_ranks_own_measures_disagree_so_the_decision_is_reduced(rank_runs, tiny_models, tiny_hunyuan):
    """First-block cache on 4 ranks: at some step the ranks' own measures (over their own tokens) fall on
    both sides of the threshold - a decision taken per rank would skip blocks on some ranks only, and
    their collectives would no longer pair up. The decision is taken on the group's measure, which is the
    same on every rank and matches one process's."""
    threshold = THRESHOLDS[("wan", "fbcache")]
    results = rank_runs(4, ulysses=4, ring=1, family="wan", method="fbcache", threshold=threshold,
                        dit_path=tiny_models["dit"])
    traces = [r["trace"] for r in results]
    assert all(torch.equal(t[:, 2], traces[0][:, 2]) for t in traces)  # one decision measure everywhere
    own_decisions = torch.stack([t[:, 1] < threshold for t in traces])  # [rank, measure]
    split = (own_decisions.any(0) & ~own_decisions.all(0)).nonzero().flatten().tolist()
    assert split, "no measure where the ranks' own decisions differ: the test shows nothing"


def test_cfg_parallel_halves_keep_their_own_caches(tests_dir, tiny_models):
    """CFG-parallel (2 halves x 2 ranks): each half caches its own pass; the result equals one process
    running both passes with their own caches (uneven text lengths: two separate passes)."""
    from usp_video.distributed.testing.spawn import run_ranks

    request = cached_request(tiny_models["dit"], "wan", "fbcache", THRESHOLDS[("wan", "fbcache")])
    request.negative = {"tokens": request.negative["tokens"][:, :9]}  # unequal lengths: positive, negative passes
    expected = cached_run(make_engine(), request)
    results = run_ranks(f"{tests_dir}/parity_targets.py:cached_cfg_parallel_rank", 4,
                        dict(dit_path=tiny_models["dit"], threshold=THRESHOLDS[("wan", "fbcache")]), timeout=240)
    assert expected["skipped_positive"].tolist() != expected["skipped_negative"].tolist()  # two caches, two lists
    for rank, result in enumerate(results):
        side = "positive" if int(result["cfg_rank"]) == 0 else "negative"
        assert [k for k in result if k.startswith("skipped_")] == [f"skipped_{side}"], f"rank {rank}"
        assert result[f"skipped_{side}"].tolist() == expected[f"skipped_{side}"].tolist(), f"rank {rank}"
        assert rel_error(result["latent"], expected["latent"]) <= 1e-5, f"rank {rank}"
    assert {int(r["cfg_rank"]) for r in results} == {0, 1}


def test_sharded_weights_under_cfg_parallel_skip_together(tests_dir, tiny_models):
    """With shard_weights, FSDP gathers every block's weights over both CFG halves: a half that skipped
    blocks the other runs would leave its gathers unanswered. The halves skip only together."""
    from usp_video.distributed.testing.spawn import run_ranks

    results = run_ranks(f"{tests_dir}/parity_targets.py:cached_cfg_parallel_rank", 4,
                        dict(dit_path=tiny_models["dit"], threshold=THRESHOLDS[("wan", "fbcache")], shard="on"),
                        timeout=240)
    lists = [next(v for k, v in r.items() if k.startswith("skipped_")).tolist() for r in results]
    assert all(skipped == lists[0] for skipped in lists) and lists[0], lists
    assert all(torch.isfinite(r["latent"]).all() for r in results)


def test_an_offloaded_dit_skips_the_steps_of_one_process(tests_dir, tiny_hunyuan):
    """dit_offload: HunyuanVideo's cache gathers the first block's weights itself (unshard), which FSDP's
    offload serves as it serves a forward: the same skipped steps and latent as one process."""
    from usp_video.distributed.testing.spawn import run_ranks

    threshold = THRESHOLDS[("hunyuan", "fbcache")]
    expected = cached_run(make_engine(), cached_request(tiny_hunyuan["dit"], "hunyuan", "fbcache", threshold))
    assert expected["skipped"].numel()
    results = run_ranks(f"{tests_dir}/parity_targets.py:cached_offloaded_rank", 2,
                        dict(dit_path=tiny_hunyuan["dit"], family="hunyuan", method="fbcache", threshold=threshold),
                        timeout=240)
    for rank, result in enumerate(results):
        assert result["skipped"].tolist() == expected["skipped"].tolist(), f"rank {rank}"
        assert rel_error(result["latent"], expected["latent"]) <= 1e-5, f"rank {rank}"


def test_a_run_that_starts_mid_schedule_counts_steps_in_the_whole_schedule(tiny_models):
    """KSamplerAdvanced from step 5 of 10: MagCache's curve, its retention and start/end are those of the
    whole schedule, so its steps are numbered 5..9."""
    engine = make_engine()
    request = cached_request(tiny_models["dit"], "wan", "magcache", THRESHOLDS[("wan", "magcache")])
    request.start_step, request.add_noise = 5, False
    request.latent = torch.randn(request.latent.shape, generator=torch.Generator().manual_seed(2))
    skipped = cached_run(engine, request)["skipped"].tolist()
    assert skipped and all(5 < s < 10 for s in skipped), skipped


def test_settings_are_checked_with_clear_messages():
    assert not CacheSettings.from_dict({}).on
    assert CacheSettings.from_dict({"method": "teacache", "threshold": 0.2, "start": 0.1, "end": 0.9}).on
    for bad, words in [({"method": "tea"}, "cache method must be one of off, teacache, fbcache"),
                       ({"method": "fbcache", "threshold": -1}, "threshold must be between 0 and 10"),
                       ({"method": "fbcache", "threshold": "x"}, "threshold must be a number"),
                       ({"method": "fbcache", "start": 0.8, "end": 0.2}, "0 <= start <= end <= 1"),
                       ({"method": "fbcache", "every": 2}, "unknown settings ['every']")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            CacheSettings.from_dict(bad)


def test_teacache_is_refused_where_no_coefficients_are_published(tmp_path):
    from parity_targets import ti2v_request
    from usp_video.distributed.models.wan22_5b import FAMILY

    request = ti2v_request(str(FAMILY.make_tiny(tmp_path)["dit"]), (3, 2, 4), "euler")
    request.cache = {"method": "teacache", "threshold": 0.1}
    with pytest.raises(ValueError, match="no published coefficients for Wan 2.2 TI2V-5B; use the first-block cache"):
        make_engine().sample(request)
    request.cache = {"method": "magcache", "threshold": 0.1}
    with pytest.raises(ValueError, match="MagCache ratios for Wan 2.2 TI2V-5B are not carried here"):
        make_engine().sample(request)


def test_magcache_stretches_its_curve_as_published():
    """nearest_interp: MagCache's own resampling of a 50-step curve to another step count."""
    from usp_video.distributed.models.wan21.dit import MAGCACHE_WAN21_1_3B
    from usp_video.distributed.sampling.step_cache import nearest_interp

    cond = MAGCACHE_WAN21_1_3B[0::2]
    assert len(cond) == 50 and nearest_interp(cond, 50) == cond  # 50 steps: the first one has no ratio (1.0)
    stretched = nearest_interp(cond, 10)
    assert stretched[0] == cond[0] and stretched[-1] == cond[-1] and stretched[5] == cond[round(5 * 49 / 9)]


def test_polynomial_is_numpy_poly1d():
    import numpy as np

    coefficients = [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02]
    for x in (0.0, 0.05, 0.3, 1.7):
        assert polynomial(coefficients, x) == pytest.approx(float(np.poly1d(coefficients)(x)), rel=1e-12)


def test_start_and_end_bound_the_skipping(tiny_models):
    engine = make_engine()
    request = cached_request(tiny_models["dit"], "wan", "fbcache", 0.16)
    request.cache.update(start=0.3, end=0.7)
    skipped = cached_run(engine, request)["skipped"].tolist()
    assert skipped and all(3 <= s < 7 for s in skipped), skipped


def test_a_cache_that_skips_nothing_changes_nothing(tiny_models):
    engine = make_engine()
    plain = engine.sample(cached_request(tiny_models["dit"], "wan", "off", 0.0)).latent
    result = cached_run(engine, cached_request(tiny_models["dit"], "wan", "fbcache", 0.0))
    assert result["skipped"].tolist() == [] and torch.equal(result["latent"], plain)


def test_an_expert_switch_starts_the_caches_afresh(tiny_models, tmp_path):
    """Two experts, the switch after step 5 of 10: the low-noise expert's first step is computed (its
    blocks never ran, so there is no residual of its own to reuse), although the same run on one expert
    skips it. MagCache: its decision reads no activation, so only the reset makes the difference."""
    from parity_targets import experts_request
    from usp_video.distributed.models.wan21.tiny import make_tiny_models
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    other = str(make_tiny_models(tmp_path, seed=1)["dit"])
    engine = make_engine()

    def run(experts, boundaries):
        request = experts_request(experts, boundaries)
        request.steps, request.cache = 10, {"method": "magcache", "threshold": 0.5}
        return cached_run(engine, request)["skipped"].tolist()

    boundary = float(sampling_sigmas(10, 5.0, 1.0)[5]) + 1e-4  # steps 0-4 on the first expert, 5-9 on the second
    one = run([tiny_models["dit"]], [])
    two = run([tiny_models["dit"], other], [boundary])
    assert 5 in one and 5 not in two, (one, two)
    assert [s for s in one if s < 5] == [s for s in two if s < 5]  # the same until the switch

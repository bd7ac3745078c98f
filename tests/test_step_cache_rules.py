"""The step caches against the published rules, stated again here in a few lines each, not by the pack's cache code.

test_step_cache.py compares the caches with themselves (N ranks against one process of the same code). Here a
one-process run of each family's tiny DiT with each method its cache allows records, with forward hooks on the
stock diffusers modules (not through the cache), what each rule reads: TeaCache's modulated input, the first
block's residual, which expert ran. The rules below then decide every step from those records, and their
decisions must be the cache's, step by step (its skipped steps), as must the measures it recorded (StepCache.trace:
(step, pass, own value, group value)). A pinned skip list per run guards the whole chain against drifting.

- TeaCache (TeaCache4Wan2.1 ret_steps / TeaCache4HunyuanVideo): the relative L1 distance of the modulated input to
  the previous step's (sum |a - b| / sum |b|, every step's input kept, skipped or not), rescaled by the published
  polynomial (numpy.poly1d), is accumulated; a step is computed when the sum reaches the threshold, which resets
  it to 0; the warm-up steps (and HunyuanVideo's last step) are always computed.
- First-block cache (ParaAttention's FBCache): the first block's residual (output - input) against the residual
  at the last computed step; under the threshold the step is skipped (and the last computed residual kept).
- MagCache: from 20% of the steps on (the retention ratio), the published magnitude ratios of the steps since
  the last computed one are multiplied up; the error |1 - product| is summed; while the sum is under the
  threshold and at most K steps were skipped in a row the step is skipped; a computed step resets all three.
A Wan 2.2 expert switch starts every rule afresh (its first step on the new expert is computed).
"""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from parity_targets import CACHE_SHAPE, make_engine, request
from usp_video.distributed.models import FAMILIES

STEPS = 10
# (family, method) -> threshold: every method each family's cache allows (TeaCache and MagCache are refused
# where no coefficients / ratios are published: Wan 2.2 TI2V-5B both, Wan 2.2 A14B MagCache)
RUNS = {("wan2.1", "teacache"): 0.05, ("wan2.1", "fbcache"): 0.11, ("wan2.1", "magcache"): 0.12,
        ("hunyuan-video", "teacache"): 0.1, ("hunyuan-video", "fbcache"): 0.4, ("hunyuan-video", "magcache"): 0.24,
        ("wan2.2-a14b", "teacache"): 0.05, ("wan2.2-a14b", "fbcache"): 0.11, ("wan2.2-ti2v-5b", "fbcache"): 0.11}

# The published TeaCache polynomials (highest degree first): TeaCache4Wan2.1's 1.3B ret_steps coefficients (the
# tiny Wans are narrower than 5120, so they get the 1.3B ones), TeaCache4HunyuanVideo's.
TEACACHE = {"wan": ([-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02], 5, False),
            "hunyuan": ([7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02], 1, True)}
MAGCACHE_K = {"wan": 2, "hunyuan": 6}  # the most steps skipped in a row
MAGCACHE_RETENTION = 0.2

# What the runs above skip in one process today (a regression pin: a change here needs a reason).
PINNED = {("wan2.1", "teacache"): [5, 6, 7, 8, 9], ("wan2.1", "fbcache"): [1, 3, 4, 5, 6],
          ("wan2.1", "magcache"): [2, 3, 5, 6, 8], ("hunyuan-video", "teacache"): [1, 3, 5, 7],
          ("hunyuan-video", "fbcache"): [1, 2, 3, 7], ("hunyuan-video", "magcache"): [2, 3, 4, 5, 7, 8],
          ("wan2.2-a14b", "teacache"): [5, 6, 8, 9], ("wan2.2-a14b", "fbcache"): [1, 2, 3, 4, 5, 6, 8],
          ("wan2.2-ti2v-5b", "fbcache"): [1, 3, 9]}
# The tiny Wans' e0 moves by 0.3-0.5 (relative L1) a step, where the Wan 1.3B polynomial is negative: TeaCache on
# them skips every step past the warm-up at any threshold (also with 30 or 50 steps), so its accumulator and
# threshold are exercised by HunyuanVideo's run only; the Wans' runs still check the measure and the warm-up.
SKIPS_EVERY_STEP = {("wan2.1", "teacache"), ("wan2.2-a14b", "teacache")}


def kind(family: str) -> str:
    return "hunyuan" if family == "hunyuan-video" else "wan"


# -- the records: forward hooks on the stock modules ---------------------------------------------------

def _hooks(model, kind_: str, calls: list) -> list:
    """Per model call: "measure" (TeaCache's modulated input), "residual" (the first block's output - input)."""
    def first(key, value):
        calls[-1].setdefault(key, value.detach().double().clone())

    if kind_ == "wan":  # e0: the timestep projection every block takes (the condition embedder's 2nd output)
        return [model.condition_embedder.register_forward_hook(lambda m, a, out: first("measure", out[1])),
                model.blocks[0].register_forward_hook(lambda m, a, out: first("residual", out - a[0]))]
    block = model.transformer_blocks[0]  # the first double block's norm1: the modulated, normalised image tokens
    return [block.norm1.register_forward_hook(lambda m, a, out: first("measure", out[0])),
            block.register_forward_hook(lambda m, a, out: first("residual", out[0] - a[0]))]


@contextmanager
def recording(family_name: str):
    """The model calls of the family's sampling, each {"expert": the index of its module in order of first use,
    "measure", "residual"}, from the family's velocity (what the denoiser calls once per pass)."""
    family = FAMILIES[family_name]
    calls, handles, experts = [], [], {}
    velocity = family.velocity

    def recorded(model, x, t, cond, options):
        if id(model) not in experts:
            experts[id(model)] = len(experts)
            handles.extend(_hooks(model, kind(family_name), calls))
        calls.append({"expert": experts[id(model)]})
        return velocity(model, x, t, cond, options)

    family.velocity = recorded
    try:
        yield calls
    finally:
        del family.velocity
        for handle in handles:
            handle.remove()


def cache_request(family: str, method: str, threshold: float, models: dict, steps: int = STEPS):
    """10 euler steps on CACHE_SHAPE; cfg 5 / 4 and 3 (one batched pass of both sides) for the Wans, cfg 1 for
    HunyuanVideo: one model call per step."""
    kwargs = {} if family == "hunyuan-video" else dict(sampler="euler")
    req = request(family, models[family], CACHE_SHAPE, steps=steps, **kwargs)
    req.cache = {"method": method, "threshold": threshold}
    return req


@pytest.fixture(scope="module")
def runs(tiny_models, tiny_hunyuan, experts, tiny_5b):
    models = {"wan2.1": [tiny_models["dit"]], "hunyuan-video": [tiny_hunyuan["dit"]], "wan2.2-a14b": experts,
              "wan2.2-ti2v-5b": [tiny_5b["dit"]]}
    engine = make_engine()
    out = {}
    for (family, method), threshold in RUNS.items():
        with recording(family) as calls:
            cache = engine.sample(cache_request(family, method, threshold, models)).step_cache
        out[(family, method)] = (cache, calls)
    return out


# -- the rules ------------------------------------------------------------------------------------------

def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return float((current - previous).abs().sum() / previous.abs().sum())


def fresh(calls: list, i: int) -> bool:
    """The first step, or the first on another expert: no state to decide on."""
    return i == 0 or calls[i]["expert"] != calls[i - 1]["expert"]


def teacache_rule(calls, coefficients, warmup, computes_last, threshold):
    skipped, measured, accumulated = [], {}, 0.0
    for i, call in enumerate(calls):
        if fresh(calls, i):
            accumulated = 0.0
        if not (fresh(calls, i) or i < warmup or (computes_last and i == len(calls) - 1)):
            measured[i] = relative_l1(call["measure"], calls[i - 1]["measure"])
            accumulated += float(np.poly1d(coefficients)(measured[i]))
            if accumulated < threshold:
                skipped.append(i)
                continue
        accumulated = 0.0
    return skipped, measured


def fbcache_rule(calls, threshold):
    skipped, measured, last = [], {}, None
    for i, call in enumerate(calls):
        if fresh(calls, i):
            last = None
        if last is not None:
            measured[i] = relative_l1(call["residual"], last)
            if measured[i] < threshold:
                skipped.append(i)
                continue
        last = call["residual"]
    return skipped, measured


def stretch(curve: list, steps: int) -> np.ndarray:
    """MagCache's nearest-neighbour resampling of a 50-step curve: indices round(linspace(0, 49, steps))."""
    return np.asarray(curve)[np.round(np.linspace(0, len(curve) - 1, steps)).astype(int)]


def magcache_curve(family: str) -> np.ndarray:
    """The published ratios of the conditional pass (a batched pass takes them) for the tiny models: Wan 2.1
    1.3B's (interleaved conditional, unconditional: the even places), HunyuanVideo's 544p (the tiny video is
    low)."""
    if kind(family) == "wan":
        from usp_video.distributed.models.wan21.dit import MAGCACHE_WAN21_1_3B

        return stretch(MAGCACHE_WAN21_1_3B[0::2], STEPS)
    from usp_video.distributed.models.hunyuan_video.dit import MAGCACHE_HUNYUAN_544P

    return stretch(MAGCACHE_HUNYUAN_544P, STEPS)


def magcache_rule(calls, ratios, k, threshold):
    skipped = []
    ratio, error, in_a_row = 1.0, 0.0, 0
    for i in range(len(calls)):
        if fresh(calls, i) or i < int(MAGCACHE_RETENTION * len(calls)):
            ratio, error, in_a_row = 1.0, 0.0, 0
            continue
        ratio *= ratios[i]
        in_a_row += 1
        error += abs(1.0 - ratio)
        if error < threshold and in_a_row <= k:
            skipped.append(i)
            continue
        ratio, error, in_a_row = 1.0, 0.0, 0
    return skipped, {}


def rule_decisions(family: str, method: str, calls: list) -> tuple[list[int], dict[int, float]]:
    threshold = RUNS[(family, method)]
    if method == "teacache":
        coefficients, warmup, computes_last = TEACACHE[kind(family)]
        return teacache_rule(calls, coefficients, warmup, computes_last, threshold)
    if method == "fbcache":
        return fbcache_rule(calls, threshold)
    return magcache_rule(calls, magcache_curve(family), MAGCACHE_K[kind(family)], threshold)


# -- the tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method", list(RUNS))
def test_the_cache_decides_every_step_as_the_published_rule(runs, family, method):
    cache, calls = runs[(family, method)]
    needed = {"teacache": "measure", "fbcache": "residual"}.get(method)
    assert len(calls) == STEPS and (needed is None or all(needed in c for c in calls)), len(calls)
    if family == "wan2.2-a14b":  # the switch falls inside the run, so the rule's restart is exercised
        assert 0 < sum(c["expert"] for c in calls) < STEPS - 1, [c["expert"] for c in calls]
    skipped, measured = rule_decisions(family, method, calls)
    passes = {key for _, key, _, _ in cache.trace} | set(cache.skipped_per_pass)
    assert len(passes) <= 1, passes  # one pass a step here (batched, or cfg 1)
    assert cache.report()["skipped_steps"] == skipped, f"the rule skips {skipped}"
    # a run that shows something: it skips, and computes again after a skip
    assert skipped and ((family, method) in SKIPS_EVERY_STEP or any(i not in skipped for i in range(skipped[0], STEPS)))
    recorded = {step: value for step, _, own, value in cache.trace}
    assert sorted(recorded) == sorted(measured)  # measured at the same steps ...
    for step, value in measured.items():  # ... and the same value
        assert recorded[step] == pytest.approx(value, rel=1e-6, abs=1e-12), f"step {step}"


@pytest.mark.parametrize("family,method", list(RUNS))
def test_the_skipped_steps_are_pinned(runs, family, method):
    assert runs[(family, method)][0].report()["skipped_steps"] == PINNED[(family, method)]

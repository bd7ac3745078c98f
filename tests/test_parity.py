"""N ranks against one process, for every model family: one harness over FAMILIES.

Every case is a call of parity_targets.family_case (a forward of each expert, samples, the family's own extras)
on N gloo ranks, compared with the same call on one process (relative error <= 1e-5; counts equal). Each
family claims every degree factorization of 2, 3 and 4 ranks (12 heads: Ulysses, Ring and both) on uneven
token counts (35 tokens divide none of 2, 3, 4), and adds its own cases: Wan 2.1's compiled blocks, sampler
variants, two experts and image to video; HunyuanVideo's text kept whole or sharded; Wan 2.2 A14B's switch
between experts and its image-to-video experts; the 5B's per-token timesteps and start image.

All the cases of one world size, of every family, run in one spawn of that many ranks (tests/batched.py), the
first time a test asks for one of them: three spawns for the whole harness (only the selected cases run: -k and
-m subsets spawn less). Each case builds its own engine
and process groups in the shared ranks, as a fresh spawn would. The files are named by role here
(conftest.family_models) and resolved to paths at run time.
"""

import json

import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import family_case
from usp_video.distributed.models import FAMILIES
from usp_video.distributed.parallel.mesh import valid_factorizations
from usp_video.distributed.sampling.schedules import sampling_sigmas

HEADS = 12  # every tiny DiT's, as the 1.3B model's
FACTORIZATIONS = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]
UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 tokens: divides none of 2, 3, 4
EVEN = (3, 4, 8)     # 3 x 2 x 4 = 24 tokens: divides all
SMALL = (3, 4, 6)    # 18 tokens: uneven over 4 ranks
COMPILED = [(2, 2, 1, "off"), (2, 1, 2, "on"), (4, 1, 4, "off"), (4, 2, 2, "on")]
VARIANTS = ["batch2", "cfg1", "denoise", "unequal_text"]


def sampler_of(world_size: int, ulysses: int) -> str:
    return "unipc" if (world_size + ulysses) % 2 else "euler"  # both samplers, over the factorizations


def wan21_cases():
    for n, u, r in FACTORIZATIONS:
        for shape in (UNEVEN, EVEN):
            yield f"forward-{shape[0] * shape[1] * shape[2] // 4}tok", (n, u, r), dict(shape=shape, forward_inputs={})
    for n, u, r, shard in [(1, 1, 1, "off")] + COMPILED:
        yield f"compiled-shard_{shard}", (n, u, r), dict(shape=UNEVEN, compile="aot_eager", shard_weights=shard)
    for n, u, r in [(1, 1, 1)] + FACTORIZATIONS:
        yield "sample", (n, u, r), dict(shape=UNEVEN, samples=[{"sampler": sampler_of(n, u)}])
    for name in VARIANTS:  # batch 2, cfg 1, denoise < 1, unequal text lengths
        yield f"variant-{name}", (3, 1, 3), dict(shape=SMALL, samples=[{"steps": 3, "variant": name}])
    boundary = float(sampling_sigmas(4, 5.0, 1.0)[1])
    for n, u, r in [(2, 1, 2), (3, 3, 1)]:  # two experts of one architecture, one per sigma range
        yield "two_experts", (n, u, r), dict(shape=UNEVEN, experts=["dit", "dit2"], samples=[
            {"steps": 4, "sampler": "euler", "boundaries": [boundary]}])
    for n, u, r in [(2, 2, 1), (4, 2, 2)]:  # image to video: start video + CLIP vision
        yield "i2v", (n, u, r), dict(shape=SMALL, experts=["dit_i2v"], image={"clip_vision": True})
    for i, (n, u, r) in enumerate(FACTORIZATIONS):
        # Fun InP (the I2V layout; WanFunInpaintToVideo's start and end frames held) and Fun Control (the control
        # and start videos, no mask; its CLIP vision is optional: with and without, over the factorizations)
        yield "fun_inp", (n, u, r), dict(shape=UNEVEN, experts=["dit_i2v"], image={"clip_vision": True, "end_frames": 1})
        yield "fun_control", (n, u, r), dict(shape=UNEVEN, experts=["dit_fun_control"],
                                             image={"clip_vision": i % 2 == 0, "fun_control": True})


def hunyuan_cases():
    # text of 7 tokens divides no degree (kept whole); 12 divides all (sharded with the video)
    for shape, text_len, sizes in ((UNEVEN, 7, (2, 3, 4)), (UNEVEN, 12, (2, 3, 4)), (EVEN, 7, (4,))):
        for n, u, r in FACTORIZATIONS:
            if n in sizes:
                yield (f"forward-video{shape[0] * shape[1] * shape[2] // 4}-text{text_len}", (n, u, r),
                       dict(shape=shape, forward_inputs={"text_len": text_len}))
    for n, u, r in FACTORIZATIONS:
        # cfg 1 (HunyuanVideo's default: one pass, embedded guidance) and, over the cases, real CFG with a
        # positive of 12 tokens and a negative of 7 (two forwards of different text lengths)
        cfg = 3.0 if (n + u) % 2 else 1.0
        yield f"sample-cfg{cfg:g}", (n, u, r), dict(shape=UNEVEN, samples=[{"cfg": cfg}])


def wan22_cases():
    for n, u, r in FACTORIZATIONS:  # each expert's forward, then a run across the switch
        yield "switch", (n, u, r), dict(shape=UNEVEN, experts=["high_noise", "low_noise"], forward_inputs={},
                                        samples=[{"sampler": sampler_of(n, u)}])
    yield "i2v", (2, 1, 2), dict(shape=SMALL, experts=["i2v_high_noise", "i2v_low_noise"],
                                 image={"clip_vision": False})
    for n, u, r in FACTORIZATIONS:  # Fun Control: control, mask and start videos, and the reference image's tokens
        yield "fun_control", (n, u, r), dict(shape=UNEVEN, experts=["fun_control_high_noise", "fun_control_low_noise"],
                                             image={"clip_vision": False, "fun_control_a14b": True})


def ti2v_cases():
    for n, u, r in FACTORIZATIONS:  # forward, per-token timesteps, text to video and from a start image
        sampler = sampler_of(n, u)
        yield "forward-sample-start_image", (n, u, r), dict(shape=UNEVEN, forward_inputs={}, masked=True, samples=[
            {"sampler": sampler}, {"sampler": sampler, "start_image": True}])
        # Fun Control 5B: control, mask and start videos (48 + 4 + 48 channels) and the reference image's tokens
        yield "fun_control", (n, u, r), dict(shape=UNEVEN, experts=["fun_control"], image={
            "clip_vision": False, "fun_control_a14b": True, "channels": 48})


from test_wan_vace import vace_cases  # noqa: E402  (Wan 2.1 VACE's cases live with its other tests)
from test_hunyuan15 import hv15_cases  # noqa: E402  (HunyuanVideo 1.5's, likewise)

CASES_OF = {"wan2.1": wan21_cases, "hunyuan-video": hunyuan_cases, "wan2.2-a14b": wan22_cases,
            "wan2.2-ti2v-5b": ti2v_cases, "wan2.1-vace": vace_cases, "hunyuan-video-1.5": hv15_cases,
            "wan2.2-animate": lambda: ()}  # Wan 2.2 Animate's cases: tests/test_wan_animate.py (its own inputs)
assert set(CASES_OF) == set(FAMILIES), "every family claims its parity cases here"
CASES = [(family, name, degrees, dict(spec, family=family, experts=spec.get("experts", ["dit"])))
         for family in FAMILIES for name, degrees, spec in CASES_OF[family]()]


def case_id(case) -> str:
    family, name, (n, u, r), _ = case
    return f"{family}-{name}-{n}x{u}x{r}"


# The smoke subset (conftest.py): one 2-rank case of each family, Ulysses and Ring, forward and sample.
SMOKE = {"wan2.1-forward-35tok-2x2x1", "wan2.1-sample-2x1x2", "hunyuan-video-forward-video35-text7-2x1x2",
         "wan2.2-a14b-switch-2x2x1", "wan2.2-ti2v-5b-forward-sample-start_image-2x1x2",
         "wan2.1-vace-forward-sample-2x1x2", "hunyuan-video-1.5-forward-t2v-i2v-2x1x2"}


def marks(case) -> list:
    """slow: the 4-rank sweep and the compiled blocks (the largest and the longest cases); smoke: SMOKE."""
    spec = case[3]
    slow = case[2][0] == 4 or spec.get("compile", "off") != "off"
    return [pytest.mark.slow] * slow + [pytest.mark.smoke] * (case_id(case) in SMOKE)


PARAMS = [pytest.param(case, id=case_id(case), marks=marks(case)) for case in CASES]
assert SMOKE <= {case_id(case) for case in CASES}


def with_paths(spec: dict, models: dict) -> dict:
    """The case with its experts' roles replaced by the files."""
    return dict(spec, experts=[models[spec["family"]][role] for role in spec["experts"]], shape=list(spec["shape"]))


@pytest.fixture(scope="module")
def runs(request, tests_dir, family_models):
    """Every family's multi-rank cases that this session runs (-k, -m), one spawn per world size."""
    selected = {item.callspec.id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = [case for case in CASES if case[2][0] > 1 and case_id(case) in selected]
    return Batched(tests_dir, "family_case", [(n, dict(with_paths(spec, family_models), ulysses=u, ring=r))
                                              for _, _, (n, u, r), spec in cases], timeout_per_case=150)


@pytest.fixture(scope="module")
def references(family_models):
    """reference(spec) -> family_case on one process (uncompiled, unsharded), made once per distinct case."""
    made = {}

    def reference(spec: dict) -> dict:
        compiled = spec.get("compile", "off") != "off"
        spec = {k: v for k, v in with_paths(spec, family_models).items() if k not in ("compile", "shard_weights")}
        if compiled:  # against the plain forward
            spec["forward_inputs"] = {}
        key = json.dumps(spec, sort_keys=True)
        if key not in made:
            made[key] = family_case(0, 1, **spec)
        return made[key]
    return reference


@pytest.mark.timeout(2400)  # the first case of a world size runs the spawn of all its cases
@pytest.mark.parametrize("case", PARAMS)
def test_n_ranks_equal_one_process(runs, references, family_models, case):
    family, name, (world_size, ulysses, ring), spec = case
    expected = references(spec)
    if world_size == 1:  # the one-process run against itself: deterministic (and, compiled, == eager)
        results = [family_case(0, 1, **with_paths(spec, family_models))]
    else:
        results = runs(world_size, **with_paths(spec, family_models), ulysses=ulysses, ring=ring)
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all() and value.abs().max() > 0, key
    for rank, result in enumerate(results):
        for key, value in expected.items():
            if not value.is_floating_point():
                assert torch.equal(result[key], value), f"rank {rank} {key}: {result[key]} != {value}"
                continue
            err = rel_error(result[key], value)
            assert err <= 1e-5, f"rank {rank} {key}: relative error {err:.2e} ({case_id(case)})"
        if "loads" in result:  # each expert loaded once, none reloaded at a switch
            assert int(result["loads"]) == len(spec["experts"]), f"rank {rank}: {int(result['loads'])} DiT loads"
        if spec.get("compile", "off") != "off":
            check_compiled(rank, result, spec["shard_weights"])


def check_compiled(rank: int, result: dict, shard: str) -> None:
    """Every block compiled and run as compiled graphs (with several ranks, one before and one after each
    attention's collectives); FSDP's sharding kept under compile."""
    blocks = int(result["blocks"])
    assert int(result["compiled"]) == blocks, f"rank {rank}: {int(result['compiled'])} of {blocks} blocks compiled"
    assert int(result["graph_runs"]) >= blocks, f"rank {rank}: compiled graphs ran {int(result['graph_runs'])} times"
    assert int(result["fsdp"]) == (blocks if shard == "on" else 0), f"rank {rank}: FSDP sharding lost"

"""Schedules and noise mean what they mean in a native ComfyUI KSampler."""

import pytest
import torch

from usp_video.distributed.sampling.denoiser import make_noise
from usp_video.distributed.models import FAMILIES
from usp_video.distributed.sampling.samplers import get_sampler, sample_euler
from usp_video.distributed.sampling.schedules import sampling_sigmas, simple_sigmas, step_range

WAN, HUNYUAN = FAMILIES["wan2.1"], FAMILIES["hunyuan-video"]


def test_noise_is_comfyui_prepare_noise():
    shape = (1, 16, 3, 6, 8)
    generator = torch.manual_seed(1234)  # what comfy.sample.prepare_noise does
    expected = torch.randn(shape, dtype=torch.float32, layout=torch.strided, generator=generator, device="cpu")
    assert torch.equal(make_noise(shape, 1234), expected)


def test_simple_schedule_values():
    torch.testing.assert_close(simple_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    sigmas = simple_sigmas(4, 5.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(sigmas[:-1], 5 * t / (1 + 4 * t))
    assert sigmas[-1] == 0


def test_denoise_takes_the_tail_of_a_longer_schedule():
    full = simple_sigmas(10, 3.0)
    torch.testing.assert_close(sampling_sigmas(5, 3.0, denoise=0.5), full[-6:])
    with pytest.raises(ValueError, match="denoise must be in"):
        sampling_sigmas(5, 3.0, denoise=0.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling_sigmas(0, 3.0)


def test_latent_normalisation_is_comfyuis_latent_format():
    """process_in / process_out are ComfyUI's latent_formats: Wan21's published per-channel means and stds
    (written in test_references.py), HunyuanVideo's scale factor; and they invert each other."""
    from test_references import WAN21_MEAN, WAN21_STD, per_channel

    x = torch.randn(2, 16, 3, 4, 4)
    torch.testing.assert_close(WAN.process_in(x), (x - per_channel(WAN21_MEAN)) / per_channel(WAN21_STD))
    torch.testing.assert_close(WAN.process_out(WAN.process_in(x)), x)
    torch.testing.assert_close(HUNYUAN.process_out(HUNYUAN.process_in(x)), x)
    torch.testing.assert_close(HUNYUAN.process_in(x), x * 0.476986)  # ComfyUI latent_formats.HunyuanVideo


@pytest.mark.parametrize("name", ["euler", "unipc"])
@pytest.mark.parametrize("steps,shift", [(8, 5.0), (200, 8.0), (50, 12.0)])
def test_samplers_recover_the_target_of_an_exact_model(name, steps, shift):
    """A model that always predicts x0 = target must land on the target, and be asked at
    exactly the schedule's sigmas, in order."""
    target = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn_like(target)
    sigmas = simple_sigmas(steps, shift)
    asked = []

    def model(x_t, sigma):
        asked.append(float(sigma))
        return target

    out = get_sampler(name)(model, x, sigmas)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    assert len(asked) == steps
    torch.testing.assert_close(torch.tensor(asked), sigmas[:-1], atol=2e-6, rtol=0)


@pytest.mark.parametrize("a", [0.0, 0.5, -1.5])
def test_euler_follows_a_model_that_depends_on_x_step_by_step(a):
    """A model whose x0 estimate is a * x_t: every Euler step multiplies x by
    1 + (1 - a) * (sigma_next - sigma) / sigma, so the whole run and each intermediate x have a closed form
    (the exact-target model above cannot tell a wrong step from a right one: its last step lands on the
    target whatever came before)."""
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = simple_sigmas(12, 5.0).double()
    seen = []
    out = sample_euler(lambda x_t, sigma: a * x_t, x, sigmas, lambda i, x_i, d: seen.append(x_i))
    factor = 1.0
    for i in range(len(sigmas) - 1):
        factor *= 1 + (1 - a) * float(sigmas[i + 1] - sigmas[i]) / float(sigmas[i])
        torch.testing.assert_close(seen[i], x * factor, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, x * factor, rtol=1e-12, atol=1e-12)


def test_euler_callback_sees_every_step():
    seen = []
    sample_euler(lambda x, s: torch.zeros_like(x), torch.ones(2), simple_sigmas(3, 1.0),
                 lambda i, x, d: seen.append(i))
    assert seen == [0, 1, 2]


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sampler must be one of unipc, euler"):
        get_sampler("dpmpp")


# -- KSamplerAdvanced's step range (start_at_step, end_at_step, add_noise, leftover noise) --------------


def test_step_range_is_ksampler_advanced():
    sigmas = simple_sigmas(6, 5.0)
    torch.testing.assert_close(step_range(sigmas, 0, 3, leftover_noise=True), sigmas[:4])
    cut = step_range(sigmas, 0, 3, leftover_noise=False)
    torch.testing.assert_close(cut[:3], sigmas[:3])
    assert cut[-1] == 0  # force_full_denoise
    torch.testing.assert_close(step_range(sigmas, 3, 10000), sigmas[3:])
    assert step_range(sigmas, 6, 10000) is None and step_range(sigmas, 2, 2) is None
    assert sigmas[3] != 0  # step_range works on a copy


@pytest.fixture(scope="module")
def engine_and_conds(tiny_models):
    from usp_video.distributed.engine import Engine

    g = torch.Generator().manual_seed(5)
    return Engine(), torch.randn(1, 7, 32, generator=g), torch.randn(1, 5, 32, generator=g)


def _advanced(engine_and_conds, dit, latent, sampler="euler", **fields):
    from usp_video.distributed.requests import SampleRequest

    engine, pos, neg = engine_and_conds
    return engine.sample(SampleRequest(experts=[dit], positive=pos, negative=neg, latent=latent, seed=11, steps=6,
                                       cfg=4.0, shift=8.0, sampler=sampler, **fields)).latent


def test_split_at_a_step_equals_one_run_with_euler(tiny_models, engine_and_conds):
    """The two-sampler layout: 0..k with leftover noise, then k..end without adding noise."""
    from conftest import rel_error

    empty = torch.zeros(1, 16, 3, 4, 6)
    whole = _advanced(engine_and_conds, tiny_models["dit"], empty)
    for k in (1, 3, 5):
        first = _advanced(engine_and_conds, tiny_models["dit"], empty, end_step=k, leftover_noise=True)
        second = _advanced(engine_and_conds, tiny_models["dit"], first, start_step=k, add_noise=False)
        assert rel_error(second, whole) < 1e-5, k
        assert rel_error(first, whole) > 1e-2  # the leftover latent is not the result yet


def test_unipc_split_runs_but_restarts_its_history(tiny_models, engine_and_conds):
    empty = torch.zeros(1, 16, 3, 4, 6)
    whole = _advanced(engine_and_conds, tiny_models["dit"], empty, sampler="unipc")
    first = _advanced(engine_and_conds, tiny_models["dit"], empty, sampler="unipc", end_step=3, leftover_noise=True)
    second = _advanced(engine_and_conds, tiny_models["dit"], first, sampler="unipc", start_step=3, add_noise=False)
    assert torch.isfinite(second).all()
    from conftest import rel_error

    assert 0 < rel_error(second, whole) < 0.5


def test_nothing_left_to_run_returns_the_input(tiny_models, engine_and_conds):
    latent = torch.randn(1, 16, 3, 4, 6)
    out = _advanced(engine_and_conds, tiny_models["dit"], latent, start_step=6)
    assert torch.equal(out, latent)


def test_bad_step_range_is_named(tiny_models, engine_and_conds):
    with pytest.raises(ValueError, match="start_at_step must be an integer >= 0"):
        _advanced(engine_and_conds, tiny_models["dit"], torch.zeros(1, 16, 3, 4, 6), start_step=-1)


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_a_schedule_that_stops_above_zero_keeps_that_much_noise(name):
    """A model that always predicts x0 = target, run from pure noise to sigma s > 0, must land on the
    flow's point at s: s * noise + (1 - s) * target (what a leftover-noise sampler hands on)."""
    g = torch.Generator().manual_seed(1)
    target, noise = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 16, 2, 4, 4, generator=g)
    sigmas = step_range(simple_sigmas(8, 5.0), 0, 5, leftover_noise=True)
    out = get_sampler(name)(lambda x, sigma: target, noise.clone(), sigmas)
    expected = sigmas[-1] * noise + (1 - sigmas[-1]) * target
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

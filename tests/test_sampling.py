"""Schedules and noise mean what they mean in a native ComfyUI KSampler."""

import pytest
import torch

from usp_video.distributed.engine import make_noise
from usp_video.distributed.models import FAMILIES

WAN, HUNYUAN = FAMILIES["wan2.1"], FAMILIES["hunyuan-video"]
from usp_video.distributed.sampling.samplers import get_sampler, sample_euler
from usp_video.distributed.sampling.schedules import sampling_sigmas, simple_sigmas


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


def test_latent_normalisation_round_trips():
    x = torch.randn(2, 16, 3, 4, 4)
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


def test_euler_callback_sees_every_step():
    seen = []
    sample_euler(lambda x, s: torch.zeros_like(x), torch.ones(2), simple_sigmas(3, 1.0),
                 lambda i, x, d: seen.append(i))
    assert seen == [0, 1, 2]


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sampler must be one of unipc, euler"):
        get_sampler("dpmpp")

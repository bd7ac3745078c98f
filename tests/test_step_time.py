"""The step-time pre-flight (preflight.Preflight.check_step_time) in one process: a step estimated longer than
max_step_s is refused before the first step, naming the size and the estimate; 0 is no limit; the estimate follows
the tokens squared and is corrected by a long step's actual time."""

import pytest
import torch

from usp_video.distributed import memory
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.engine import Engine
from usp_video.distributed.requests import SampleRequest


def _request(dit, latent_shape, max_step_s, steps=1):
    return SampleRequest(experts=[dit], positive=torch.randn(1, 8, 32), negative=None, latent=torch.zeros(latent_shape),
                         seed=0, steps=steps, cfg=1.0, shift=5.0, sampler="euler", max_step_s=max_step_s)


def test_a_step_over_the_limit_is_refused_before_it_starts(tiny_models):
    engine = Engine(GroupConfig())
    with pytest.raises(ValueError) as info:  # 8192x8192x1: 262144 tokens; minutes per block on a CPU
        engine.sample(_request(tiny_models["dit"], (1, 16, 1, 1024, 1024), max_step_s=60),
                      on_start=lambda: pytest.fail("the step started"))
    message = str(info.value)
    assert "one step on this latent (1x1024x1024, 262144 tokens) is estimated to take about" in message, message
    assert "above the USP Group node's max_step_s of 60 s" in message and "raise max_step_s" in message
    # the same small latent runs with the limit, and anything runs without one (0)
    assert engine.sample(_request(tiny_models["dit"], (1, 16, 2, 8, 8), max_step_s=60)).latent.isfinite().all()
    dit = engine.load_dit(tiny_models["dit"])
    assert engine.preflight.check_step_time([dit], (1, 16, 1, 1024, 1024), 8, 1, 0) == 0.0


def test_the_estimate_grows_with_the_tokens_squared_and_learns_from_a_long_step(tiny_models):
    engine = Engine(GroupConfig())
    dit = engine.load_dit(tiny_models["dit"])
    preflight = engine.preflight
    small = preflight.step_seconds([dit], (1, 16, 1, 256, 256), 8, 1)
    large = preflight.step_seconds([dit], (1, 16, 1, 512, 512), 8, 1)
    assert 12 < large / small < 17, (small, large)  # 4x the tokens: ~16x the attention, 4x the linear layers
    preflight.observe_step(small, 3 * small + 1.0)  # the step ran slower than estimated
    assert preflight.step_seconds([dit], (1, 16, 1, 256, 256), 8, 1) == pytest.approx(3 * small + 1.0, rel=1e-6)
    attention, linear = memory.step_flops(tokens=1000, hidden=96, ffn=64, blocks=2, batch=2, sp_ranks=2)
    assert attention == 4.0 * 1000 ** 2 * 96 * 2 and linear == 2.0 * 1000 * (6 * 96 ** 2 + 2 * 96 * 64) * 2

"""The Denoiser (distributed/sampling/denoiser.py) with a fake model, in one process: each CFG mode and the
noise-mask blend against the formulas computed by hand (no DiT, no process group)."""

from types import SimpleNamespace

import torch

from usp_video.distributed.sampling.denoiser import Denoiser, Inpaint
from usp_video.distributed.sampling.schedules import timestep

SHAPE = (1, 2, 1, 2, 2)


class FakeFamily:
    """velocity = x * scale + the conditioning's mean (so the two passes differ), and every call recorded."""

    def __init__(self, scale):
        self.scale, self.calls = scale, []

    def velocity(self, model, x, t, cond, options):
        self.calls.append((x.shape[0], t.clone()))
        return x * self.scale + cond["tokens"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)

    def masked_timestep(self, model, t, mask):
        return t * 0 + 1.0  # any change tells that the denoiser asked for it

    def inpaint_latent(self, latent, noise, sigma):
        return sigma * noise + (1 - sigma) * latent


def expert(scale, cfg_degree=1):
    return SimpleNamespace(module=None, family=FakeFamily(scale), sp=SimpleNamespace(cfg_degree=cfg_degree))


def cond(value, tokens=3):
    return {"tokens": torch.full((1, tokens, 4), float(value))}


def denoiser(experts, positive, negative, cfgs, boundary=0.5, inpaint=None):
    switched = []
    d = Denoiser(experts, lambda sigma: 0 if sigma >= boundary or len(experts) == 1 else 1, cfgs, positive, negative,
                 options={}, device=torch.device("cpu"), dtype=torch.float32, batch=1, running=experts[0],
                 switch=switched.append, inpaint=inpaint)
    return d, switched


def test_one_pass_batched_sequential_and_the_expert_switch():
    x, sigma = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor(0.7)
    one = expert(2.0)
    d, _ = denoiser([one], cond(1.0), None, [5.0])
    assert torch.equal(d(x, sigma), x - sigma * (2.0 * x + 1.0))  # no negative: the positive pass alone
    d, _ = denoiser([one], cond(1.0), cond(-1.0), [1.0])
    assert torch.allclose(d(x, sigma), x - sigma * (2.0 * x + 1.0))  # cfg 1: one pass
    one.family.calls.clear()
    d, _ = denoiser([one], cond(1.0), cond(-1.0), [5.0])
    v_pos, v_neg = 2.0 * x + 1.0, 2.0 * x - 1.0
    assert torch.allclose(d(x, sigma), x - sigma * (v_neg + 5.0 * (v_pos - v_neg)))
    assert [b for b, _ in one.family.calls] == [2]  # same shapes: one batched forward
    one.family.calls.clear()
    d, _ = denoiser([one], cond(1.0), cond(-1.0, tokens=5), [5.0])
    assert torch.allclose(d(x, sigma), x - sigma * (v_neg + 5.0 * (v_pos - v_neg)))
    assert [b for b, _ in one.family.calls] == [1, 1]  # other shapes: one pass after the other
    assert torch.allclose(one.family.calls[0][1], torch.tensor([float(timestep(sigma))]))
    high, low = expert(2.0), expert(3.0)
    d, switched = denoiser([high, low], cond(1.0), None, [1.0, 1.0])
    assert torch.equal(d(x, torch.tensor(0.8)), x - 0.8 * (2.0 * x + 1.0)) and switched == []
    assert torch.equal(d(x, torch.tensor(0.3)), x - 0.3 * (3.0 * x + 1.0)) and switched == [low]
    d(x, torch.tensor(0.2))
    assert switched == [low]  # already running


def test_the_noise_mask_keeps_the_latent_where_it_is_zero():
    g = torch.Generator().manual_seed(1)
    x, latent, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    mask = torch.zeros(SHAPE)
    mask[..., 0] = 1.0  # sample the first column, keep the second
    sigma = torch.tensor(0.6)
    one = expert(2.0)
    d, _ = denoiser([one], cond(1.0), None, [1.0], inpaint=Inpaint(mask, latent, noise, mask))
    seen = x * mask + (sigma * noise + (1 - sigma) * latent) * (1 - mask)  # ComfyUI's KSamplerX0Inpaint
    expected = (seen - sigma * (2.0 * seen + 1.0)) * mask + latent * (1 - mask)
    assert torch.allclose(d(x, sigma), expected)
    assert torch.equal(one.family.calls[0][1], torch.ones(1))  # the family timed the kept tokens

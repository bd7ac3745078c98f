"""Rules checked against references that the rules' own code did not produce, all local (no COMFYUI_DIR):

- the Wan I2V start video the family builds, against ComfyUI's WAN21.concat_cond written out by hand (the mask
  inverted from WanImageToVideo's: 1 on the start frames' 4 mask channels, 0 after; the latent normalised with the
  published Wan 2.1 means and stds);
- a Wan 2.2 TI2V-5B start-image run of the engine, against a hand-written euler loop with ComfyUI's
  KSamplerX0Inpaint blend (WAN22's scale_latent_inpaint and process_timestep) over diffusers' stock model;
- an fp8 Linear layer (the cast path, and the fp8 compute path where torch._scaled_mm runs), against float32 /
  float64 arithmetic by hand: the stored fp8 weight times its scale, the input quantized as the path does, the bias
  as it is;
- the activations pre-flight, term by term, for one shape, exactly.
The step caches' rules are in test_step_cache_rules.py.
"""

import pytest
import torch

from conftest import rel_error
from parity_targets import make_engine, request
from usp_video.distributed.models import FAMILIES

# ComfyUI's latent_formats.Wan21 (the Wan 2.1 VAE's published per-channel statistics)
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def per_channel(values) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1, 1, 1)


# -- Wan I2V: the start video beside the noise -----------------------------------------------------------

@pytest.mark.parametrize("start_frames", [1, 2])
def test_the_wan_i2v_start_video_is_comfyuis_concat_cond(tiny_models, start_frames):
    """WanImageToVideo's concat_mask is 0 where the start video holds; WAN21.concat_cond gives the model
    1 - mask on 4 channels, then the start video's latent through process_latent_in: the model sees 1 on the start
    frames' mask channels and 0 after."""
    from usp_video.distributed.models.wan21.tiny import tiny_image_conditioning

    shape = (3, 4, 6)
    cond = tiny_image_conditioning(shape, start_frames=start_frames)
    model = make_engine().dit(tiny_models["dit_i2v"], "wan2.1")
    built = FAMILIES["wan2.1"].model_conditioning(model, cond, (1, 16, *shape), "positive")["concat"]
    mask = torch.zeros(1, 4, *shape)
    mask[:, :, :start_frames] = 1.0
    image = (cond["concat_latent_image"] - per_channel(WAN21_MEAN)) / per_channel(WAN21_STD)
    torch.testing.assert_close(built, torch.cat([mask, image], dim=1), rtol=1e-6, atol=1e-6)


def test_a_wan_i2v_start_video_without_a_mask_gets_a_zero_mask(tiny_models):
    """concat_cond without concat_mask (nor a denoise mask): zeros on the 4 mask channels."""
    from usp_video.distributed.models.wan21.tiny import tiny_image_conditioning

    shape = (2, 4, 6)
    cond = tiny_image_conditioning(shape)
    del cond["concat_mask"]
    model = make_engine().dit(tiny_models["dit_i2v"], "wan2.1")
    built = FAMILIES["wan2.1"].model_conditioning(model, cond, (1, 16, *shape), "positive")["concat"]
    assert not built[:, :4].any()


# -- Wan 2.2 TI2V-5B: the start image's inpaint sampling -------------------------------------------------

def test_ti2v_5b_start_image_run_is_an_inpaint_euler_loop_over_stock_diffusers(tiny_5b):
    """ComfyUI's KSampler with the LATENT's noise_mask (1 where it samples), euler, written out: each step the
    model sees x * mask + latent * (1 - mask) (WAN22.scale_latent_inpaint: the clean latent), with timestep
    1000 sigma x the frame's mean mask per token (WAN22.process_timestep), and the estimate is blended back
    the same way."""
    from usp_video.distributed.models.wan21.dit import load_wan_transformer
    from usp_video.distributed.models.wan22_5b import LATENTS_MEAN, LATENTS_STD
    from usp_video.distributed.sampling.schedules import sampling_sigmas

    family = FAMILIES["wan2.2-ti2v-5b"]
    shape = (3, 2, 6)
    req = request(family.name, [tiny_5b["dit"]], shape, sampler="euler", steps=3, start_image=True)
    ours = make_engine().sample(req).latent

    mean, std = per_channel(LATENTS_MEAN), per_channel(LATENTS_STD)
    latent = (req.latent - mean) / std  # process_latent_in
    mask = req.noise_mask.float().expand_as(latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(req.seed))  # prepare_noise
    sigmas = sampling_sigmas(req.steps, req.shift)
    stock = load_wan_transformer(tiny_5b["dit"])
    context = torch.cat([req.positive["tokens"], req.negative["tokens"]])
    tokens_per_frame = (shape[1] // 2) * (shape[2] // 2)
    x = sigmas[0] * noise + (1 - sigmas[0]) * latent  # the flow's noise_scaling
    for i in range(req.steps):
        sigma = sigmas[i]
        x_in = x * mask + latent * (1 - mask)
        t = (1000 * sigma * mask.mean(dim=(1, 3, 4))).repeat_interleave(tokens_per_frame, dim=1)  # [1, tokens]
        with torch.no_grad():
            v_pos, v_neg = stock(torch.cat([x_in, x_in]), t.expand(2, -1), context, return_dict=False)[0].chunk(2)
        denoised = x_in - sigma * (v_neg + req.cfg * (v_pos - v_neg))
        denoised = denoised * mask + latent * (1 - mask)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    expected = x * std + mean  # process_latent_out (the last sigma is 0)
    assert (mask[:, :, 0] == 0).all() and (mask[:, :, 1:] == 1).all()
    assert rel_error(ours, expected) <= 1e-5


# -- fp8: one Linear layer by hand -----------------------------------------------------------------------

def fp8_layer(scaled: bool, seed: int = 0):
    """A 32 -> 48 Linear whose weight came from an fp8 file (keep_fp8: stored in e4m3fn, with the file's scale),
    its float weight and its (sizeable) bias."""
    from usp_video.distributed.formats import fp8

    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(32, 48)
    weight, bias = torch.randn(48, 32, generator=g) * 0.05, torch.randn(48, generator=g)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    scale = float(weight.abs().max() / 448.0) if scaled else 1.0
    model = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([layer])})
    fp8.keep_fp8(model, {"blocks.0.weight": torch.full((48,), scale)}, ("blocks",))
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.float(), (weight / scale).to(torch.float8_e4m3fn).float())  # the file's values
    return layer, scale, bias


def by_hand(x: torch.Tensor, layer, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """x @ (stored fp8 weight x scale)^T + bias, in float64."""
    weight = layer.weight.to(torch.float64) * scale
    return x.double() @ weight.T + bias.double()


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_an_fp8_layer_computes_its_fp8_weight_times_scale_and_its_bias(scaled):
    layer, scale, bias = fp8_layer(scaled)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float32 and rel_error(out, by_hand(x, layer, scale, bias)) <= 1e-6


def _scaled_mm_runs_here() -> bool:
    try:
        one = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_compute_is_the_quantized_input_times_the_fp8_weight_plus_the_bias(scaled):
    """The fp8 compute path (use_scaled_mm): the input quantized per tensor (scale = max |x| / 448, e4m3fn),
    times the stored fp8 weight and its scale, accumulated in float32, plus the bias unrounded."""
    from usp_video.distributed.formats import fp8

    if not _scaled_mm_runs_here():
        pytest.skip(f"torch._scaled_mm does not run on this CPU build (torch {torch.__version__})")
    layer, scale, bias = fp8_layer(scaled)
    assert fp8.use_scaled_mm(torch.nn.ModuleList([layer])) == 1
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1)) * 3
    x_scale = x.abs().max() / 448.0
    x_fp8 = (x / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    with torch.no_grad():
        out = layer(x)
    expected = by_hand(x_fp8.double() * x_scale.double(), layer, scale, bias)
    assert out.shape == (2, 8, 48) and rel_error(out, expected) <= 1e-6


# -- the activations pre-flight, term by term ------------------------------------------------------------

def test_the_activation_prediction_term_by_term():
    """memory.py's formula for 1001 tokens, width 64, FFN 256, batch 2, 2-byte elements, on 4 ranks: each term
    worked out here (per rank ceil(1001 / 4) = 251 tokens; 2 x 251 = 502 token rows)."""
    from usp_video.distributed.memory import step_activation_bytes

    rows = 2 * 251
    blocks = rows * (5.5 * 64 + 2.25 * 256) * 2     # the block's tensors: 5.5 x hidden + 2.25 x ffn per token
    ulysses = rows * 6.0 * 64 * 2                    # the all-to-all's buffers: 6 x hidden per token
    ring = rows * 2.5 * 64 * 2                       # K/V chunks in flight: 2.5 x hidden per token
    ring_fp32 = rows * 2.0 * 64 * 4                  # the ring's output and its merge, in float32: 4 bytes
    fixed = (8 << 20) * (1 + 2)                      # 8 MiB, plus 8 MiB per batch element
    assert (blocks, ulysses, ring, ring_fp32) == (931_712, 385_536, 160_640, 257_024)
    args = (1001, 64, 256, 2, 2)
    assert step_activation_bytes(*args, sp_ranks=4) == blocks + fixed
    assert step_activation_bytes(*args, sp_ranks=4, ulysses=4) == blocks + ulysses + fixed
    assert step_activation_bytes(*args, sp_ranks=4, ring=4) == blocks + ring + ring_fp32 + fixed
    assert step_activation_bytes(*args, sp_ranks=4, ulysses=2, ring=2) == blocks + ulysses + ring + ring_fp32 + fixed


def test_the_preflight_predicts_the_tiny_wan_step_from_its_shape(tiny_models):
    """Preflight.activation_bytes for the tiny Wan (12 heads x 8 = 96 wide, FFN 64) on a 5 x 4 x 6 latent: 5 x 2 x 3
    = 30 tokens (its 1x2x2 patches; the text joins by cross-attention), both passes batched: batch 2, float32."""
    from usp_video.distributed.preflight import Preflight

    engine = make_engine()
    dit = engine.load_dit(tiny_models["dit"], "wan2.1")
    rows = 2 * 30
    expected = int(rows * (5.5 * 96 + 2.25 * 64) * 4 + (8 << 20) * 3)
    preflight = Preflight(1, torch.device("cpu"), torch.float32)
    assert preflight.activation_bytes([dit], (1, 16, 5, 4, 6), 24, passes=2) == expected

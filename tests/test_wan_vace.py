"""Wan 2.1 VACE: the control contexts WanVaceToVideo makes (stacked, each with its strength; a reference image's
frame prepended) through the VACE blocks on N ranks.

N ranks against one process: vace_cases, run by test_parity.py's harness (`pytest tests/test_parity.py -k vace`):
every factorization of 2, 3 and 4 ranks for the tiny DiT's 4 heads, 35 tokens (uneven on all), diffusers' own
forward under our hooks, samples with two stacked contexts of strengths 1 and 0.6 behind a reference frame (and,
on one factorization of each size, without it; on 2 ranks, text alone), and one run with sharded weights. Here: one process against diffusers' stock WanVACETransformer3DModel, the strengths and contexts
used as ComfyUI uses them, the native conditioning read by our samplers, and the refusals. Against ComfyUI's own
WanVaceToVideo + KSampler + TrimVideoLatent: comfyui_reference/vace.py (test_comfyui_native.py).
"""

import pytest
import torch

from conftest import rel_error
from parity_targets import make_engine, request
from usp_video.distributed.parallel.mesh import valid_factorizations

HEADS = 4  # the tiny VACE DiT's (4 x 128: ComfyUI's detection needs 128-wide heads)
UNEVEN = (5, 2, 14)  # 35 tokens: divides none of 2, 3, 4
SMALL = (3, 4, 6)
FAMILY = "wan2.1-vace"


def vace_cases():
    """test_parity.py's cases of this family: (name, (ranks, ulysses, ring), family_case's kwargs)."""
    for n in (2, 3, 4):
        for i, (u, r) in enumerate(valid_factorizations(n, HEADS)):
            sampler = "unipc" if (n + u) % 2 else "euler"
            # two stacked contexts (strengths 1, 0.6) behind a reference frame on every factorization
            samples = [{"contexts": 2, "reference": True, "sampler": sampler}]
            if i == 0:  # and without the reference frame; a VACE model without VACE conditioning (zero frames, ones)
                samples += [{"contexts": 2, "sampler": sampler}] + [{"vace": False, "steps": 2}] * (n == 2)
            yield "forward-sample", (n, u, r), dict(shape=UNEVEN, forward_inputs={}, samples=samples)
    # the weights sharded (FSDP over the main and the VACE blocks, each rank reading its shards of the file)
    yield "sharded", (2, 2, 1), dict(shape=UNEVEN, shard_weights="on", samples=[{"contexts": 2, "steps": 2}])


def vace_request(models, shape=SMALL, **kwargs):
    return request(FAMILY, [models["dit"]], shape, **kwargs)


def velocity(engine, req, x_seed=6):
    """The engine's VACE velocity for the request's positive side at timestep 700 (model_conditioning included)."""
    dit = engine.load_dit(req.experts[0])
    shape = tuple(req.latent.shape)
    cond = dit.family.model_conditioning(dit.module, req.positive, shape, "positive")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(x_seed))
    with torch.no_grad():
        return dit.family.velocity(dit.module, x, torch.tensor([700.0]), cond, {}), cond, x


def stock_model(path):
    """diffusers' WanVACETransformer3DModel, as it comes, with our loaded weights."""
    from diffusers import WanVACETransformer3DModel

    from usp_video.distributed.models.wan_vace import dit
    from usp_video.distributed.models.wan_vace.tiny import TINY_VACE_CONFIG

    stock = WanVACETransformer3DModel(**TINY_VACE_CONFIG)
    stock.load_state_dict(dit.load_vace_transformer(path).state_dict())
    return stock.eval()


@pytest.mark.parametrize("reference", [False, True])
def test_forward_equals_diffusers_stock_model(tiny_vace, reference):
    """One context at strength 0.6 (diffusers: the same scale at every VACE layer), with or without a reference
    frame: our velocity (the engine's path: model_conditioning's vace_context, our K-context loop) == diffusers'."""
    engine = make_engine()
    req = vace_request(tiny_vace, reference=reference)
    req.positive["vace_strength"] = torch.tensor([[0.6]])
    ours, cond, x = velocity(engine, req)
    layers = len(engine.load_dit(tiny_vace["dit"]).module.config.vace_layers)
    with torch.no_grad():
        expected = stock_model(tiny_vace["dit"])(x, torch.tensor([700.0]), cond["tokens"],
                                                 control_hidden_states=cond["vace_context"][:, 0],
                                                 control_hidden_states_scale=torch.full((layers,), 0.6),
                                                 return_dict=False)[0]
    assert rel_error(ours, expected) <= 1e-5


def test_stacked_contexts_add_each_with_its_strength(tiny_vace):
    """Two contexts (strengths 1 and 0.6) differ from the first alone; the second at strength 0 is the first alone;
    and the control, the mask and the strength each change the velocity."""
    engine = make_engine()
    two, _, _ = velocity(engine, vace_request(tiny_vace, contexts=2))
    first = vace_request(tiny_vace, contexts=2)
    first.positive = {key: (value[:, :1] if key != "tokens" else value) for key, value in first.positive.items()}
    one, _, _ = velocity(engine, first)
    assert rel_error(two, one) > 1e-3
    muted = vace_request(tiny_vace, contexts=2)
    muted.positive["vace_strength"] = torch.tensor([[1.0, 0.0]])
    assert rel_error(velocity(engine, muted)[0], one) <= 1e-6
    for key, other in (("vace_frames", lambda v: v.flip(-1)), ("vace_mask", lambda v: 1.0 - v),
                       ("vace_strength", lambda v: v * 0.5)):
        changed = vace_request(tiny_vace, contexts=2)
        changed.positive[key] = other(changed.positive[key])
        assert rel_error(velocity(engine, changed)[0], two) > 1e-3, key


def test_without_vace_conditioning_runs_as_comfyui_does(tiny_vace):
    """No vace_frames: one context of zero frames (process_in'd), a mask of ones, strength 1 (WAN21_Vace.extra_conds)."""
    from usp_video.distributed.models import FAMILIES

    engine = make_engine()
    plain = vace_request(tiny_vace, vace=False)
    explicit = vace_request(tiny_vace, vace=False)
    shape = tuple(plain.latent.shape)
    explicit.positive = dict(plain.positive, vace_frames=torch.zeros(1, 1, 32, *shape[2:]),
                             vace_mask=torch.ones(1, 1, 64, *shape[2:]), vace_strength=torch.ones(1, 1))
    ours, cond, _ = velocity(engine, plain)
    assert torch.equal(cond["vace_context"][0, 0, :16], FAMILIES["wan2.1"].process_in(torch.zeros(1, 16, *shape[2:]))[0])
    assert rel_error(ours, velocity(engine, explicit)[0]) == 0.0


@pytest.mark.parametrize("case,message", [
    ("other length", "vace_frames is .* give the sampler WanVaceToVideo's own latent"),
    ("fewer masks", "carries 2 VACE control video.* with 1 mask"),
    ("frame channels", "vace_frames has 16 channels; WanVaceToVideo makes 32"),
    ("t2v given vace", "vace_frames"),
    ("step cache", "step caches are not available for Wan 2.1 VACE"),
])
def test_vace_inputs_that_do_not_fit_are_refused(tiny_vace, tiny_models, case, message):
    req = vace_request(tiny_vace, contexts=2)
    if case == "other length":
        req.latent = torch.zeros(1, 16, SMALL[0] + 1, *SMALL[1:])
    elif case == "fewer masks":
        req.positive["vace_mask"] = req.positive["vace_mask"][:, :1]
    elif case == "frame channels":
        req.positive["vace_frames"] = req.positive["vace_frames"][:, :, :16]
    elif case == "t2v given vace":
        req.experts = [tiny_models["dit"]]
        req.positive["tokens"] = req.negative["tokens"] = torch.randn(1, 24, 32)
    elif case == "step cache":
        req.cache = {"method": "fbcache", "threshold": 0.1}
    with pytest.raises(ValueError, match=message):
        make_engine().sample(req)


def native(cond: dict):
    """A side's tensors as ComfyUI's CONDITIONING carries them after WanVaceToVideo node(s): lists, one entry per
    node (frames [1, 32, T, H, W], mask [1, 64, T, H, W], strength a float)."""
    count = cond["vace_frames"].shape[1]
    return [[cond["tokens"], {"pooled_output": None,
                              "vace_frames": [cond["vace_frames"][:, k] for k in range(count)],
                              "vace_mask": [cond["vace_mask"][:, k] for k in range(count)],
                              "vace_strength": [float(s) for s in cond["vace_strength"][0]]}]]


def test_native_vace_conditioning_reaches_the_request(tiny_vace):
    """Our samplers read WanVaceToVideo's lists as the stacked tensors, unchanged in meaning; a text-to-video
    family refuses them naming WanVaceToVideo."""
    from usp_video.distributed import models
    from usp_video.nodes.conditioning import family_conditioning

    cond = vace_request(tiny_vace, contexts=2).positive
    read, options = family_conditioning(native(cond), "positive", models.get(FAMILY))
    assert options == {} and set(read) == set(cond)
    for key, value in cond.items():
        assert torch.equal(read[key], value), key
    with pytest.raises(ValueError, match=r"vace_frames \(from WanVaceToVideo, for a Wan VACE model: load one"):
        family_conditioning(native(cond), "positive", models.get("wan2.1"))
    broken = native(cond)
    broken[0][1]["vace_strength"] = ["strong", 1.0]
    with pytest.raises(ValueError, match="vace_strength"):
        family_conditioning(broken, "positive", models.get(FAMILY))


def test_the_generic_loader_detects_vace_files(tiny_vace, tiny_models):
    """check_dit_file picks the VACE family for a VACE file (and ComfyUI's names: VACE blocks every other layer),
    leaves a plain Wan 2.1 file to Wan 2.1, and the Wan 2.1 loader refuses a VACE file by what it is."""
    from usp_video.distributed.models import CheckpointError, check_dit_file

    family, config = check_dit_file(tiny_vace["dit"])
    assert family.name == FAMILY and config["vace_layers"] == [0, 2]
    assert check_dit_file(tiny_models["dit"])[0].name == "wan2.1"
    with pytest.raises(CheckpointError, match="looks like a Wan VACE diffusion model"):
        check_dit_file(tiny_vace["dit"], "wan2.1")


def test_a_diffusers_vace_folder_loads(tiny_vace, tmp_path):
    """A diffusers WanVACETransformer3DModel folder is this family's and loads to the same model as the single file."""
    from usp_video.distributed.models import check_dit_file

    stock_model(tiny_vace["dit"]).save_pretrained(tmp_path / "transformer")
    assert check_dit_file(tmp_path / "transformer")[0].name == FAMILY
    engine = make_engine()
    req = vace_request(tiny_vace, contexts=2)
    expected = velocity(engine, req)[0]
    req.experts = [str(tmp_path / "transformer")]
    assert rel_error(velocity(engine, req)[0], expected) == 0.0


def test_vace_config_from_comfyui_names_alone(tiny_vace, tmp_path):
    """A file without our metadata (as Comfy-Org's): the config from its shapes, as ComfyUI's detection reads it
    (VACE blocks counted, mapped every num_layers // count layers)."""
    from usp_video.distributed.formats.checkpoint import read_header
    from usp_video.distributed.models.wan_vace import dit
    from usp_video.distributed.models.wan21.dit import WAN_VARIANTS

    shapes = {name: (list(shape), "F32") for name, (shape, _) in read_header(tiny_vace["dit"])[0].items()}
    shapes["patch_embedding.weight"] = ([1536, 16, 1, 2, 2], "F32")
    for i in range(30):
        shapes[f"blocks.{i}.self_attn.q.weight"] = ([1536, 1536], "F32")
    for i in range(15):
        shapes[f"vace_blocks.{i}.after_proj.weight"] = ([1536, 1536], "F32")
    config = dit.infer_vace_config(tmp_path / "wan2.1_vace_1.3B_fp16.safetensors", shapes, {})
    assert config == dict(WAN_VARIANTS["wan2.1-t2v-1.3b"], vace_layers=list(range(0, 30, 2)), vace_in_channels=96)


def test_cli_generate_from_a_start_image(tmp_path, tiny_vace):
    """generate --image with the tiny VACE model on 2 ranks: the start image as WanVaceToVideo's control video
    (its frame kept by the control mask, gray after), both halves encoded by the group's split encode; the same
    run as the engine given that conditioning on one process. The control changes the video."""
    import subprocess
    import sys

    from PIL import Image
    from safetensors.torch import load_file

    from usp_video.distributed.models import FAMILIES
    from usp_video.distributed.requests import EncodeRequest

    rng = torch.Generator().manual_seed(12)
    pixels = (torch.rand(24, 40, 3, generator=rng) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "start.png")
    run = subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", "generate", "--dit", tiny_vace["dit"],
                          "--text-encoder", tiny_vace["text_encoder"], "--vae", tiny_vace["vae"], "--prompt", "a cat",
                          "--image", str(tmp_path / "start.png"), "--width", "48", "--height", "32", "--frames", "5",
                          "--steps", "2", "--cfg", "1.0", "--sampler", "euler", "--ranks", "2",
                          "--save-latent", str(tmp_path / "out.latent")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    latent = load_file(str(tmp_path / "out.latent"))["latent_tensor"]
    engine = make_engine()
    family = FAMILIES[FAMILY]
    control = family.start_image_conditioning(lambda frames: (engine.encode_video(tiny_vace["vae"], frames), family),
                                              pixels.float()[None] / 255.0, 48, 32, 5)
    assert control["vace_frames"].shape == (1, 1, 32, 2, 4, 6) and control["vace_mask"].shape == (1, 1, 64, 2, 4, 6)
    # WanVaceToVideo samples the pixel mask in time nearest-exact (5 frames -> pixel frames 1 and 3): the start
    # image is in the inactive half's first latent frame, while the latent mask is 1 throughout
    assert torch.equal(control["vace_mask"], torch.ones(1, 1, 64, 2, 4, 6))
    tokens = engine.encode(EncodeRequest(family=FAMILY, files={"text_encoder": tiny_vace["text_encoder"]},
                                         prompt="a cat"))["tokens"]
    req = vace_request(tiny_vace, shape=(2, 4, 6), steps=2, cfg=1.0, sampler="euler", seed=0)
    req.positive, req.negative, req.family = {"tokens": tokens, **control}, None, FAMILY
    assert rel_error(latent, engine.sample(req).latent) <= 1e-5
    req.positive = {"tokens": tokens}
    assert rel_error(latent, engine.sample(req).latent) > 1e-3


def test_vace_workflows_link_matching_types():
    """Every link of the shipped VACE workflows joins an output to an input of its type (trim_latent, slot 3, into
    TrimVideoLatent's trim_amount; WanVaceToVideo's conditionings and latent into the USP sampler). ComfyUI's own
    definitions of the native nodes: test_comfyui_native.py."""
    from usp_video.workflows import make_workflows
    from usp_video.workflows.vace_workflows import vace_workflows

    for name, graph in vace_workflows(make_workflows.WAN_T2V).items():
        assert make_workflows.WORKFLOWS[name] == graph
        for node_id, (class_type, _, _, links, _, _) in graph.items():
            sockets = dict(make_workflows.SOCKETS[class_type]) if links else {}
            for input_name, (src, slot) in links.items():
                made = graph[src][4][slot][1]
                assert made in sockets[input_name].split(","), (name, node_id, input_name, made)


def test_batched_sides_keep_their_own_strengths(tiny_vace):
    """Both CFG passes in one batch (the denoiser joins them when their tensors have the same shapes), each row with
    its own strengths and contexts, give each side's own velocity (ComfyUI runs unequal strengths apart)."""
    from usp_video.distributed.sampling.denoiser import _both

    engine = make_engine()
    dit = engine.load_dit(tiny_vace["dit"])
    req = vace_request(tiny_vace, contexts=2)
    req.negative = dict(vace_request(tiny_vace, contexts=2).positive, vace_strength=torch.tensor([[0.3, 1.5]]))
    req.negative["vace_frames"] = req.negative["vace_frames"].flip(-2)
    shape = tuple(req.latent.shape)
    sides = [dit.family.model_conditioning(dit.module, side, shape, name)
             for side, name in ((req.positive, "positive"), (req.negative, "negative"))]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([700.0])
    with torch.no_grad():
        apart = [dit.family.velocity(dit.module, x, t, side, {}) for side in sides]
        both = dit.family.velocity(dit.module, torch.cat([x, x]), t.repeat(2), _both(*sides), {})
    assert rel_error(apart[0], apart[1]) > 1e-3
    for row, expected in enumerate(apart):
        assert rel_error(both[row:row + 1], expected) <= 1e-5, row

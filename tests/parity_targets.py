"""Functions run on N gloo ranks by the parity tests (see usp_video.distributed.testing.spawn)."""

from pathlib import Path

import torch

from usp_video.distributed.parallel.mesh import build_sequence_parallel
from usp_video.distributed.parallel.sharding import gather_sequence, shard_sequence
from usp_video.distributed.parallel.usp_attention import KeyLayout, tail_padding_mask, usp_attention


def attention_inputs(seq_len: int, heads: int, head_dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq_len, heads, head_dim, generator=g) for _ in range(3)]


def usp_attention_rank(rank, world_size, ulysses, ring, seq_len, heads, backend="sdpa"):
    sp = build_sequence_parallel(ulysses, ring)
    q, k, v = (shard_sequence(t, 1, sp) for t in attention_inputs(seq_len, heads))
    out = usp_attention(q, k, v, sp, seq_len, backend)
    return {"out": gather_sequence(out, 1, sp, seq_len)}


def usp_joint_attention_rank(rank, world_size, ulysses, ring, seq_len, text_len, heads, shard_text):
    """Video tokens sharded, text tokens either sharded too or held whole by every rank."""
    sp = build_sequence_parallel(ulysses, ring)
    q, k, v = attention_inputs(seq_len + text_len, heads)
    video = [shard_sequence(t[:, :seq_len], 1, sp) for t in (q, k, v)]
    text = [t[:, seq_len:] for t in (q, k, v)]
    local = video[0].shape[1]
    if shard_text:
        assert text_len % sp.degree == 0
        text = [shard_sequence(t, 1, sp) for t in text]
        layout = KeyLayout(torch.cat([tail_padding_mask(seq_len, local, sp.degree),
                                      torch.ones(sp.degree, text_len // sp.degree, dtype=torch.bool)], 1), sp)
        out = usp_attention(*(torch.cat([a, b], 1) for a, b in zip(video, text)), sp, layout)
        video_out, text_out = out[:, :local], gather_sequence(out[:, local:], 1, sp, text_len)
    else:
        video_out, text_out = usp_attention(*video, sp, seq_len, joint=tuple(text))
    return {"video": gather_sequence(video_out, 1, sp, seq_len), "text": text_out}


def dit_inputs(shape, text_len=20, text_dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, *shape, generator=g)
    context = torch.randn(2, text_len, text_dim, generator=g)
    t = torch.tensor([900.0, 250.0])
    return x, t, context


def make_engine(rank=0, world_size=1, ulysses="auto", ring="auto", cfg_degree=1, shard_weights="off",
                vae_split=False, dit_offload=False, placement="offload", compile="off"):
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    return Engine(GroupConfig(ranks=world_size, ulysses=ulysses, ring=ring, cfg_parallel=cfg_degree,
                              shard_weights=shard_weights, vae_split=vae_split, dit_offload=dit_offload,
                              placement=placement, compile=compile), rank=rank)


def dit_forward(engine, dit_path, shape):
    x, t, context = dit_inputs(shape)
    with torch.no_grad():
        return engine.dit(dit_path)(x, t, context, return_dict=False)[0]


def dit_forward_rank(rank, world_size, ulysses, ring, dit_path, shape, compile="off", shard_weights="off"):
    if compile != "off":
        return compiled_forward(rank, world_size, ulysses, ring, dit_path, shape, shard_weights)
    engine = make_engine(rank, world_size, ulysses, ring)
    out = dit_forward(engine, dit_path, shape)
    assert (engine.sp.ulysses_degree, engine.sp.ring_degree) == (ulysses, ring)
    return {"out": out}


def compiled_forward(rank, world_size, ulysses, ring, dit_path, shape, shard_weights="off"):
    """The DiT forward with every block compiled (compile aot_eager) after USP and FSDP, through the engine;
    also how many times compiled graphs ran (a counting backend around aot_eager: a block that fell back to
    eager, or was never compiled, adds nothing) and how many blocks are compiled and FSDP's."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch.distributed.fsdp import FSDPModule

    from usp_video.distributed.parallel import compile as compile_mod

    runs = [0]

    def counting(gm, example_inputs):
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            runs[0] += 1
            return compiled(*args)
        run._boxed_call = getattr(compiled, "_boxed_call", False)
        return run

    torch._dynamo.reset()  # each case compiles afresh (the cases share the ranks)
    saved, compile_mod.BACKEND_OF["aot_eager"] = compile_mod.BACKEND_OF["aot_eager"], counting
    try:
        engine = make_engine(rank, world_size, ulysses, ring, shard_weights=shard_weights, compile="aot_eager")
        out = dit_forward(engine, dit_path, shape)
    finally:
        compile_mod.BACKEND_OF["aot_eager"] = saved
    assert (engine.sp.ulysses_degree, engine.sp.ring_degree) == (ulysses, ring)
    model = engine.dit(dit_path)
    blocks = model.usp_family.blocks(model)
    return {"out": out, "graph_runs": torch.tensor(runs[0]), "blocks": torch.tensor(len(blocks)),
            "compiled": torch.tensor(sum(compile_mod.is_compiled(b) for b in blocks)),
            "fsdp": torch.tensor(sum(isinstance(b, FSDPModule) for b in blocks))}


def sample_request(dit_path, shape, steps=4, sampler="unipc", seed=7, cfg=5.0):
    from usp_video.distributed.requests import SampleRequest

    g = torch.Generator().manual_seed(3)
    return SampleRequest(experts=[dit_path], positive=torch.randn(1, 24, 32, generator=g),
                         negative=torch.randn(1, 24, 32, generator=g), latent=torch.zeros(1, 16, *shape),
                         seed=seed, steps=steps, cfg=cfg, shift=5.0, sampler=sampler)


def sample_rank(rank, world_size, ulysses, ring, dit_path, shape, sampler):
    engine = make_engine(rank, world_size, ulysses, ring)
    return {"latent": engine.sample(sample_request(dit_path, shape, sampler=sampler))}


def variant_request(dit_path, variant):
    """Sampler calls beyond the plain case: batch 2, cfg 1, denoise < 1, unequal text lengths."""
    req = sample_request(dit_path, (3, 4, 6), steps=3, sampler="unipc")
    g = torch.Generator().manual_seed(5)
    if variant == "batch2":
        req.latent = torch.zeros(2, 16, 3, 4, 6)
    elif variant == "cfg1":
        req.cfg, req.negative = 1.0, None
    elif variant == "denoise":
        req.latent, req.denoise, req.sampler = torch.randn(1, 16, 3, 4, 6, generator=g), 0.6, "euler"
    elif variant == "unequal_text":
        req.negative = {"tokens": torch.randn(1, 9, 32, generator=g)}
    return req


def sample_variant_rank(rank, world_size, ulysses, ring, dit_path, variant):
    engine = make_engine(rank, world_size, ulysses, ring)
    return {"latent": engine.sample(variant_request(dit_path, variant))}


# -- HunyuanVideo --------------------------------------------------------------------------------

def hunyuan_inputs(shape, text_len, pad=5, seed=2):
    """Video latent, timestep, text padded by `pad` masked tokens (as the reference pipeline pads
    to 256), pooled CLIP vector and embedded guidance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, *shape, generator=g)
    context = torch.randn(2, text_len + pad, 32, generator=g)
    mask = torch.zeros(2, text_len + pad, dtype=torch.long)
    mask[:, :text_len] = 1
    pooled = torch.randn(2, 16, generator=g)
    return x, torch.tensor([900.0, 250.0]), context, mask, pooled, torch.tensor([6000.0, 6000.0])


def hunyuan_forward(model, shape, text_len):
    with torch.no_grad():
        return model(*hunyuan_inputs(shape, text_len), return_dict=False)[0]


def hunyuan_forward_rank(rank, world_size, ulysses, ring, dit_path, shape, text_len):
    engine = make_engine(rank, world_size, ulysses, ring)
    out = hunyuan_forward(engine.dit(dit_path), shape, text_len)
    assert (engine.sp.ulysses_degree, engine.sp.ring_degree) == (ulysses, ring)
    return {"out": out}


def hunyuan_request(dit_path, shape, cfg=1.0, text_lens=(12, 7), steps=4):
    from usp_video.distributed.requests import SampleRequest

    g = torch.Generator().manual_seed(4)
    positive = {"tokens": torch.randn(1, text_lens[0], 32, generator=g), "pooled": torch.randn(1, 16, generator=g)}
    negative = ({"tokens": torch.randn(1, text_lens[1], 32, generator=g), "pooled": torch.randn(1, 16, generator=g)}
                if cfg != 1.0 else None)
    return SampleRequest(experts=[dit_path], positive=positive, negative=negative,
                         latent=torch.zeros(1, 16, *shape), seed=11, steps=steps, cfg=cfg, shift=7.0,
                         sampler="euler", options={"guidance": 6.0})


def hunyuan_sample_rank(rank, world_size, ulysses, ring, dit_path, shape, cfg):
    engine = make_engine(rank, world_size, ulysses, ring)
    return {"latent": engine.sample(hunyuan_request(dit_path, shape, cfg))}


def cfg_parallel_sample_rank(rank, world_size, ulysses, ring, dit_path, family, cfg):
    """CFG-parallel: the conditional and unconditional passes on the two halves of the group."""
    engine = make_engine(rank, world_size, ulysses, ring, cfg_degree=2)
    if family == "wan":
        request = sample_request(dit_path, (5, 2, 14), sampler="euler", cfg=cfg)
    else:
        request = hunyuan_request(dit_path, (5, 2, 14), cfg=cfg)
    latent = engine.sample(request)
    assert (engine.sp.cfg_degree, engine.sp.ulysses_degree, engine.sp.ring_degree) == (2, ulysses, ring)
    return {"latent": latent}


def sharded_rank(rank, world_size, ulysses, ring, dit_path, family, text_encoder=None):
    """FSDP-sharded DiT (and UMT5): forward outputs, and the bytes of parameters this rank holds."""
    from usp_video.distributed.parallel.fsdp import parameter_bytes

    from usp_video.distributed.models.streamed import TensorFile

    engine = make_engine(rank, world_size, ulysses, ring, shard_weights="on")
    model = engine.dit(dit_path)
    assert engine.sharded["dit"]
    read = TensorFile.read_from.get(str(Path(dit_path)), 0)  # what this rank read of the DiT's file
    if family == "wan":
        out = dit_forward(engine, dit_path, (5, 2, 14))
    else:
        out = hunyuan_forward(model, (5, 2, 14), 7)
    result = {"out": out, "bytes": torch.tensor([parameter_bytes(model)]), "read": torch.tensor([read])}
    if text_encoder is not None:
        from usp_video.distributed.requests import EncodeRequest

        request = EncodeRequest(family="wan2.1", files={"text_encoder": text_encoder},
                                prompt="a cat walks on the beach at sunset")
        assert engine.encode_on_all_ranks(request)
        result["cond"] = engine.encode(request)["tokens"]
        result["te_bytes"] = torch.tensor([parameter_bytes(engine.text_part("text_encoder").model)])
        result["te_read"] = torch.tensor([TensorFile.read_from[str(Path(text_encoder))]])
    return result


def offloaded_rank(rank, world_size, wan, hunyuan, experts):
    """dit_offload (shard_weights auto, placement offload): samples of Wan, HunyuanVideo and the two Wan 2.2
    experts; for each DiT, its FSDP modules and how many have CPUOffloadPolicy (unpinned on CPU ranks) and
    whether every parameter is in host memory; the moves the placement made (none: the experts stay put)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from usp_video.distributed.parallel.fsdp import offload_policies
    from usp_video.distributed.placement import Placement

    moved = []
    real_move = Placement._move
    Placement._move = staticmethod(lambda loaded, device: (moved.append(device), real_move(loaded, device)))
    engine = make_engine(rank, world_size, shard_weights="auto", dit_offload=True)
    out = {}
    for name, request in (("wan", sample_request(wan, (3, 4, 6), steps=2, sampler="euler")),
                          ("hunyuan", hunyuan_request(hunyuan, (5, 2, 14), cfg=3.0, steps=2)),
                          ("experts", wan22_request(experts, (3, 4, 6), "euler", steps=6))):
        out[name] = engine.sample(request)
        for i, (slot, (_, model)) in enumerate((s, m) for s, m in engine._loaded.items() if s.startswith("dit:")):
            policies = offload_policies(model)
            out[f"{name}:{i}:policies"] = torch.tensor([
                len(policies), len(model.usp_family.blocks(model)) + 1,
                sum(isinstance(p, CPUOffloadPolicy) and not p.pin_memory for p in policies),
                all(p.device.type == "cpu" for p in model.parameters())])
            out[f"{name}:{i}:where"] = torch.tensor(engine.placement.where[slot] == "offloaded")
    out["moves"] = torch.tensor(len(moved))
    assert engine.sharded["dit"]
    return out


def vae_split_rank(rank, world_size, vae_path, shape, seed=5, tiling=None, channels=16):
    engine = make_engine(rank, world_size, vae_split=True)
    if tiling:  # HunyuanVideo VAE: tiles small enough that a tiny latent makes many of them
        engine.vae(vae_path).enable_tiling(**tiling)
    latent = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed))
    progress = []
    frames = engine.decode(vae_path, latent, lambda done, total: progress.append((done, total)))
    return {"frames": frames, "progress": torch.tensor(progress)} if frames is not None else {}


def sharded_llama_rank(rank, world_size, llama, clip, tokenizers, prompt):
    """HunyuanVideo's Llama with sharded weights: every rank takes part in the encode."""
    from usp_video.distributed.models.streamed import TensorFile
    from usp_video.distributed.parallel.fsdp import parameter_bytes

    from usp_video.distributed.requests import EncodeRequest

    engine = make_engine(rank, world_size, shard_weights="on")
    request = EncodeRequest(family="hunyuan-video", files={"llama": llama, "clip": clip, "tokenizers": tokenizers},
                            prompt=prompt)
    assert engine.encode_on_all_ranks(request)
    cond = engine.encode(request)
    held = parameter_bytes(engine.text_part("llama"))
    read = TensorFile.read_from[str(Path(llama))]  # what this rank read of the Llama's file
    return {"cond": cond["tokens"], "pooled": cond["pooled"], "bytes": torch.tensor([held]), "read": torch.tensor([read])}


def sharded_bf16_rank(rank, world_size, dit_path, ulysses="auto", ring="auto", shard_weights="on"):
    """bf16 compute (with sharding: the blocks mix bf16 weights and float32 norms/modulation), one forward
    on uneven tokens (5 x 1 x 7 = 35)."""
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    engine = Engine(GroupConfig(ranks=world_size, dtype="bf16", ulysses=ulysses, ring=ring,
                                shard_weights=shard_weights), rank=rank)
    x, t, context = dit_inputs((5, 2, 14))
    with torch.no_grad():
        out = engine.dit(dit_path)(x.bfloat16(), t, context.bfloat16(), return_dict=False)[0]
    return {"out": out.float()}


# -- several experts (one DiT per sigma range, as Wan 2.2 A14B) ----------------------------------

def experts_request(experts, boundaries, shape=(5, 2, 14)):
    request = sample_request(experts[0], shape, steps=4, sampler="euler")
    request.experts, request.boundaries = list(experts), list(boundaries)
    return request


def experts_sample_rank(rank, world_size, ulysses, ring, experts, boundaries):
    engine = make_engine(rank, world_size, ulysses, ring)
    return {"latent": engine.sample(experts_request(experts, boundaries))}


def run_cases(rank, world_size, target, cases):
    """Several cases of one target function in the same ranks (tests/batched.py): each case's
    results come back under the prefix "<index>/"."""
    function = globals()[target]
    out = {}
    for i, kwargs in enumerate(cases):
        for name, value in (function(rank, world_size, **kwargs) or {}).items():
            out[f"{i}/{name}"] = value
    return out


# -- Wan 2.2 A14B (test_wan22.py) ------------------------------------------------------------------------

def wan22_forward(engine, path, shape):
    x, t, context = dit_inputs(shape)
    with torch.no_grad():
        return engine.dit(path, "wan2.2-a14b")(x, t, context, return_dict=False)[0]


def wan22_request(experts, shape, sampler, steps=6):
    """A run across the switch: shift 12 and boundary 0.875 put it after step 4 of 6; cfg per expert."""
    request = sample_request(experts[0], shape, steps=steps, sampler=sampler, cfg=4.0)
    request.experts, request.family, request.shift = list(experts), "wan2.2-a14b", 12.0
    request.boundaries = [0.875] if len(experts) == 2 else []
    request.cfg = [4.0, 3.0] if len(experts) == 2 else 4.0
    return request


def wan22_rank(rank, world_size, ulysses, ring, experts, shape, sampler):
    engine = make_engine(rank, world_size, ulysses, ring)
    out = {f"forward{i}": wan22_forward(engine, path, shape) for i, path in enumerate(experts)}
    assert (engine.sp.ulysses_degree, engine.sp.ring_degree) == (ulysses, ring)
    out["latent"] = engine.sample(wan22_request(experts, shape, sampler))
    out["loads"] = torch.tensor(engine.load_counts["dit"])
    return out


# -- Wan 2.2 TI2V-5B (test_wan22_5b.py) ------------------------------------------------------------------

def ti2v_inputs(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 48, *shape, generator=g), torch.tensor([900.0, 250.0]),
            torch.randn(2, 20, 32, generator=g))


def ti2v_forward(engine, path, shape):
    x, t, context = ti2v_inputs(shape)
    with torch.no_grad():
        return engine.dit(path)(x, t, context, return_dict=False)[0]


def ti2v_request(dit_path, shape, sampler, steps=4):
    request = sample_request(dit_path, shape, steps=steps, sampler=sampler)
    request.latent = torch.zeros(1, 48, *shape)
    return request


def ti2v_token_timesteps(model, shape):
    """Per-token timesteps [2, S] as the 5B takes them under a noise mask, each frame its own (mask means 0..1)."""
    from usp_video.distributed.models import FAMILIES

    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, shape[0], 1, 1, generator=g).expand(2, 48, *shape)
    return FAMILIES["wan2.2-ti2v-5b"].masked_timestep(model, torch.tensor([900.0, 250.0]), mask)


def ti2v_masked_forward(engine, dit_path, shape):
    x, _, context = ti2v_inputs(shape)
    model = engine.dit(dit_path)
    with torch.no_grad():
        return model(x, ti2v_token_timesteps(model, shape), context, return_dict=False)[0]


def ti2v_start_image(shape, batch=1, seed=4):
    """A LATENT as ComfyUI's Wan22ImageToVideoLatent makes it from a start image: raw space, the image's latent
    in the first frame, process_out(0) (the means) after it; noise_mask [B, 1, T, H, W], 0 on the first frame."""
    from usp_video.distributed.models import FAMILIES

    g = torch.Generator().manual_seed(seed)
    family = FAMILIES["wan2.2-ti2v-5b"]
    latent = family.process_out(torch.zeros(batch, 48, *shape))
    latent[:, :, :1] = torch.randn(1, 48, 1, *shape[1:], generator=g)
    mask = torch.ones(batch, 1, *shape)
    mask[:, :, :1] = 0.0
    return latent, mask


def ti2v_image_request(dit_path, shape, sampler, steps=4):
    request = ti2v_request(dit_path, shape, sampler, steps=steps)
    request.latent, request.noise_mask = ti2v_start_image(shape)
    return request


def ti2v_rank(rank, world_size, ulysses, ring, dit_path, shape, sampler):
    engine = make_engine(rank, world_size, ulysses, ring)
    out = {"forward": ti2v_forward(engine, dit_path, shape)}
    assert (engine.sp.ulysses_degree, engine.sp.ring_degree) == (ulysses, ring)
    out["latent"] = engine.sample(ti2v_request(dit_path, shape, sampler))
    out["masked_forward"] = ti2v_masked_forward(engine, dit_path, shape)
    out["image_latent"] = engine.sample(ti2v_image_request(dit_path, shape, sampler))
    return out


# -- step caches (test_step_cache.py) ---------------------------------------------------------------

CACHE_SHAPE = (5, 2, 14)  # 35 tokens: divides none of 2, 3, 4


def cached_request(dit_path, family, method, threshold, steps=10):
    """A run with a step cache: Wan with cfg 5 (one batched pass for both sides), HunyuanVideo with cfg 1."""
    if family == "wan":
        request = sample_request(dit_path, CACHE_SHAPE, steps=steps, sampler="euler")
    else:
        request = hunyuan_request(dit_path, CACHE_SHAPE, steps=steps)
    request.cache = {"method": method, "threshold": threshold}
    return request


def cached_run(engine, request) -> dict:
    latent = engine.sample(request)
    report = engine.step_cache.report()
    trace = torch.tensor([[step, own, value] for step, _, own, value in engine.step_cache.trace], dtype=torch.float64)
    passes = {f"skipped_{key}": torch.tensor(steps, dtype=torch.long) for key, steps in report["skipped_per_pass"].items()}
    return {"latent": latent, "skipped": torch.tensor(report["skipped_steps"], dtype=torch.long), "trace": trace,
            "cfg_rank": torch.tensor(engine.sp.cfg_rank), **passes}


def cached_sample_rank(rank, world_size, ulysses, ring, dit_path, family, method, threshold, cfg_degree=1):
    engine = make_engine(rank, world_size, ulysses, ring, cfg_degree=cfg_degree)
    return cached_run(engine, cached_request(dit_path, family, method, threshold))


def cached_offloaded_rank(rank, world_size, dit_path, family, method, threshold):
    """A step cache on an offloaded DiT (dit_offload): HunyuanVideo's cache gathers its first block itself."""
    engine = make_engine(rank, world_size, shard_weights="on", dit_offload=True)
    return cached_run(engine, cached_request(dit_path, family, method, threshold))


def cached_cfg_parallel_rank(rank, world_size, dit_path, threshold, shard="off"):
    engine = make_engine(rank, world_size, 1, 2, cfg_degree=2, shard_weights=shard)
    request = cached_request(dit_path, "wan", "fbcache", threshold)
    request.negative = {"tokens": request.negative["tokens"][:, :9]}
    return cached_run(engine, request)


# -- LoRAs (test_lora.py) ------------------------------------------------------------------------------

def lora_request(dit_path, family, loras, shape=(3, 4, 6), steps=3):
    """A short sample with LoRAs ([[file, strength], ...]) on a Wan (cfg 1: a distillation LoRA's setting) or
    HunyuanVideo DiT."""
    req = sample_request(dit_path, shape, steps=steps, sampler="euler", cfg=1.0) if family == "wan" else \
        hunyuan_request(dit_path, shape, cfg=1.0, steps=steps)
    req.negative, req.loras = None, [loras]
    return req


def lora_rank(rank, world_size, ulysses, ring, dit_path, family, loras, shard_weights="off"):
    engine = make_engine(rank, world_size, ulysses, ring, shard_weights=shard_weights)
    out = {"latent": engine.sample(lora_request(dit_path, family, loras))}
    assert engine.sharded["dit"] == (shard_weights == "on")
    return out


# -- image to video (test_wan_i2v.py) -----------------------------------------------------------------

def i2v_conditioning(shape, clip_vision=True, start_frames=1, seed=4):
    """A side of Wan image-to-video conditioning as native WanImageToVideo (+ CLIPVisionEncode) make it: the
    start video's raw latent, its mask (0 on the start image's latent frames) and CLIP vision features."""
    g = torch.Generator().manual_seed(seed)
    cond = {"tokens": torch.randn(1, 24, 32, generator=g), "concat_latent_image": torch.randn(1, 16, *shape, generator=g),
            "concat_mask": torch.ones(1, 1, *shape)}
    cond["concat_mask"][:, :, :start_frames] = 0.0
    if clip_vision:
        cond["clip_vision"] = torch.randn(1, 257, 1280, generator=g)
    return cond


def i2v_request(experts, shape, clip_vision=True, cfg=5.0, steps=3):
    from usp_video.distributed.requests import SampleRequest

    negative = i2v_conditioning(shape, clip_vision, seed=5)
    negative["concat_latent_image"] = i2v_conditioning(shape, clip_vision)["concat_latent_image"]  # one start video
    return SampleRequest(experts=list(experts), boundaries=[0.9] if len(experts) == 2 else [],
                         positive=i2v_conditioning(shape, clip_vision), negative=negative,
                         latent=torch.zeros(1, 16, *shape), seed=3, steps=steps, cfg=cfg, shift=5.0, sampler="euler")


def i2v_forward(engine, request, family=None):
    """The first expert's velocity for the request's positive side at timestep 700 (the engine's own path)."""
    model = engine.dit(request.experts[0], family)
    shape = tuple(request.latent.shape)
    cond = model.usp_family.model_conditioning(model, request.positive, shape, "positive")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return model.usp_family.velocity(model, x, torch.tensor([700.0]), cond, {})


def i2v_rank(rank, world_size, ulysses, ring, experts, shape, clip_vision, family=None):
    engine = make_engine(rank, world_size, ulysses, ring)
    request = i2v_request(experts, shape, clip_vision)
    request.family = family
    return {"forward": i2v_forward(engine, request, family), "latent": engine.sample(request)}

"""What the parity tests run on N gloo ranks (usp_video.distributed.testing.spawn), and on one process as the
reference: the same function, so "N ranks == one process" compares like with like.

The family facts (latent channels, text width, pooled vector, guidance) live in each family's tiny.py
(`tiny_inputs(shape, ...)`: one forward's inputs; `tiny_request(family, experts, shape, ...)`: a SampleRequest's
fields). Here they are reached by family name only:

    forward(engine, "hunyuan-video", path, shape, text_len=12)     one forward of the tiny DiT
    request("wan2.2-a14b", experts, shape, sampler="euler")         a SampleRequest
    family_case(rank, world_size, family=..., experts=..., ...)     one parity case (tests/test_parity.py)
    run_cases(rank, world_size, target, cases)                      many cases in one spawn (tests/batched.py)

The rank functions further down serve the tests of one feature each (sharding, offload, step caches, LoRAs,
cfg-parallel, the split VAE).
"""

import importlib
from pathlib import Path

import torch

from usp_video.distributed.models import FAMILIES
from usp_video.distributed.parallel.mesh import build_sequence_parallel
from usp_video.distributed.parallel.sharding import gather_sequence, shard_sequence
from usp_video.distributed.parallel.usp_attention import KeyLayout, tail_padding_mask, usp_attention


# -- a family's tiny debug config, by name -------------------------------------------------------------

def family_of(name: str):
    """The ModelFamily of a name ("wan2.1") or short name ("wan", "hunyuan")."""
    return FAMILIES.get(name) or next(f for f in FAMILIES.values() if f.short_name == name)


def tiny(name: str):
    """The family's tiny.py module (its tiny_inputs and tiny_request)."""
    return importlib.import_module(f"{type(family_of(name)).__module__}.tiny")


def inputs(family: str, shape, **kwargs) -> tuple:
    """One forward's positional inputs for the family's tiny DiT (kwargs: its tiny_inputs' own)."""
    return tiny(family).tiny_inputs(tuple(shape), **kwargs)


def model_forward(model, family: str, shape, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(family, shape, **kwargs), return_dict=False)[0]


def forward(engine, family: str, path: str, shape, **kwargs) -> torch.Tensor:
    """The engine's DiT in path (loaded as family) on the family's tiny inputs."""
    return model_forward(engine.dit(path, family_of(family).name), family, shape, **kwargs)


def request(family: str, experts: list[str], shape, **kwargs):
    """A SampleRequest from the family's tiny_request (kwargs: its own, e.g. sampler, cfg, steps)."""
    from usp_video.distributed.requests import SampleRequest

    return SampleRequest(**tiny(family).tiny_request(family_of(family), list(experts), tuple(shape), **kwargs))


def make_engine(rank=0, world_size=1, ulysses="auto", ring="auto", cfg_degree=1, shard_weights="off",
                vae_split=False, dit_offload=False, placement="offload", compile="off", free_memory=None):
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine

    return Engine(GroupConfig(ranks=world_size, ulysses=ulysses, ring=ring, cfg_parallel=cfg_degree,
                              shard_weights=shard_weights, vae_split=vae_split, dit_offload=dit_offload,
                              placement=placement, compile=compile), rank=rank,
                  **({} if free_memory is None else {"free_memory": free_memory}))


# -- one parity case of a family (tests/test_parity.py) ---------------------------------------------------

def variant(req, name: str):
    """Sampler calls beyond the plain case: batch 2, cfg 1, denoise < 1, unequal text lengths."""
    g = torch.Generator().manual_seed(5)
    if name == "batch2":
        req.latent = req.latent.expand(2, *req.latent.shape[1:]).clone()
    elif name == "cfg1":
        req.cfg, req.negative = 1.0, None
    elif name == "denoise":
        req.latent, req.denoise, req.sampler = torch.randn(req.latent.shape, generator=g), 0.6, "euler"
    elif name == "unequal_text":
        req.negative = {"tokens": torch.randn(1, 9, req.positive["tokens"].shape[-1], generator=g)}
    return req


def image_forward(engine, req, family=None) -> torch.Tensor:
    """The first expert's velocity for the request's positive side at timestep 700 (the engine's own path, the
    image conditioning included)."""
    dit = engine.load_dit(req.experts[0], family)
    shape = tuple(req.latent.shape)
    cond = dit.family.model_conditioning(dit.module, req.positive, shape, "positive")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return dit.family.velocity(dit.module, x, torch.tensor([700.0]), cond, {})


def image_request(experts, shape, clip_vision=True, family=None, **kwargs):
    """A Wan image-to-video SampleRequest (Wan 2.1 I2V; two experts: Wan 2.2 I2V A14B as family)."""
    from usp_video.distributed.models.wan21.tiny import tiny_image_request
    from usp_video.distributed.requests import SampleRequest

    req = SampleRequest(**tiny_image_request(list(experts), tuple(shape), clip_vision, **kwargs))
    req.family = family
    return req


def masked_forward(engine, path: str, shape) -> torch.Tensor:
    """The 5B's forward with per-token timesteps (a noise mask's: each frame its own)."""
    x, _, context = inputs("wan2.2-ti2v-5b", shape)
    model = engine.dit(path)
    with torch.no_grad():
        return model(x, token_timesteps(model, shape), context, return_dict=False)[0]


def token_timesteps(model, shape):
    """Per-token timesteps [2, S] as the 5B takes them under a noise mask, each frame its own (mask means 0..1)."""
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, shape[0], 1, 1, generator=g).expand(2, 48, *shape)
    return FAMILIES["wan2.2-ti2v-5b"].masked_timestep(model, torch.tensor([900.0, 250.0]), mask)


def family_case(rank, world_size, family, experts, shape, ulysses=1, ring=1, forward_inputs=None, samples=(),
                image=None, masked=False, compile="off", shard_weights="off"):
    """One parity case, all in one engine, each part asked for by its argument:
    forward_inputs   the forward of each expert on the family's tiny inputs (tiny_inputs' kwargs) -> "forward<i>"
    masked           the 5B's forward with per-token timesteps -> "masked_forward"
    samples          samples, each tiny_request's kwargs plus "variant" (one of variant's) or "boundaries" (the
                     experts' sigma boundaries) -> "latent<i>", and the DiT loads after them -> "loads"
    image            a Wan image-to-video forward and sample ({"clip_vision": bool}) -> "image_forward", "image_latent"
    compile          the forward with every block compiled (compiled_forward)."""
    if compile != "off":
        return compiled_forward(rank, world_size, ulysses, ring, experts[0], shape, shard_weights)
    engine = make_engine(rank, world_size, ulysses, ring, shard_weights=shard_weights)
    out = {}
    for i, path in enumerate(experts if forward_inputs is not None else []):
        out[f"forward{i}"] = forward(engine, family, path, shape, **forward_inputs)
    if masked:
        out["masked_forward"] = masked_forward(engine, experts[0], shape)
    for i, kwargs in enumerate(samples):
        kwargs = dict(kwargs)
        name, boundaries = kwargs.pop("variant", None), kwargs.pop("boundaries", None)
        req = request(family, experts, shape, **kwargs)
        if boundaries is not None:
            req.boundaries = list(boundaries)
        out[f"latent{i}"] = engine.sample(variant(req, name) if name else req).latent
        out["loads"] = torch.tensor(engine.load_counts["dit"])
    if image is not None:
        req = image_request(experts, shape, family=None if family == "wan2.1" else family, **image)
        out["image_forward"] = image_forward(engine, req, req.family)
        out["image_latent"] = engine.sample(req).latent
    sp = engine.load_dit(experts[-1], None if family == "wan2.1" else family_of(family).name).sp
    assert (sp.ulysses_degree, sp.ring_degree) == (ulysses, ring)
    return out


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
        out = forward(engine, "wan2.1", dit_path, shape)
    finally:
        compile_mod.BACKEND_OF["aot_eager"] = saved
    dit = engine.load_dit(dit_path)
    assert (dit.sp.ulysses_degree, dit.sp.ring_degree) == (ulysses, ring)
    blocks = dit.family.blocks(dit.module)
    return {"forward0": out, "graph_runs": torch.tensor(runs[0]), "blocks": torch.tensor(len(blocks)),
            "compiled": torch.tensor(sum(compile_mod.is_compiled(b) for b in blocks)),
            "fsdp": torch.tensor(sum(isinstance(b, FSDPModule) for b in blocks))}


def run_cases(rank, world_size, target, cases):
    """Several cases of one target function in the same ranks (tests/batched.py): each case's
    results come back under the prefix "<index>/"."""
    function = globals()[target]
    out = {}
    for i, kwargs in enumerate(cases):
        for name, value in (function(rank, world_size, **kwargs) or {}).items():
            out[f"{i}/{name}"] = value
    return out


# -- shorthands for the tests of single features (fp8, GGUF, LoRA, step cache, memory, placement) ----------

def dit_inputs(shape, seed=1):
    return inputs("wan2.1", shape, seed=seed)


def ti2v_inputs(shape, seed=1):
    return inputs("wan2.2-ti2v-5b", shape, seed=seed)


def dit_forward(engine, dit_path, shape):
    return forward(engine, "wan2.1", dit_path, shape)


def hunyuan_forward(model, shape, text_len):
    return model_forward(model, "hunyuan-video", shape, text_len=text_len)


def sample_request(dit_path, shape, steps=4, sampler="unipc", seed=7, cfg=5.0):
    return request("wan2.1", [dit_path], shape, steps=steps, sampler=sampler, seed=seed, cfg=cfg)


def hunyuan_request(dit_path, shape, cfg=1.0, text_lens=(12, 7), steps=4):
    return request("hunyuan-video", [dit_path], shape, cfg=cfg, text_lens=text_lens, steps=steps)


def wan22_request(experts, shape, sampler, steps=6):
    return request("wan2.2-a14b", experts, shape, sampler=sampler, steps=steps)


def ti2v_request(dit_path, shape, sampler, steps=4):
    return request("wan2.2-ti2v-5b", [dit_path], shape, sampler=sampler, steps=steps)


def experts_request(experts, boundaries, shape=(5, 2, 14)):
    """Several Wan DiTs, one per sigma range (as Wan 2.2 A14B)."""
    req = request("wan2.1", experts, shape, steps=4, sampler="euler")
    req.boundaries = list(boundaries)
    return req


# -- attention alone (test_usp_attention.py) ---------------------------------------------------------------

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


# -- cfg-parallel, sharding, offload (test_cfg_parallel.py, test_sharding.py, test_fp8.py, test_gguf.py) ----

def cfg_parallel_sample_rank(rank, world_size, ulysses, ring, dit_path, family, cfg):
    """CFG-parallel: the conditional and unconditional passes on the two halves of the group."""
    engine = make_engine(rank, world_size, ulysses, ring, cfg_degree=2)
    kwargs = dict(sampler="euler") if family_of(family).name == "wan2.1" else {}
    result = engine.sample(request(family, [dit_path], (5, 2, 14), cfg=cfg, **kwargs))
    assert (result.sp.cfg_degree, result.sp.ulysses_degree, result.sp.ring_degree) == (2, ulysses, ring)
    return {"latent": result.latent}


def sharded_rank(rank, world_size, ulysses, ring, dit_path, family, text_encoder=None):
    """FSDP-sharded DiT (and UMT5): forward outputs, and the bytes of parameters this rank holds."""
    from usp_video.distributed.formats.tensor_file import TensorFile
    from usp_video.distributed.parallel.fsdp import parameter_bytes

    engine = make_engine(rank, world_size, ulysses, ring, shard_weights="on")
    model = engine.dit(dit_path)
    assert engine.sharded["dit"]
    read = TensorFile.read_from.get(str(Path(dit_path)), 0)  # what this rank read of the DiT's file
    out = model_forward(model, family, (5, 2, 14), **({} if family_of(family).name == "wan2.1" else {"text_len": 7}))
    result = {"out": out, "bytes": torch.tensor([parameter_bytes(model)]), "read": torch.tensor([read])}
    if text_encoder is not None:
        from usp_video.distributed.requests import EncodeRequest

        req = EncodeRequest(family="wan2.1", files={"text_encoder": text_encoder},
                            prompt="a cat walks on the beach at sunset")
        assert engine.encode_on_all_ranks(req)
        result["cond"] = engine.encode(req)["tokens"]
        result["te_bytes"] = torch.tensor([parameter_bytes(engine.text.text_part("text_encoder").model)])
        result["te_read"] = torch.tensor([TensorFile.read_from[str(Path(text_encoder))]])
    return result


def offloaded_rank(rank, world_size, wan, hunyuan, experts):
    """dit_offload (shard_weights auto, placement offload): samples of Wan, HunyuanVideo and the two Wan 2.2
    experts; for each DiT, its FSDP modules and how many have CPUOffloadPolicy (unpinned on CPU ranks) and
    whether every parameter is in host memory; the moves the placement made (none: the experts stay put)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from usp_video.distributed.parallel.fsdp import offload_policies
    from usp_video.distributed.residency import Placement

    moved = []
    real_move = Placement._move
    Placement._move = staticmethod(lambda loaded, device: (moved.append(device), real_move(loaded, device)))
    engine = make_engine(rank, world_size, shard_weights="auto", dit_offload=True)
    out = {}
    for name, req in (("wan", sample_request(wan, (3, 4, 6), steps=2, sampler="euler")),
                      ("hunyuan", hunyuan_request(hunyuan, (5, 2, 14), cfg=3.0, steps=2)),
                      ("experts", wan22_request(experts, (3, 4, 6), "euler", steps=6))):
        out[name] = engine.sample(req).latent
        for i, (slot, dit) in enumerate(engine.residency.dits()):
            model = dit.module
            policies = offload_policies(model)
            out[f"{name}:{i}:policies"] = torch.tensor([
                len(policies), len(dit.family.blocks(model)) + 1,
                sum(isinstance(p, CPUOffloadPolicy) and not p.pin_memory for p in policies),
                all(p.device.type == "cpu" for p in model.parameters())])
            out[f"{name}:{i}:where"] = torch.tensor(engine.placement.where[slot] == "offloaded")
    out["moves"] = torch.tensor(len(moved))
    assert engine.sharded["dit"]
    return out


def sharded_llama_rank(rank, world_size, llama, clip, tokenizers, prompt):
    """HunyuanVideo's Llama with sharded weights: every rank takes part in the encode."""
    from usp_video.distributed.formats.tensor_file import TensorFile
    from usp_video.distributed.parallel.fsdp import parameter_bytes
    from usp_video.distributed.requests import EncodeRequest

    engine = make_engine(rank, world_size, shard_weights="on")
    req = EncodeRequest(family="hunyuan-video", files={"llama": llama, "clip": clip, "tokenizers": tokenizers},
                        prompt=prompt)
    assert engine.encode_on_all_ranks(req)
    cond = engine.encode(req)
    held = parameter_bytes(engine.text.text_part("llama"))
    read = TensorFile.read_from[str(Path(llama))]  # what this rank read of the Llama's file
    return {"cond": cond["tokens"], "pooled": cond["pooled_output"], "bytes": torch.tensor([held]), "read": torch.tensor([read])}


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


# -- the split VAE (test_vae_split.py, test_wan22_5b.py) ----------------------------------------------------

def vae_split_rank(rank, world_size, vae_path, shape, seed=5, tiling=None, channels=16):
    engine = make_engine(rank, world_size, vae_split=True)
    if tiling:  # HunyuanVideo VAE: tiles small enough that a tiny latent makes many of them
        engine.vae(vae_path).enable_tiling(**tiling)
    latent = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed))
    progress = []
    frames = engine.decode(vae_path, latent, lambda done, total: progress.append((done, total)))
    return {"frames": frames, "progress": torch.tensor(progress)} if frames is not None else {}


def encode_frames(shape, seed=7) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 from a seed: every rank builds the same video."""
    return torch.rand(*shape, 3, generator=torch.Generator().manual_seed(seed))


def split_encode_rank(rank, world_size, vae, shape, tiling=None):
    engine = make_engine(rank, world_size, vae_split=True)
    if tiling:  # a VAE that encodes in tiles (HunyuanVideo 1.5's): tiles small enough that a tiny video makes many
        engine.vae(vae).enable_tiling(**tiling)
    progress = []
    latent = engine.encode_video(vae, encode_frames(shape), lambda done, total: progress.append((done, total)))
    return {"latent": latent, "progress": torch.tensor(progress)} if latent is not None else {}


def vae_case(rank, world_size, kind, **kwargs):
    """One split VAE case: kind "decode" (vae_split_rank) or "encode" (split_encode_rank)."""
    return {"decode": vae_split_rank, "encode": split_encode_rank}[kind](rank, world_size, **kwargs)


# -- step caches (test_step_cache.py) ---------------------------------------------------------------

CACHE_SHAPE = (5, 2, 14)  # 35 tokens: divides none of 2, 3, 4


def cached_request(dit_path, family, method, threshold, steps=10):
    """A run with a step cache: Wan with cfg 5 (one batched pass for both sides), HunyuanVideo with cfg 1."""
    kwargs = dict(sampler="euler") if family_of(family).name == "wan2.1" else {}
    req = request(family, [dit_path], CACHE_SHAPE, steps=steps, **kwargs)
    req.cache = {"method": method, "threshold": threshold}
    return req


def cached_run(engine, req) -> dict:
    result = engine.sample(req)
    latent, report = result.latent, result.step_cache.report()
    trace = torch.tensor([[step, own, value] for step, _, own, value in result.step_cache.trace], dtype=torch.float64)
    passes = {f"skipped_{key}": torch.tensor(steps, dtype=torch.long) for key, steps in report["skipped_per_pass"].items()}
    return {"latent": latent, "skipped": torch.tensor(report["skipped_steps"], dtype=torch.long), "trace": trace,
            "cfg_rank": torch.tensor(result.sp.cfg_rank), **passes}


def cached_sample_rank(rank, world_size, ulysses, ring, dit_path, family, method, threshold, cfg_degree=1):
    engine = make_engine(rank, world_size, ulysses, ring, cfg_degree=cfg_degree)
    return cached_run(engine, cached_request(dit_path, family, method, threshold))


def cached_offloaded_rank(rank, world_size, dit_path, family, method, threshold):
    """A step cache on an offloaded DiT (dit_offload): HunyuanVideo's cache gathers its first block itself."""
    engine = make_engine(rank, world_size, shard_weights="on", dit_offload=True)
    return cached_run(engine, cached_request(dit_path, family, method, threshold))


def cached_cfg_parallel_rank(rank, world_size, dit_path, threshold, shard="off"):
    engine = make_engine(rank, world_size, 1, 2, cfg_degree=2, shard_weights=shard)
    req = cached_request(dit_path, "wan", "fbcache", threshold)
    req.negative = {"tokens": req.negative["tokens"][:, :9]}
    return cached_run(engine, req)


# -- LoRAs (test_lora.py) ------------------------------------------------------------------------------

def lora_request(dit_path, family, loras, shape=(3, 4, 6), steps=3):
    """A short sample with LoRAs ([[file, strength], ...]) on a Wan (cfg 1: a distillation LoRA's setting) or
    HunyuanVideo DiT."""
    kwargs = dict(sampler="euler") if family_of(family).name == "wan2.1" else {}
    req = request(family, [dit_path], shape, steps=steps, cfg=1.0, **kwargs)
    req.negative, req.loras = None, [loras]
    return req


def lora_rank(rank, world_size, ulysses, ring, dit_path, family, loras, shard_weights="off"):
    engine = make_engine(rank, world_size, ulysses, ring, shard_weights=shard_weights)
    out = {"latent": engine.sample(lora_request(dit_path, family, loras)).latent}
    assert engine.sharded["dit"] == (shard_weights == "on")
    return out


def sharded_text_rank(rank, world_size, family, files, prompt, part):
    """A family's text encoding with sharded weights (every rank takes part): the conditioning, and the bytes of
    the sharded part (`part`, a text part's input) this rank holds and read of its file."""
    from usp_video.distributed.formats.tensor_file import TensorFile
    from usp_video.distributed.parallel.fsdp import parameter_bytes
    from usp_video.distributed.requests import EncodeRequest

    engine = make_engine(rank, world_size, shard_weights="on")
    req = EncodeRequest(family=family, files=files, prompt=prompt)
    assert engine.encode_on_all_ranks(req)
    cond = engine.encode(req)
    return {**{f"cond:{k}": v for k, v in cond.items()}, "bytes": torch.tensor([parameter_bytes(engine.text.text_part(part))]),
            "read": torch.tensor([TensorFile.read_from[str(Path(files[part]))]])}

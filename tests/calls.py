"""Keyword-style calls of the api for the tests: they build the requests (distributed/requests.py)
that api.encode / api.sample take, so that a test reads as the sampler inputs it varies."""

from usp_video.distributed import api
from usp_video.distributed.requests import SampleRequest


def encode_text(group, path, prompt):
    """Wan 2.1's UMT5 conditioning [1, L, D]."""
    return api.encode(group, "wan2.1", {"text_encoder": path}, prompt)["tokens"]


def encode_hunyuan_text(group, llama, clip, tokenizers, prompt):
    """HunyuanVideo's (tokens [1, n, D], pooled [1, 768])."""
    cond = api.encode(group, "hunyuan-video", {"llama": llama, "clip": clip, "tokenizers": tokenizers}, prompt)
    return cond["tokens"], cond["pooled_output"]


def request(dit, *, positive, negative, latent, seed, steps, cfg, shift, sampler="unipc", denoise=1.0,
            positive_pooled=None, negative_pooled=None, guidance=None, preview=False, fault=None) -> SampleRequest:
    def cond(tokens, pooled):
        if tokens is None:
            return None
        return {"tokens": tokens} if pooled is None else {"tokens": tokens, "pooled_output": pooled}

    return SampleRequest(experts=[dit], positive=cond(positive, positive_pooled), negative=cond(negative, negative_pooled),
                         latent=latent, seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler, denoise=denoise,
                         options={} if guidance is None else {"guidance": guidance}, preview=preview, fault=fault)


def sample(group, dit, *, text_dim=None, on_progress=None, should_cancel=None, on_start=None, **fields):
    """api.sample with the request's fields as keywords; returns (latent, reply)."""
    return api.sample(group, request(dit, **fields), text_dim=text_dim, on_progress=on_progress,
                      should_cancel=should_cancel, on_start=on_start)

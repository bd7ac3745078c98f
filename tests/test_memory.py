"""The memory pre-flight of a DiT load: predicted from the file's header, checked against the free
memory before anything is allocated (the prediction against measured peaks: benchmarks/memory_bench.py)."""

import pytest

from usp_video.distributed import engine as engine_module
from usp_video.distributed.models import FAMILIES
from parity_targets import make_engine


def test_a_device_too_small_is_refused_with_what_to_change(tiny_models, monkeypatch):
    need = FAMILIES["wan2.1"].dit_load_bytes(tiny_models["dit"], make_engine().dtype, 1)
    monkeypatch.setattr(engine_module, "_free_memory", lambda device: need - 1)
    engine = make_engine()
    with pytest.raises(ValueError, match=r"tiny_wan2.1_t2v.safetensors needs about 0.\d GiB on each rank to load "
                                         r"\(a whole copy on every rank\), but the device has 0.\d GiB free: use more "
                                         r"GPUs with shard_weights on; or load the model's fp8 file"):
        engine.dit(tiny_models["dit"])
    assert engine.load_counts["dit"] == 0  # refused before loading
    monkeypatch.setattr(engine_module, "_free_memory", lambda device: need)
    engine.dit(tiny_models["dit"])
    assert engine.load_counts["dit"] == 1


def test_the_prediction_counts_the_weights_once_and_shares_them(tiny_models):
    import os

    family = FAMILIES["wan2.1"]
    whole, halves = (family.dit_load_bytes(tiny_models["dit"], make_engine().dtype, n) for n in (1, 2))
    size = os.path.getsize(tiny_models["dit"])  # fp32 file at fp32: the weights' bytes, plus the header
    assert size < whole < size + (80 << 20) and halves < whole - size / 2 + 1e5


def test_a_whole_file_loader_is_predicted_at_its_model_not_its_file_too(tiny_hunyuan):
    """A loader that builds the whole model before sharding it (ModelFamily's default prediction; the
    diffusers folders load so) is predicted at its parameters at the compute dtype, whatever the sharing
    (the file itself is read through the page cache). HunyuanVideo's single file is streamed: its share."""
    import math

    import torch
    from safetensors import safe_open

    from usp_video.distributed.models.family import ModelFamily

    with safe_open(tiny_hunyuan["dit"], "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    family = FAMILIES["hunyuan-video"]
    assert ModelFamily.dit_load_bytes(family, tiny_hunyuan["dit"], torch.float32, 1) == params * 4
    assert ModelFamily.dit_load_bytes(family, tiny_hunyuan["dit"], torch.float32, 4) == params * 4
    whole, quarter = (family.dit_load_bytes(tiny_hunyuan["dit"], torch.float32, n) for n in (1, 4))
    assert params * 4 < whole < params * 4 + (80 << 20) and quarter < whole - params * 4 * 0.7

"""The memory pre-flight of a DiT load: predicted from the file's header, checked against the free
memory before anything is allocated (the prediction against measured peaks: benchmarks/memory_bench.py)."""

import pytest

from usp_video.distributed.models import FAMILIES
from usp_video.distributed.preflight import free_memory
from usp_video.distributed.residency import HOST
from parity_targets import make_engine


class Probe:
    """A free-memory probe handed to the engine: `free` bytes on any device (None: the real probe's answer),
    and the devices it was asked about."""

    def __init__(self, free=None):
        self.free, self.asked = free, []

    def __call__(self, device):
        self.asked.append(device)
        return free_memory(device) if self.free is None else self.free


def test_a_device_too_small_is_refused_with_what_to_change(tiny_models):
    need = FAMILIES["wan2.1"].dit_load_bytes(tiny_models["dit"], make_engine().dtype, 1)
    probe = Probe(need - 1)
    engine = make_engine(free_memory=probe)
    with pytest.raises(ValueError, match=r"tiny_wan2.1_t2v.safetensors needs about 0.\d GiB on each rank to load "
                                         r"\(a whole copy on every rank\), but the device has 0.\d GiB free: use more "
                                         r"GPUs with shard_weights on; or load the model's fp8 file"):
        engine.dit(tiny_models["dit"])
    assert engine.load_counts["dit"] == 0  # refused before loading
    probe.free = need
    engine.dit(tiny_models["dit"])
    assert engine.load_counts["dit"] == 1


def test_an_offloaded_load_checks_the_hosts_memory(tiny_models):
    """dit_offload loads the shares into host memory: the host is checked (the device then holds about two
    gathered blocks, which the activations pre-flight counts), and the refusal says so."""
    family = FAMILIES["wan2.1"]
    need = family.dit_load_bytes(tiny_models["dit"], make_engine().dtype, 1)
    probe = Probe(need - 1)
    with pytest.raises(ValueError, match=r"needs about 0.\d GiB of host memory on each rank to load \(dit_offload keeps "
                                         r"its weight shards there\), but the host has 0.\d GiB free: use more hosts"):
        make_engine(free_memory=probe).preflight.check_memory(tiny_models["dit"], family, True, HOST, offload=True)
    assert probe.asked == [HOST]


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


# -- the activations pre-flight (memory.py) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def activation_dit(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import activation_bench

    return activation_bench, activation_bench.write_model(activation_bench.BASE,
                                                          tmp_path_factory.mktemp("act") / "dit.safetensors")


@pytest.mark.parametrize("shape", [(5, 40, 40), (7, 48, 48), (9, 40, 60)])
def test_the_activation_prediction_is_above_the_measured_peak_and_within_1_3x(activation_dit, shape):
    """One euler step with cfg 5 (both passes in one batch) on one rank: 2000, 2688 and 5400 tokens."""
    bench, path = activation_dit
    row = bench.measure(path, shape, 5.0)
    assert 1.0 <= row["ratio"] <= 1.3, row


@pytest.mark.parametrize("ulysses, ring, most", [(1, 2, 1.3), (2, 1, 1.45)])
def test_the_activation_prediction_with_sequence_parallelism(activation_dit, ulysses, ring, most):
    """Two ranks, each holding half the tokens (memory.py says why Ulysses is looser at this width)."""
    bench, path = activation_dit
    row = bench.measure(path, (7, 48, 48), 5.0, 2, ulysses, ring)
    assert 1.0 <= row["ratio"] <= most, row


def test_a_step_too_big_for_the_device_is_refused_before_it_starts(tiny_models):
    from parity_targets import sample_request

    probe = Probe()
    engine = make_engine(free_memory=probe)
    request = sample_request(tiny_models["dit"], (9, 32, 32), steps=2, sampler="euler")
    dit = engine.load_dit(tiny_models["dit"])
    need = engine.preflight.activation_bytes([dit], tuple(request.latent.shape), 24, passes=2)
    started = []
    probe.free = need - 1
    with pytest.raises(ValueError, match=r"a step on this latent needs about 0.\d\d GiB of activations on each rank, "
                                         r"but the device has 0.\d\d GiB free with the model loaded: use a smaller "
                                         r"video \(fewer frames, or a smaller width x height: the latent 9x32x32 makes "
                                         r"2304 tokens\); or more GPUs"):
        engine.sample(request, on_start=lambda: started.append(1))
    assert started == []
    probe.free = need
    engine.sample(request, on_start=lambda: started.append(1))
    assert started == [1]


def test_the_activation_prediction_follows_tokens_batch_and_ranks():
    from usp_video.distributed.memory import FIXED, step_activation_bytes

    one = step_activation_bytes(1000, 512, 2048, 1, 4) - 2 * FIXED
    assert step_activation_bytes(2000, 512, 2048, 1, 4) - 2 * FIXED == 2 * one
    assert step_activation_bytes(1000, 512, 2048, 2, 4) - 3 * FIXED == 2 * one
    assert step_activation_bytes(1000, 512, 2048, 1, 2) - 2 * FIXED == one // 2
    assert step_activation_bytes(1001, 512, 2048, 1, 4, sp_ranks=2, ring=2) > \
        step_activation_bytes(501, 512, 2048, 1, 4) > step_activation_bytes(500, 512, 2048, 1, 4)


def test_an_idle_expert_parked_in_host_memory_needs_room_for_two(tiny_models):
    """placement offload: an idle expert is loaded into host memory, and at the switch the running expert
    joins it there before it leaves: the host must hold two (a CUDA group checks this; on CPU ranks the
    device is the host, so the check is called directly)."""
    probe = Probe()
    preflight = make_engine(free_memory=probe).preflight
    family = FAMILIES["wan2.1"]
    one = family.dit_load_bytes(tiny_models["dit"], preflight.dtype, 1)
    probe.free = int(1.5 * one)
    preflight.check_memory(tiny_models["dit"], family, False, HOST)  # one copy fits
    with pytest.raises(ValueError, match=r"waits in host memory while the other expert runs \(placement offload\), "
                                         r"and at the switch the two meet there: .* set the group's placement to keep"):
        preflight.check_memory(tiny_models["dit"], family, False, HOST, idle=True)
    probe.free = 2 * one
    preflight.check_memory(tiny_models["dit"], family, False, HOST, idle=True)


def test_passes_of_different_shapes_are_predicted_one_at_a_time(tiny_models):
    """A negative prompt of another length runs as its own pass (denoise does not batch it): the pre-flight
    counts one pass of the longer text, so a device with room for that, though not for two, runs it."""
    import torch

    from parity_targets import sample_request

    probe = Probe()
    engine = make_engine(free_memory=probe)
    request = sample_request(tiny_models["dit"], (9, 32, 32), steps=1, sampler="euler")
    request.negative = {"tokens": torch.randn(1, 30, 32)}
    dit = engine.load_dit(tiny_models["dit"])
    one = engine.preflight.activation_bytes([dit], tuple(request.latent.shape), 30, passes=1)
    two = engine.preflight.activation_bytes([dit], tuple(request.latent.shape), 30, passes=2)
    assert one < two
    probe.free = one
    engine.sample(request)

"""Placement (distributed/residency.py): where idle text encoders and experts wait.

On CPU ranks the device is the host, so a move changes no memory; these tests check what is moved,
when, in which order, and that results do not depend on the placement. gpu_check measures the device
memory handed back on a GPU.
"""

import pytest
import torch

from parity_targets import sample_request, wan22_request
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.engine import Engine
from usp_video.distributed.residency import HOST, Placement, modules_of, text_slot
from usp_video.distributed.requests import EncodeRequest

SHAPE = (3, 4, 6)


@pytest.fixture
def moves(monkeypatch):
    """Every move Placement makes: (slot, "device" or "host")."""
    made = []
    real_bring, real_park = Placement.bring, Placement.park

    def bring(self, slot, loaded):
        if self.where.get(slot) == "host":
            made.append((slot.kind, "device"))
        real_bring(self, slot, loaded)

    def park(self, slot, loaded):
        if self.where.get(slot) == "device":
            made.append((slot.kind, "host"))
        real_park(self, slot, loaded)

    monkeypatch.setattr(Placement, "bring", bring)
    monkeypatch.setattr(Placement, "park", park)
    return made


def engine(placement):
    return Engine(GroupConfig(ranks=1, placement=placement))


def experts_where(eng, paths):
    slots = {path: next(s for s in eng.placement.where if s.kind == "dit" and path in s.path) for path in paths}
    return [eng.placement.where[slots[p]] for p in paths]


def test_the_idle_expert_waits_in_host_memory_and_the_results_do_not_change(experts, moves):
    request = wan22_request(experts, SHAPE, "euler")
    results = {}
    for placement in ("keep", "offload", "cpu"):
        eng = engine(placement)
        eng.dit_info(experts, "wan2.2-a14b")  # the loader: both experts loaded, the high-noise one to run first
        assert experts_where(eng, experts) == (["device", "device"] if placement == "keep" else ["device", "host"])
        moves.clear()
        results[placement] = eng.sample(request).latent
        if placement == "keep":
            assert moves == []
            assert experts_where(eng, experts) == ["device", "device"]
        else:  # at the switch: the high-noise expert leaves before the low-noise one comes
            assert moves == [("dit", "host"), ("dit", "device")]
            assert experts_where(eng, experts) == ["host", "device"]
            moves.clear()
            eng.sample(request).latent  # the next prompt starts on the high-noise expert again
            assert moves == [("dit", "host"), ("dit", "device"), ("dit", "host"), ("dit", "device")]
        assert eng.load_counts["dit"] == 2  # the loader's experts are the sampler's: nothing loads twice
    assert torch.equal(results["keep"], results["offload"]) and torch.equal(results["keep"], results["cpu"])


def test_two_advanced_samplers_keep_the_other_expert_in_host_memory(experts, moves):
    eng = engine("offload")
    high = wan22_request(experts[:1], SHAPE, "euler")
    high.keep = [experts[1]]
    eng.sample(high)
    assert experts_where(eng, experts) == ["device", "host"]
    low = wan22_request(experts[1:], SHAPE, "euler")
    low.keep = [experts[0]]
    moves.clear()
    eng.sample(low)
    assert moves == [("dit", "host"), ("dit", "device")]
    assert experts_where(eng, experts) == ["host", "device"]
    assert eng.load_counts["dit"] == 2


def test_a_single_dit_is_never_moved(tiny_models, moves):
    eng = engine("offload")
    eng.sample(sample_request(tiny_models["dit"], SHAPE, steps=2))
    eng.sample(sample_request(tiny_models["dit"], SHAPE, steps=2))
    assert [m for m in moves if m[0] == "dit"] == []


@pytest.mark.parametrize("placement, after", [("keep", "device"), ("offload", "host"), ("cpu", "cpu")])
def test_the_text_encoder_leaves_the_device_after_encoding(tiny_models, moves, placement, after):
    eng = engine(placement)
    request = EncodeRequest(family="wan2.1", files={"text_encoder": tiny_models["text_encoder"]}, prompt="a cat")
    first = eng.encode(request)
    assert eng.placement.where[text_slot("text_encoder")] == after
    second = eng.encode(request)
    assert torch.equal(first["tokens"], second["tokens"])
    assert moves == ([("text", "host"), ("text", "device"), ("text", "host")] if placement == "offload" else [])
    assert eng.load_counts["text_encoder"] == 1
    assert torch.equal(first["tokens"], engine("keep").encode(request)["tokens"])


def test_a_move_moves_every_module_of_a_loaded_model(tiny_models):
    from usp_video.distributed.models.wan21 import umt5

    encoder = umt5.load_umt5(tiny_models["text_encoder"])
    assert modules_of(encoder) == [encoder.model]
    assert modules_of((encoder, "tokenizer")) == [encoder.model]
    moved = []
    placement = Placement("offload", torch.device("cpu"))
    placement._move = lambda loaded, device: moved.append((modules_of(loaded), device))
    placement.loaded(text_slot("umt5"), "device")
    placement.park(text_slot("umt5"), encoder)
    placement.park(text_slot("umt5"), encoder)  # already there: nothing to move
    assert moved == [([encoder.model], HOST)]


def test_a_bad_placement_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="placement must be one of keep, offload, cpu, got 'gpu'"):
        GroupConfig(placement="gpu")

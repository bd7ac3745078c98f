"""The machine a user really has (issue #33): the ranks' environment (ComfyUI's cudaMallocAsync allocator dropped,
the user's NCCL_* kept, CUDA_VISIBLE_DEVICES and the `gpus` input honoured), native Windows refused, mixed cards
warned about, and each card reported. No GPU here: the cards are described by fake probes (cards.Card)."""

import pytest

from group_helpers import group_processes
from usp_video.distributed import cards, client, launcher
from usp_video.distributed.cards import Card
from usp_video.distributed.config import GroupConfig
from usp_video.nodes import services

GiB = 2**30
RTX_5090 = dict(name="NVIDIA GeForce RTX 5090", memory_bytes=32 * GiB, capability=(12, 0), multiprocessors=170,
                clock_khz=2407000)
RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", memory_bytes=24 * GiB, capability=(8, 9), multiprocessors=128,
                clock_khz=2520000)
H100 = dict(name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GiB, capability=(9, 0), multiprocessors=132,
            clock_khz=1980000)


def fake_probe(specs: dict[int, dict], peers: dict[int, tuple[int, ...]] | None = None):
    """A card probe for a machine whose GPU i is specs[i] (peer-to-peer: peers[i], else none)."""
    def probe(indices):
        return [Card(i, **specs[i], peers=tuple(j for j in (peers or {}).get(i, ()) if j in indices))
                for i in indices]
    return probe


@pytest.mark.parametrize("given, kept", [
    ("backend:cudaMallocAsync", None),
    ("backend:cudaMallocAsync,garbage_collection_threshold:0.6", "garbage_collection_threshold:0.6"),
    ("expandable_segments:True, backend: cudaMallocAsync", "expandable_segments:True"),
    ("expandable_segments:True", "expandable_segments:True"),
    ("backend:native,max_split_size_mb:128", "backend:native,max_split_size_mb:128"),
])
def test_the_allocator_setting_loses_only_cudamallocasync(given, kept, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", given)
    env = launcher.group_environment(GroupConfig(ranks=2), tmp_path, "secret")
    assert env.get("PYTORCH_CUDA_ALLOC_CONF") == kept


def test_a_live_ranks_environment_has_no_cudamallocasync_and_keeps_the_users_nccl_settings(monkeypatch):
    """Read from the running ranks (/proc/<pid>/environ: what each rank was started with), not from the function
    that builds it. Planted: group_environment copying PYTORCH_CUDA_ALLOC_CONF unchanged -> this fails."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync,garbage_collection_threshold:0.6")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth7")
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    group = client.UspGroup(GroupConfig(ranks=2)).start()
    try:
        ranks = group_processes(group)
        assert sorted(ranks) == [0, 1]
        for rank, pid in ranks.items():
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.decode().split("=", 1) for e in f.read().split(b"\0") if b"=" in e)
            assert "cudaMallocAsync" not in env.get("PYTORCH_CUDA_ALLOC_CONF", ""), rank
            assert env["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6", rank
            assert (env["NCCL_DEBUG"], env["NCCL_SOCKET_IFNAME"], env["NCCL_P2P_DISABLE"]) == ("WARN", "eth7", "1")
    finally:
        group.close()
        group.cleanup_files()


def test_gpus_are_indices_among_the_gpus_this_process_sees():
    assert launcher.visible_gpus((0, 1), None) == "0,1"
    assert launcher.visible_gpus((1,), "3,5") == "5"  # under CUDA_VISIBLE_DEVICES=3,5, GPU 1 is physical 5
    assert launcher.visible_gpus((0, 1), "GPU-aaa,GPU-bbb") == "GPU-aaa,GPU-bbb"
    with pytest.raises(ValueError, match=r"gpus lists \[2\], but CUDA_VISIBLE_DEVICES=3,5 shows this process 2 GPU"):
        launcher.visible_gpus((0, 2), "3,5")


def _start_until_launch(monkeypatch, config, probe):
    """UspGroup.start up to torchrun's launch (no GPU here): the environment the ranks would get."""
    seen = {}

    def popen(command, env, **kwargs):
        seen["env"] = env
        raise RuntimeError("launch stopped by the test")

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    monkeypatch.setattr(client.UspGroup, "card_probe", staticmethod(probe))
    group = client.UspGroup(config)
    with pytest.raises(RuntimeError, match="launch stopped by the test"):
        group.start()
    return group, seen["env"]


def test_a_cuda_group_launches_on_its_gpus_with_the_link_its_cards_have(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    monkeypatch.delenv("USP_VIDEO_LINK", raising=False)
    probe = fake_probe({0: H100, 1: H100, 2: H100}, peers={1: (2,), 2: (1,)})
    group, env = _start_until_launch(monkeypatch, GroupConfig(ranks=2, device="cuda", gpus=(1, 2)), probe)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and env["USP_VIDEO_LINK"] == "nvlink"
    assert [c.index for c in group.cards] == [1, 2] and group.warnings == []
    group, env = _start_until_launch(monkeypatch, GroupConfig(ranks=2, device="cuda", gpus=(0, 1)), probe)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,6" and env["USP_VIDEO_LINK"] == "pcie"  # GPU 0 has no P2P
    monkeypatch.setenv("USP_VIDEO_LINK", "xgmi")  # the user's word wins
    _, env = _start_until_launch(monkeypatch, GroupConfig(ranks=2, device="cuda", gpus=(0, 1)), probe)
    assert env["USP_VIDEO_LINK"] == "xgmi"


def test_native_windows_is_refused_at_group_start_naming_wsl2(monkeypatch):
    with pytest.raises(ValueError, match="native Windows.*NCCL.*WSL2"):
        cards.check_platform("Windows")
    cards.check_platform("Linux")
    monkeypatch.setattr(cards.platform, "system", lambda: "Windows")
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ValueError, match="Run ComfyUI inside WSL2"):
        client.UspGroup(GroupConfig(ranks=2)).start()


def test_mixed_cards_warn_naming_the_slowest_and_size_plans_to_the_smallest(monkeypatch):
    probe = fake_probe({0: RTX_5090, 1: RTX_4090}, peers={0: (1,), 1: (0,)})
    found, warnings = cards.check_machine((0, 1), probe, system="Linux")
    assert len(warnings) == 1
    assert "the slowest card, GPU 1 (NVIDIA GeForce RTX 4090" in warnings[0]
    assert "sized to the smallest memory, GPU 1 (NVIDIA GeForce RTX 4090, 24.0 GiB)" in warnings[0]
    assert cards.smallest_memory(found).index == 1
    # an H100 beside a 4090 (more memory and faster): the 4090 is still the slowest and the smallest
    assert "slowest card, GPU 1" in cards.mixed_warning(fake_probe({0: H100, 1: RTX_4090})((0, 1)))
    # a 5090 with less memory than an H100 is the slowest of the two by its tensor cores
    assert "slowest card, GPU 0 (NVIDIA GeForce RTX 5090" in cards.mixed_warning(fake_probe({0: RTX_5090, 1: H100})((0, 1)))
    assert cards.check_machine((0, 1), fake_probe({0: RTX_4090, 1: RTX_4090}), system="Linux")[1] == []
    # the `gpus` input picks alike cards out of a mixed machine: no warning
    mixed = fake_probe({0: RTX_5090, 1: RTX_4090, 2: RTX_4090})
    assert cards.check_machine((1, 2), mixed, system="Linux")[1] == []


def test_each_card_is_reported_in_the_groups_info_and_the_state_box(monkeypatch):
    probe = fake_probe({0: RTX_5090, 1: RTX_4090, 2: RTX_4090}, peers={1: (2,), 2: (1,)})
    group, _ = _start_until_launch(monkeypatch, GroupConfig(ranks=3, device="cuda", gpus=(0, 1, 2)), probe)
    lines = services.card_lines(group)
    assert lines[:3] == [
        "GPU 0: NVIDIA GeForce RTX 5090, 32.0 GiB, capability 12.0, no peer-to-peer (through host memory)",
        "GPU 1: NVIDIA GeForce RTX 4090, 24.0 GiB, capability 8.9, peer-to-peer with GPU 2 only",
        "GPU 2: NVIDIA GeForce RTX 4090, 24.0 GiB, capability 8.9, peer-to-peer with GPU 1 only"]
    assert lines[3].startswith("warning: the group's GPUs differ")
    services.clear_status()
    try:
        text = services.publish_status(group="3 ranks", cards=lines)["text"]
        assert all(line in text.splitlines() for line in lines)
    finally:
        services.clear_status()
    with pytest.raises(ValueError, match="no CUDA/ROCm GPU is visible"):  # no card at all: the node's message
        from usp_video.nodes.group_node import parse_gpus

        parse_gpus("all", 0)

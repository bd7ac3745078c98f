"""The sidecar group as the nodes see it: progress, cancel, errors, dead ranks, reuse."""

import re
import time

import torch

import pytest

from group_helpers import group_gone, group_processes, kill, text, zeros_latent
from usp_video.distributed import api
from usp_video.distributed.client import GroupError, Interrupted, RequestError
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group, get_group
import calls


@pytest.fixture
def faults_allowed(monkeypatch):
    monkeypatch.setenv("USP_VIDEO_ALLOW_FAULTS", "1")
    yield
    free_group()


def run_sample(group, dit, steps=6, latent=None, **kw):
    return calls.sample(group, dit, positive=text(), negative=text(seed=1), latent=latent if latent is not None else zeros_latent(),
                      seed=1, steps=steps, cfg=4.0, shift=5.0, sampler="euler", **kw)


def test_progress_events_reach_the_hook(tiny_models, faults_allowed):
    group = GroupConfig(ranks=2)
    events = []
    latent, info = run_sample(group, tiny_models["dit"], steps=5, on_progress=events.append)
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["total"] == 5 for e in events)
    assert latent.shape == zeros_latent().shape and info["ulysses"] * info["ring"] == 2


def test_step_times_leave_out_the_model_load(tiny_models, faults_allowed):
    """A fresh group loads the DiT inside the first sample request (seconds: the ranks import
    diffusers); the progress events time the steps only, so the first one does not report the load
    as step time (and the ETA is not inflated by it)."""
    group = GroupConfig(ranks=2)
    get_group(group)
    sent = time.monotonic()
    arrived = []
    latent, info = run_sample(group, tiny_models["dit"], steps=3,
                              on_progress=lambda e: arrived.append((time.monotonic() - sent, e["elapsed"])))
    first_wall, first_elapsed = arrived[0]
    assert first_wall > 1.0, f"the request took {first_wall:.2f} s to its first step: was the model loaded before?"
    assert first_elapsed < 0.5 * first_wall, f"step 1 reported {first_elapsed:.2f} s of {first_wall:.2f} s"
    assert info["sampling_seconds"] <= info["seconds"]


def test_cancel_stops_every_rank_at_the_same_step_and_keeps_models(tiny_models, faults_allowed):
    group = GroupConfig(ranks=3, ring=3, ulysses=1)
    big = zeros_latent(frames=6, height=32, width=32)  # 1536 tokens: steps long enough to cancel between
    run_sample(group, tiny_models["dit"], steps=1, latent=big)
    pid = get_group(group).proc.pid
    cancel_at = 2
    seen = []
    with pytest.raises(Interrupted) as info:
        run_sample(group, tiny_models["dit"], steps=20, latent=big, on_progress=lambda e: seen.append(e["step"]),
                   should_cancel=lambda: bool(seen) and seen[-1] >= cancel_at)
    assert info.value.step in (cancel_at, cancel_at + 1), f"stopped after step {info.value.step}"
    latent, _ = run_sample(group, tiny_models["dit"], steps=2)  # the group is still usable
    assert latent.isfinite().all()
    g = get_group(group)
    assert g.proc.pid == pid
    status, _ = g.request({"type": "ping"})
    assert status["load_counts"]["dit"] == 1


def test_exception_on_rank_2_of_3_names_the_rank(tiny_models, faults_allowed):
    group = GroupConfig(ranks=3)
    with pytest.raises(GroupError, match="rank 2 of 3 failed: RuntimeError: injected fault"):
        run_sample(group, tiny_models["dit"], fault={"rank": 2, "step": 1, "kind": "raise"})
    latent, _ = run_sample(group, tiny_models["dit"], steps=2)  # relaunched by itself
    assert latent.isfinite().all()


def test_kill_9_of_a_rank_becomes_an_error_within_10_s(tiny_models, faults_allowed):
    group = GroupConfig(ranks=3)
    run_sample(group, tiny_models["dit"], steps=1)
    g = get_group(group)
    ranks = group_processes(g)
    assert sorted(ranks) == [0, 1, 2]
    killed_at = []

    def on_progress(event):
        if event["step"] == 2 and not killed_at:
            kill(ranks[1])
            killed_at.append(time.monotonic())

    big = zeros_latent(frames=6, height=24, width=24)
    with pytest.raises(GroupError) as info:
        run_sample(group, tiny_models["dit"], steps=50, latent=big, on_progress=on_progress)
    elapsed = time.monotonic() - killed_at[0]
    assert elapsed < 10, f"the error took {elapsed:.1f} s"
    assert re.search(r"^rank 1 of 3 died \(killed by SIGKILL\); the group was stopped", str(info.value)), str(info.value)
    deadline = time.monotonic() + 5
    while not group_gone(g) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_gone(g), "a process of the dead group is still running"
    latent, _ = run_sample(group, tiny_models["dit"], steps=2)  # next prompt relaunches
    assert latent.isfinite().all()


def test_request_error_keeps_the_group(tiny_models, faults_allowed):
    group = GroupConfig(ranks=2)
    run_sample(group, tiny_models["dit"], steps=1)
    pid = get_group(group).proc.pid
    with pytest.raises(RequestError, match="unknown request type"):
        get_group(group).request({"type": "frobnicate"})
    with pytest.raises(ValueError, match="none of Wan 2.1, Wan 2.1 VACE, Wan 2.2 Animate, Wan 2.2 TI2V-5B, HunyuanVideo 1.5 or HunyuanVideo diffusion models"):
        api.load_dit(group, tiny_models["vae"])
    latent, _ = run_sample(group, tiny_models["dit"], steps=1)
    assert get_group(group).proc.pid == pid and latent.isfinite().all()


def test_free_group_leaves_no_process(tiny_models):
    group = GroupConfig(ranks=2)
    g = get_group(group)
    assert len(group_processes(g)) == 2
    assert free_group()
    assert group_gone(g)


def test_changing_degrees_relaunches(tiny_models, faults_allowed):
    a = get_group(GroupConfig(ranks=2, ulysses=2, ring=1))
    _, info = run_sample(GroupConfig(ranks=2, ulysses=1, ring=2), tiny_models["dit"], steps=1)
    assert (info["ulysses"], info["ring"]) == (1, 2)
    assert group_gone(a)


def test_group_stops_when_the_comfyui_process_dies(tmp_path):
    """SIGKILL of the client process: rank 0 sees its socket close and stops the whole group."""
    import subprocess
    import sys
    import textwrap

    from group_helpers import processes_matching

    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from usp_video.distributed.config import GroupConfig
        from usp_video.distributed.registry import get_group
        group = get_group(GroupConfig(ranks=2))
        print(group.run_dir, flush=True)
        time.sleep(600)
    """))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        run_dir = client.stdout.readline().strip()
        assert run_dir, "the client did not start a group"
        assert len(processes_matching(run_dir)) == 3  # torchrun + 2 ranks
        client.kill()
        client.wait()
        deadline = time.monotonic() + 20
        while processes_matching(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_matching(run_dir) == [], "the group outlived its client"
    finally:
        client.kill()
        for pid in processes_matching(run_dir or "/nonexistent"):
            kill(pid)


def test_a_hung_rank_becomes_an_error_after_the_timeout(tiny_models, faults_allowed):
    group = GroupConfig(ranks=3, timeout=5)
    run_sample(group, tiny_models["dit"], steps=1)
    g = get_group(group)
    started = time.monotonic()
    with pytest.raises(GroupError) as info:
        run_sample(group, tiny_models["dit"], steps=4, fault={"rank": 1, "step": 1, "kind": "hang"})
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.0f} s for a 5 s timeout"
    import re

    silent = re.search(r"rank\(s\) ([\d, ]+) stopped responding", str(info.value))
    assert silent and "1" in silent[1].split(", "), str(info.value)
    assert group_gone(g)


def test_an_exception_in_the_progress_hook_cancels_and_keeps_the_group_in_step(tiny_models, faults_allowed):
    """ComfyUI's progress hook raises its interrupt exception: the run must be cancelled on the
    group before the exception reaches the node, so that the next request gets its own reply."""

    class Interrupt(Exception):
        pass

    group = GroupConfig(ranks=2)
    big = zeros_latent(frames=6, height=24, width=24)

    def hook(event):
        if event["step"] == 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_sample(group, tiny_models["dit"], steps=30, latent=big, on_progress=hook)
    events = []
    latent, _ = run_sample(group, tiny_models["dit"], steps=3, on_progress=events.append)
    assert [e["step"] for e in events] == [1, 2, 3] and latent.shape == zeros_latent().shape


def test_previews_carry_the_first_frame_of_x0(tiny_models, faults_allowed):
    from usp_video.distributed.models import FAMILIES

    WAN = FAMILIES["wan2.1"]

    events = []
    latent, _ = run_sample(GroupConfig(ranks=2), tiny_models["dit"], steps=3, on_progress=events.append, preview=True)
    assert all(e["x0"].shape == (1, 16, 1, 8, 8) for e in events)
    # euler's last step lands on its x0 estimate
    torch.testing.assert_close(events[-1]["x0"], WAN.process_in(latent)[:1, :, :1], rtol=1e-4, atol=1e-4)
    plain = []
    run_sample(GroupConfig(ranks=2), tiny_models["dit"], steps=2, on_progress=plain.append)
    assert "x0" not in plain[0]


def test_changing_the_model_reloads_only_the_dit(tiny_models, tmp_path, faults_allowed):
    import shutil

    group = GroupConfig(ranks=2)
    calls.encode_text(group, tiny_models["text_encoder"], "a cat")
    run_sample(group, tiny_models["dit"], steps=1)
    other = tmp_path / "another_wan.safetensors"
    shutil.copy(tiny_models["dit"], other)
    api.load_dit(group, other)
    run_sample(group, str(other), steps=1)
    calls.encode_text(group, tiny_models["text_encoder"], "a dog")
    status, _ = get_group(group).request({"type": "ping"})
    assert status["load_counts"] == {"text_encoder": 1, "dit": 2}


def test_an_error_on_one_rank_only_replaces_rank_0s_answer(faults_allowed):
    """Rank 0 succeeds, rank 1 refuses: the client gets the error, not an 'ok' and a stray error
    that would answer its next request."""
    group = get_group(GroupConfig(ranks=2))
    with pytest.raises(RequestError, match="injected request error on rank 1"):
        group.request({"type": "ping", "fault": {"rank": 1, "kind": "value_error"}})
    reply, _ = group.request({"type": "ping"})
    assert reply["type"] == "ok" and reply["world_size"] == 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_with_a_cancel_pending_is_named(tiny_models, faults_allowed, rank):
    """A step whose first block takes minutes (1x1024x1024 latent frames on the tiny Wan, no time limit): Cancel,
    then a rank killed before the group answers. Rank 0 dies (killed, or stopped by torchrun after rank 1 was)
    inside its block with the cancel frame unread, so its socket resets: the client must say which rank died, not
    `[Errno 104] Connection reset by peer`. (Killing rank 0 itself makes the reset come first every time.)"""
    import os
    import signal
    import threading

    group = GroupConfig(ranks=2)
    g = get_group(group)
    started = []

    def should_cancel():
        if started and time.monotonic() - started[0] > 2:
            if len(started) == 1:
                started.append("killed")
                pid = int((g.run_dir / f"rank{rank}.pid").read_text())
                threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
            return True
        return False

    with pytest.raises(GroupError) as info:
        api.sample(g, api.SampleRequest(experts=[tiny_models["dit"]], positive=text(), negative=None,
                                        latent=torch.zeros(1, 16, 1, 1024, 1024), seed=0, steps=2, cfg=1.0, shift=5.0,
                                        sampler="euler"),
                   should_cancel=should_cancel, on_start=lambda: started.append(time.monotonic()))
    assert f"rank {rank} of 2 died (killed by SIGKILL)" in str(info.value), str(info.value)
    assert group_gone(g)


@pytest.mark.timeout(180)
def test_a_group_that_does_not_answer_a_cancel_is_stopped(tiny_models, faults_allowed):
    """A block that outlasts the grace time (1x1024x1024 on the tiny Wan: minutes): Cancel ends the request within
    the grace time plus a few seconds (Interrupted, group_stopped, saying the next request starts a new group), no
    process is left, and the next request runs on a new group."""
    from usp_video.distributed.client import CANCEL_GRACE_S

    group = GroupConfig(ranks=2)
    g = get_group(group)
    started = []
    with pytest.raises(Interrupted) as info:
        api.sample(g, api.SampleRequest(experts=[tiny_models["dit"]], positive=text(), negative=None,
                                        latent=torch.zeros(1, 16, 1, 1024, 1024), seed=0, steps=2, cfg=1.0, shift=5.0,
                                        sampler="euler"),
                   should_cancel=lambda: bool(started) and time.monotonic() - started[0] > 1,
                   on_start=lambda: started.append(time.monotonic()))
    took = time.monotonic() - started[0] - 1
    assert info.value.group_stopped and "the next prompt starts a new group" in str(info.value)
    assert took < CANCEL_GRACE_S + 10, f"{took:.1f} s from the Cancel"
    assert group_gone(g)
    latent, _ = run_sample(group, tiny_models["dit"], steps=1)
    assert latent.isfinite().all() and get_group(group) is not g


@pytest.mark.timeout(240)
def test_a_cancel_inside_a_step_leaves_sharded_weights_usable(tiny_models, faults_allowed):
    """FSDP-sharded weights (shard_weights on): a Cancel that stops the ranks between two blocks (mid_step) leaves
    the model as it was; the next sample gives the same latent as before the Cancel."""
    group = GroupConfig(ranks=2, shard_weights="on")
    before, _ = run_sample(group, tiny_models["dit"], steps=2)
    started = []
    with pytest.raises(Interrupted) as info:
        api.sample(get_group(group), api.SampleRequest(
            experts=[tiny_models["dit"]], positive=text(), negative=None, latent=zeros_latent(frames=5, height=64, width=64),
            seed=0, steps=3, cfg=1.0, shift=5.0, sampler="euler"),
            should_cancel=lambda: bool(started), on_start=lambda: started.append(True))
    assert info.value.mid_step and not info.value.group_stopped, str(info.value)
    after, _ = run_sample(group, tiny_models["dit"], steps=2)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.timeout(240)
def test_cfg_parallel_halves_agree_between_blocks(tiny_models, faults_allowed):
    """cfg-parallel: each half runs its own pass, the same blocks, so the per-block agreement holds (a Cancel stops both
    inside the step); with a step cache the halves may skip different blocks, so there the ranks look for a Cancel
    only after a step: a cached run with a high threshold (blocks skipped on either half) still completes."""
    group = GroupConfig(ranks=2, cfg_parallel=2, ulysses=1, ring=1, timeout=20)
    latent, info = api.sample(group, api.SampleRequest(
        experts=[tiny_models["dit"]], positive=text(), negative=text(seed=1), latent=zeros_latent(), seed=1, steps=6,
        cfg=4.0, shift=5.0, sampler="euler", cache={"method": "fbcache", "threshold": 0.5}))
    assert latent.isfinite().all() and info["cache"]["skipped_steps"], info
    started = []
    with pytest.raises(Interrupted) as info:
        run_sample(group, tiny_models["dit"], steps=3, latent=zeros_latent(frames=5, height=64, width=64),
                   should_cancel=lambda: bool(started), on_start=lambda: started.append(True))
    assert info.value.mid_step and not info.value.group_stopped, str(info.value)

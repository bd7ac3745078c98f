"""Fault injection, each fault repeated (USP_VIDEO_FAULT_REPEATS, 12 by default): every one ends
in an error or a clean shutdown within its deadline, leaves no process and no shared-memory file
behind, and the next request gets a working group."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hardening import HARDENING
from group_helpers import group_gone, group_processes, processes_matching
from usp_video.distributed.client import GroupError
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group, get_group
import calls

REPEATS = int(os.environ.get("USP_VIDEO_FAULT_REPEATS", "12"))
DEADLINE_S = 10.0  # from the fault to the error in the client
LATENT = torch.zeros(1, 16, 6, 32, 32)  # 1536 tokens: a step lasts long enough to strike mid-run


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def sample(group, dit, steps=40, **kw):
    return calls.sample(group, dit, positive=torch.randn(1, 8, 32), negative=None, latent=LATENT, seed=0, steps=steps,
                      cfg=1.0, shift=5.0, sampler="euler", **kw)


def check_clean(group, shm_before):
    deadline = time.monotonic() + 10
    while not group_gone(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not group_gone(group):
        HARDENING["orphans"] += len(group_processes(group))
    assert group_gone(group), f"processes left: {group_processes(group)}"
    assert shm_files() - shm_before == set(), "shared-memory files left behind"


def strike_mid_run(config, dit, strike, timeout_s=DEADLINE_S):
    """Start a sampling run, call strike(group) at step 2, return (exception, seconds to it)."""
    group = get_group(config)
    struck = []

    def on_progress(event):
        if event["step"] == 2 and not struck:
            strike(group)
            struck.append(time.monotonic())

    with pytest.raises((GroupError, OSError)) as info:
        sample(config, dit, on_progress=on_progress)
    assert struck, "the fault was never injected"
    return group, info.value, time.monotonic() - struck[0]


@pytest.fixture
def clean_slate():
    free_group()
    yield shm_files()
    free_group()


@pytest.mark.timeout(60 + REPEATS * 30)
def test_kill_9_of_a_rank(tiny_models, clean_slate):
    for i in range(REPEATS):
        rank = 1 + i % 2
        group, error, seconds = strike_mid_run(GroupConfig(ranks=3), tiny_models["dit"],
                                               lambda g: os.kill(group_processes(g)[rank], signal.SIGKILL))
        HARDENING["faults injected"] += 1
        assert seconds < DEADLINE_S and f"rank {rank} of 3 died (killed by SIGKILL)" in str(error), str(error)
        check_clean(group, clean_slate)
    assert sample(GroupConfig(ranks=3), tiny_models["dit"], steps=1)[0].isfinite().all()


@pytest.mark.timeout(60 + REPEATS * 40)
def test_a_rank_that_stops_responding(tiny_models, clean_slate):
    timeout = 3.0
    for i in range(REPEATS):
        group, error, seconds = strike_mid_run(GroupConfig(ranks=2, timeout=timeout), tiny_models["dit"],
                                               lambda g: os.kill(group_processes(g)[1], signal.SIGSTOP))
        HARDENING["faults injected"] += 1
        assert seconds < timeout + DEADLINE_S, f"{seconds:.1f} s"
        assert "stopped responding" in str(error) and "rank(s) 1" in str(error), str(error)
        check_clean(group, clean_slate)
    assert sample(GroupConfig(ranks=2, timeout=timeout), tiny_models["dit"], steps=1)[0].isfinite().all()


@pytest.mark.timeout(60 + REPEATS * 30)
def test_the_control_connection_dropped(tiny_models, clean_slate):
    for i in range(REPEATS):
        group, error, seconds = strike_mid_run(GroupConfig(ranks=2), tiny_models["dit"],
                                               lambda g: g.sock.shutdown(os.sys.modules["socket"].SHUT_RDWR))
        HARDENING["faults injected"] += 1
        assert seconds < DEADLINE_S
        check_clean(group, clean_slate)
    assert sample(GroupConfig(ranks=2), tiny_models["dit"], steps=1)[0].isfinite().all()


@pytest.mark.timeout(60 + REPEATS * 40)
def test_the_comfyui_side_killed_while_the_group_runs(tiny_models, tmp_path, clean_slate):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from usp_video.distributed import api
        from usp_video.distributed.config import GroupConfig
        from usp_video.distributed.registry import get_group
        from usp_video.distributed.requests import SampleRequest
        group = GroupConfig(ranks=2)
        print(get_group(group).run_dir, flush=True)
        api.sample(group, SampleRequest(experts=[{tiny_models['dit']!r}], positive=torch.randn(1, 8, 32), negative=None,
                   latent=torch.zeros(1, 16, 6, 32, 32), seed=0, steps=10000, cfg=1.0, shift=5.0, sampler="euler"),
                   on_progress=lambda e: print("step", e["step"], flush=True))
    """))
    for i in range(REPEATS):
        client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            run_dir = client.stdout.readline().strip()
            while not client.stdout.readline().startswith("step 2"):
                pass
            client.kill()
            client.wait()
            killed = time.monotonic()
            while processes_matching(run_dir) and time.monotonic() - killed < DEADLINE_S:
                time.sleep(0.05)
            HARDENING["faults injected"] += 1
            left = processes_matching(run_dir)
            HARDENING["orphans"] += len(left)
            assert not left, f"the group outlived its client by {DEADLINE_S} s"
            assert shm_files() - clean_slate == set()
        finally:
            client.kill()
            for pid in processes_matching(run_dir or "/nonexistent-run-dir"):
                os.kill(pid, signal.SIGKILL)
    assert sample(GroupConfig(ranks=2), tiny_models["dit"], steps=1)[0].isfinite().all()

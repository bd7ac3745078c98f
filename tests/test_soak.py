"""Soak: many prompts in a row on the tiny models; memory and open files stay flat.

USP_VIDEO_SOAK_PROMPTS sets the count (100 by default, a few seconds each on 2 CPU cores).

Resident memory is read only once the ranks are idle: a ping's reply proves that rank 0 has
finished the previous request, including handing its freed memory back (worker.release_freed_memory);
read while rank 0 is still decoding, RSS swings by 20% from prompt to prompt. What remains is a
slow rise of a few kB per request: torch's per-process-group record of recent collectives
(a bounded ring, measured here to level off after some 10,000 collectives at about 2 MB)."""

import os
import time

import pytest
import torch

from group_helpers import group_processes
from usp_video.distributed import api
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group, get_group
import calls

PROMPTS = int(os.environ.get("USP_VIDEO_SOAK_PROMPTS", "100"))
WARMUP = 10


def usage_when_idle(group: GroupConfig, pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    get_group(group).request({"type": "ping"})
    return {name: usage(pid) for name, pid in pids.items()}


def usage(pid: int) -> tuple[int, int]:
    """(resident kB, open file descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(60 + PROMPTS * 10)
def test_many_prompts_keep_memory_and_files_flat(tiny_models):
    group = GroupConfig(ranks=2)
    try:
        pids = None
        started = time.monotonic()
        for i in range(PROMPTS):
            pos = calls.encode_text(group, tiny_models["text_encoder"], f"prompt number {i}: a cat on a beach")
            neg = calls.encode_text(group, tiny_models["text_encoder"], "blurry")
            latent, _ = calls.sample(group, tiny_models["dit"], positive=pos, negative=neg,
                                   latent=torch.zeros(1, 16, 3, 6, 8), seed=i, steps=2, cfg=4.0, shift=5.0,
                                   sampler="unipc", text_dim=32)
            frames = api.decode(group, tiny_models["vae"], latent)
            assert frames.shape == (9, 48, 64, 3)
            if i == WARMUP - 1:
                g = get_group(group)
                pids = {"client": os.getpid(), **{f"rank {r}": p for r, p in group_processes(g).items()}}
                before = usage_when_idle(group, pids)
        after = usage_when_idle(group, pids)
        assert get_group(group).proc.pid == g.proc.pid, "the group was relaunched during the soak"
        report = []
        for name in pids:
            (rss0, fd0), (rss1, fd1) = before[name], after[name]
            report.append(f"{name}: RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MB, fds {fd0} -> {fd1}")
            assert rss1 <= rss0 * 1.05, f"{name} grew from {rss0} to {rss1} kB"
            assert fd1 <= fd0, f"{name} opened files: {fd0} -> {fd1}"
        print(f"soak: {PROMPTS} prompts in {time.monotonic() - started:.0f} s; " + "; ".join(report))
    finally:
        free_group()

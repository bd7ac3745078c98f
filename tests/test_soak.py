"""Soak: many prompts in a row on the tiny models; memory and open files stay flat.

USP_VIDEO_SOAK_PROMPTS sets the count (100 by default, a few seconds each on 2 CPU cores)."""

import os
import time

import pytest
import torch

from group_helpers import group_processes
from usp_video.distributed import api
from usp_video.distributed.client import GroupConfig, free_group, get_group

PROMPTS = int(os.environ.get("USP_VIDEO_SOAK_PROMPTS", "100"))
WARMUP = 10


def usage(pid: int) -> tuple[int, int]:
    """(resident kB, open file descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(60 + PROMPTS * 10)
def test_many_prompts_keep_memory_and_files_flat(tiny_models):
    group = GroupConfig(ranks=2)
    try:
        pids = None
        samples = []
        started = time.monotonic()
        for i in range(PROMPTS):
            pos = api.encode_text(group, tiny_models["text_encoder"], f"prompt number {i}: a cat on a beach")
            neg = api.encode_text(group, tiny_models["text_encoder"], "blurry")
            latent, _ = api.sample(group, tiny_models["dit"], positive=pos, negative=neg,
                                   latent=torch.zeros(1, 16, 3, 6, 8), seed=i, steps=2, cfg=4.0, shift=5.0,
                                   sampler="unipc", text_dim=32)
            frames = api.decode(group, tiny_models["vae"], latent)
            assert frames.shape == (9, 48, 64, 3)
            if i == WARMUP - 1:
                g = get_group(group)
                pids = {"client": os.getpid(), **{f"rank {r}": p for r, p in group_processes(g).items()}}
                before = {name: usage(pid) for name, pid in pids.items()}
        after = {name: usage(pid) for name, pid in pids.items()}
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

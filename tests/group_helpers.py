"""Helpers for tests that run a real sidecar group."""

import os
import signal
from pathlib import Path

import torch


def group_processes(group) -> dict[int, int]:
    """{rank: pid} of the group's running worker processes (their command line names the run dir)."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if str(group.run_dir).encode() in cmdline and b"torch.distributed.run" not in cmdline:
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = int(proc.name)
    return ranks


def processes_matching(text: str) -> list[int]:
    """Pids of running processes whose command line contains text."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if text.encode() in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


def group_gone(group) -> bool:
    """True once neither torchrun's session nor any rank of the group runs."""
    try:
        os.killpg(group.proc.pid, 0)
        return False
    except ProcessLookupError:
        return not group_processes(group)


def kill(pid: int, sig=signal.SIGKILL) -> None:
    os.kill(pid, sig)


def zeros_latent(frames=3, height=8, width=8) -> torch.Tensor:
    return torch.zeros(1, 16, frames, height, width)


def text(n=8, dim=32, seed=0) -> torch.Tensor:
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))

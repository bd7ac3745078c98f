"""Start, watch and stop the processes of a sidecar group: torchrun and its ranks. No sockets here.

The group is `python -m torch.distributed.run --nproc-per-node N worker_entry.py` in its own
process session, rendezvousing through files in a private run directory (nothing listens on the
network); its output goes to group.log there. Each rank writes rank<N>.pid into the run directory
(torchrun gives the ranks sessions of their own), so that a teardown can reach a rank that outlived
torchrun; a pid is only ever signalled when its command line names the run directory (never a
reused pid). client.py talks to the group; this module only owns its processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import GroupConfig

log = logging.getLogger("usp_video")

WORKER_ENTRY = Path(__file__).with_name("worker_entry.py")


def log_path(run_dir: Path) -> Path:
    """Where torchrun's and the ranks' output goes."""
    return run_dir / "group.log"


def torchrun_command(config: GroupConfig, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={config.ranks}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={run_dir / 'rendezvous'}",
            "--rdzv-conf=store_type=file", f"--rdzv-id=usp-{os.getpid()}",
            "--max-restarts=0", "--monitor-interval=0.2", str(WORKER_ENTRY),
            f"--run-dir={run_dir}", f"--config-json={config.to_json()}"]


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def allocator_conf_without_async(value: str) -> str:
    """PYTORCH_CUDA_ALLOC_CONF without the cudaMallocAsync backend, its other settings kept (in their order).

    ComfyUI sets `backend:cudaMallocAsync` on CUDA builds (its cuda_malloc.py); ranks that inherit it have hit
    NCCL out-of-memory errors at the second step (raylight PR #99): the ranks use torch's own caching allocator."""
    kept = [part for part in value.split(",") if part.strip()
            and part.replace(" ", "").lower() != "backend:cudamallocasync"]
    return ",".join(kept)


def visible_gpus(gpus: tuple[int, ...], visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the ranks: the group's `gpus` are indices among the GPUs this process sees, so
    under CUDA_VISIBLE_DEVICES=2,3 the group's GPU 0 is physical GPU 2 (a list of UUIDs maps the same way)."""
    seen = [part.strip() for part in visible.split(",")] if visible is not None and visible.strip() else None
    if seen is None:
        return ",".join(map(str, gpus))
    beyond = [i for i in gpus if i >= len(seen)]
    if beyond:
        raise ValueError(f"gpus lists {beyond}, but CUDA_VISIBLE_DEVICES={visible} shows this process "
                         f"{len(seen)} GPU(s): use indices 0..{len(seen) - 1}")
    return ",".join(seen[i] for i in gpus)


def group_environment(config: GroupConfig, run_dir: Path, secret: str, link: str | None = None) -> dict[str, str]:
    """This process's environment plus what the ranks need: the secret (never on a command line),
    loopback-only sockets (the user's NCCL_* and GLOO_* settings kept), the GPUs and threads of the config, the
    file store, and torch's own CUDA allocator (ComfyUI's cudaMallocAsync backend dropped)."""
    env = dict(os.environ)
    env["USP_VIDEO_SECRET"] = secret
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    if ALLOC_CONF in env:
        conf = allocator_conf_without_async(env[ALLOC_CONF])
        if conf:
            env[ALLOC_CONF] = conf
        else:
            del env[ALLOC_CONF]
    if config.device == "cuda" and config.gpus:  # none listed: the GPUs this process sees
        env["CUDA_VISIBLE_DEVICES"] = visible_gpus(config.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if link is not None:  # what the cards' peer-to-peer says, unless the user said (planner.auto_degrees)
        env.setdefault("USP_VIDEO_LINK", link)
    if config.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(config.threads_per_rank)
    # Rendezvous through files in the private run directory, not torchrun's TCP store (which
    # listens on every interface): a single-host group listens on loopback only.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env["USP_VIDEO_STORE"] = str(run_dir / "store")
    return env


def rank_alive(run_dir: Path, rank: int) -> bool:
    """Is that rank of the group in run_dir still running (not a zombie, not a reused pid)? (Also asked
    of an attached group, whose ranks this process did not start.)"""
    try:
        pid = int((run_dir / f"rank{rank}.pid").read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z" and str(run_dir).encode() in cmdline


class GroupProcess:
    """torchrun (in its own session) and the ranks it started, as one thing to poll and stop."""

    def __init__(self, popen: subprocess.Popen, run_dir: Path):
        self.popen, self.run_dir = popen, run_dir

    @classmethod
    def launch(cls, config: GroupConfig, run_dir: Path, secret: str, link: str | None = None) -> "GroupProcess":
        log.info("usp-video: starting group (%s), log %s", config.describe(), log_path(run_dir))
        with open(log_path(run_dir), "wb") as log_file:
            popen = subprocess.Popen(torchrun_command(config, run_dir),
                                     env=group_environment(config, run_dir, secret, link),
                                     stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return cls(popen, run_dir)

    @property
    def pid(self) -> int:
        """torchrun's pid, which is also its process session's id."""
        return self.popen.pid

    def poll(self) -> int | None:
        """torchrun's exit code, or None while it runs."""
        return self.popen.poll()

    def wait_exit(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def rank_pids(self) -> list[int]:
        """Pids of the ranks still running (each rank writes rank<N>.pid; the command line is
        checked so that a reused pid is never touched)."""
        pids = []
        for path in self.run_dir.glob("rank*.pid"):
            try:
                pid = int(path.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.run_dir).encode() in cmdline:
                pids.append(pid)
        return pids

    def processes_alive(self) -> bool:
        """Is any process of the group (torchrun, its session, or a rank) still running?"""
        if self.popen.poll() is None or self.rank_pids():
            return True
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def teardown(self, graceful: bool = True) -> None:
        """Stop every process of the group: SIGTERM first (torchrun forwards it to the ranks)
        when graceful, then SIGKILL for whatever is left (a stopped rank, say)."""
        signals = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)) if graceful else ((signal.SIGKILL, 5.0),)
        for sig, wait in signals:
            for pid in [self.popen.pid] + self.rank_pids():
                try:
                    os.killpg(pid, sig) if pid == self.popen.pid else os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.processes_alive():
                time.sleep(0.05)
            if not self.processes_alive():
                break
        self.popen.poll()

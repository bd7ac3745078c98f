"""The ComfyUI side of the sidecar group: launch, supervise, talk, cancel, tear down.

    group = get_group(GroupConfig(ranks=2))          # launched once, reused across prompts
    info, _ = group.request(*LoadRequest(paths=[...]).to_frame())   # requests.py

The group is `python -m torch.distributed.run --nproc-per-node N worker_entry.py` in its own
process session, rendezvousing through files in a private run directory (nothing listens on the
network). Rank 0 writes the port of its loopback control socket there; the client connects and
answers the HMAC challenge with the group's random secret (passed in the environment, never on a
command line). A dead rank, a dead torchrun or a closed socket becomes a GroupError naming the
rank, and nothing of the group is left running.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import protocol
from .config import GroupConfig

log = logging.getLogger("usp_video")

WORKER_ENTRY = Path(__file__).with_name("worker_entry.py")


class GroupError(RuntimeError):
    """The group failed: a rank raised, died or hung. The message names the rank."""


class RequestError(ValueError):
    """The group rejected a request (bad input); the group is still up."""


class Interrupted(Exception):
    """A request was cancelled; every rank stopped after the same step."""

    def __init__(self, step: int):
        super().__init__(f"cancelled after step {step}")
        self.step = step


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UspGroup:
    """One running sidecar group. Not thread-safe: one request at a time."""

    def __init__(self, config: GroupConfig, start_timeout: float = 300.0):
        self.config = config
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.run_dir: Path | None = None
        self.port: int | None = None
        self.secret = protocol.new_secret()
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "UspGroup":
        cfg = self.config
        self.run_dir = Path(tempfile.mkdtemp(prefix="usp-video-group-"))
        env = dict(os.environ)
        env["USP_VIDEO_SECRET"] = self.secret
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env["PYTHONUNBUFFERED"] = "1"
        if cfg.device == "cuda" and cfg.gpus:  # none listed: the GPUs this process sees
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cfg.gpus))
        if cfg.threads_per_rank:
            env["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)
        # Rendezvous through files in the private run directory, not torchrun's TCP store (which
        # listens on every interface): a single-host group listens on loopback only.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env["USP_VIDEO_STORE"] = str(self.run_dir / "store")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={cfg.ranks}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={self.run_dir / 'rendezvous'}",
               "--rdzv-conf=store_type=file", f"--rdzv-id=usp-{os.getpid()}",
               "--max-restarts=0", "--monitor-interval=0.2", str(WORKER_ENTRY),
               f"--run-dir={self.run_dir}", f"--config-json={cfg.to_json()}"]
        log.info("usp-video: starting group (%s), log %s", cfg.describe(), self.log_path)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def log_path(self) -> Path:
        return self.run_dir / "group.log"

    def _connect(self) -> None:
        port_file = self.run_dir / "control.port"
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise GroupError(f"the group did not start within {self.start_timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)open the control connection to rank 0 and authenticate."""
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        protocol.answer_challenge(self.sock, self.secret)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def attach(cls, run_dir: str | Path, secret: str, ranks: int) -> "UspGroup":
        """Connect to a group started by someone else, e.g. torchrun on several hosts (README,
        "More than one host"): its rank 0 runs on this host and writes its port into run_dir.
        The group is not supervised here; close() asks it to shut down."""
        group = cls(GroupConfig(ranks=ranks))
        group.run_dir, group.secret, group.attached = Path(run_dir), secret, True
        group._connect()
        return group

    attached = False

    def _exited(self) -> bool:
        """Has the launcher process ended? (An attached group has none here: its connection says.)"""
        return self.proc is not None and self.proc.poll() is not None

    def alive(self) -> bool:
        return self.sock is not None and (self.attached or (self.proc is not None and self.proc.poll() is None))

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self._failure()

    def _error_reports(self) -> list[dict]:
        reports = []
        for path in self.run_dir.glob("rank*.error.json"):
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass  # still being written
        return reports

    def _failure(self) -> GroupError:
        """Explain why the group failed, then stop what is left of it at once.

        A rank that raised writes a report; a rank that died (killed, out of memory, segfault)
        cannot, and its peers then report communication errors: so a dead silent rank is the
        cause, named from torchrun's summary; else the earliest report is."""
        if self._error_reports():
            time.sleep(0.5)  # let the ranks that failed with it report too
        reports = self._error_reports()
        silent = sorted(set(range(self.config.ranks)) - {r["rank"] for r in reports})
        first = min(reports, key=lambda r: r["time"]) if reports else None
        timed_out = first is not None and ("timed out" in first["message"].lower()
                                           or "timeout" in first["message"].lower())
        # after a timeout the silent ranks hung (torchrun may have killed them since); else a
        # silent rank that is gone died first and broke its peers' connections
        dead = [] if timed_out else [r for r in silent if not self._rank_alive(r)]
        if dead or not reports:
            self._wait_exit(5.0 if reports else 10.0)  # torchrun's summary says how the rank ended
        tail = self.log_tail()
        if dead or not reports:
            # torchrun's failure summary: "rank : N (local_rank: N)" then "exitcode : C (pid: P)",
            # for every rank that ended, its "Root Cause" section last
            entry = r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)"
            exits = {int(r): int(c) for r, c in re.findall(entry, tail)}
            root = re.findall(entry, tail.rpartition("Root Cause")[2]) if "Root Cause" in tail else []
            order = ([int(root[0][0])] if root else []) + list(exits)
            candidates = [r for r in order if r in dead] if dead else order
            # torchrun stops the other ranks with SIGTERM: the culprit is one that ended otherwise
            rank = next((r for r in candidates if exits.get(r) != -signal.SIGTERM),
                        candidates[0] if candidates else (dead[0] if dead else None))
            if reports and dead and all(exits.get(r) == -signal.SIGTERM for r in dead):
                dead = []  # the silent ranks were stopped by torchrun after a rank raised: the report says why
            how = ""
            if rank in exits:
                code = exits[rank]
                how = (f" (killed by {signal.Signals(-code).name})" if code < 0 and -code in signal.valid_signals()
                       else f" (exit code {code})")
            who = f"rank {rank}" if rank is not None else "a rank"
            msg = f"{who} of {self.config.ranks} died{how}; the group was stopped.\n(log: {self.log_path})"
            if not reports and not dead and (self.attached or self.proc.poll() == 0):
                msg = f"the group shut down: its control connection to rank 0 was lost.\n(log: {self.log_path})"
        if reports and not dead:
            msg = f"rank {first['rank']} of {self.config.ranks} failed: {first['error_type']}: {first['message']}"
            if timed_out:
                msg += (f"\nA collective waited longer than timeout_s={self.config.timeout:g} s"
                        + (f"; rank(s) {', '.join(map(str, silent))} stopped responding" if silent else "")
                        + ". Raise timeout_s if a step legitimately takes longer.")
            msg += f"\n(full traceback in {self.log_path})"
        self._teardown(graceful=False)
        return GroupError(msg)

    def _rank_alive(self, rank: int) -> bool:
        try:
            pid = int((self.run_dir / f"rank{rank}.pid").read_text())
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return False
        return state != "Z" and str(self.run_dir).encode() in cmdline

    def _wait_exit(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self, timeout: float = 10.0) -> None:
        """Stop the group: ask politely, then terminate the whole process session."""
        if self.proc is None and not self.attached:
            return
        if self.sock is not None and (self.attached or self.proc.poll() is None):
            try:
                protocol.send_frame(self.sock, {"type": "shutdown"})
                if self.attached:  # wait for rank 0's goodbye
                    self.sock.settimeout(timeout)
                    protocol.recv_frame(self.sock)
            except (OSError, protocol.ProtocolError):
                pass
            self._wait_exit(timeout)
        self._teardown()

    def _teardown(self, graceful: bool = True) -> None:
        """Stop every process of the group: SIGTERM first (torchrun forwards it to the ranks)
        when graceful, then SIGKILL for whatever is left (a stopped rank, say)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            signals = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)) if graceful else ((signal.SIGKILL, 5.0),)
            for sig, wait in signals:
                for pid in [self.proc.pid] + self._rank_pids():
                    try:
                        os.killpg(pid, sig) if pid == self.proc.pid else os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and self.processes_alive():
                    time.sleep(0.05)
                if not self.processes_alive():
                    break
            self.proc.poll()

    def _rank_pids(self) -> list[int]:
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
        if self.proc.poll() is None or self._rank_pids():
            return True
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def cleanup_files(self) -> None:
        if self.run_dir is not None and not self.alive():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------

    def request(self, header: dict, tensors: dict[str, torch.Tensor] | None = None, *,
                on_progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                timeout: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Send one request and wait for its reply, forwarding progress and cancel."""
        with self._lock:
            if not self.alive():
                raise GroupError("the group is not running")
            try:
                protocol.send_frame(self.sock, header, tensors)
            except OSError:
                raise self._failure() from None
            cancel_sent = False
            pending: BaseException | None = None  # raised by a hook; re-raised once the group is idle again
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._exited() or self._error_reports():
                    raise self._failure()
                if not cancel_sent and (pending is not None or self._call(should_cancel)):
                    protocol.send_frame(self.sock, {"type": "cancel"})
                    cancel_sent = True
                if deadline is not None and time.monotonic() > deadline:
                    self._teardown()
                    raise GroupError(f"no reply to {header['type']!r} within {timeout:.0f} s; the group was stopped")
                if not select.select([self.sock], [], [], 0.1)[0]:
                    continue
                try:
                    reply, out = protocol.recv_frame(self.sock)
                except protocol.ProtocolError:
                    raise self._failure() from None
                kind = reply["type"]
                if kind == "progress":
                    reply.update(out)  # an optional x0 preview tensor
                    if on_progress is not None and pending is None:
                        try:
                            on_progress(reply)
                        except BaseException as exc:  # e.g. ComfyUI's interrupt, raised by its progress hook
                            pending = exc
                    continue
                if pending is not None:
                    raise pending
                if kind == "ok":
                    return reply, out
                if kind == "interrupted":
                    raise Interrupted(reply["step"])
                if kind == "error":
                    raise RequestError(f"{reply['message']} (rank {reply['rank']}, {reply['error_type']})")
                raise GroupError(f"unexpected reply {kind!r} from rank 0")

    @staticmethod
    def _call(should_cancel: Callable[[], bool] | None) -> bool:
        return should_cancel is not None and bool(should_cancel())


class GroupRegistry:
    """The owner of the groups this process started: the current one, reused across prompts while its
    config is unchanged, and every one still running, stopped when the process exits."""

    def __init__(self):
        self.current: UspGroup | None = None
        self.live: set[UspGroup] = set()

    def get(self, config: GroupConfig) -> UspGroup:
        """The running group for config: reused while alive, relaunched after a failure, replaced
        (the old one stopped first) when the config changes."""
        current = self.current
        if current is not None and current.config == config and current.alive():
            return current
        if current is not None:
            self._stop(current)
        group = UspGroup(config)
        self.current = group
        self.live.add(group)
        return group.start()

    def free(self) -> bool:
        """Stop the current group, if any (frees its GPU memory). Returns whether one ran."""
        group, self.current = self.current, None
        if group is None:
            return False
        self._stop(group)
        return True

    def stop_all(self) -> None:
        for group in list(self.live):
            self._stop(group, timeout=5.0)
        self.current = None

    def _stop(self, group: UspGroup, timeout: float = 10.0) -> None:
        group.close(timeout=timeout)
        group.cleanup_files()
        self.live.discard(group)


GROUPS = GroupRegistry()  # this process's groups (ComfyUI's, or the CLI's)
atexit.register(GROUPS.stop_all)


def get_group(config: GroupConfig) -> UspGroup:
    return GROUPS.get(config)


def free_group() -> bool:
    return GROUPS.free()


__all__ = ["GroupConfig", "UspGroup", "GroupRegistry", "GROUPS", "GroupError", "RequestError", "Interrupted",
           "get_group", "free_group"]

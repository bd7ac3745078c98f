"""The ComfyUI side of the sidecar group: connect, talk, cancel, reconnect, close.

    group = get_group(GroupConfig(ranks=2))          # registry.py: launched once, reused across prompts
    info, _ = group.request(*LoadRequest(paths=[...]).to_frame())   # requests.py

A UspGroup starts its processes through launcher.py (torchrun in its own session, rendezvousing
through files in a private run directory: nothing listens on the network). Rank 0 writes the port of
its loopback control socket there (control_server.py); the client connects and answers the HMAC
challenge with the group's random secret (passed in the environment, never on a command line). A dead
rank, a dead torchrun or a closed socket becomes a GroupError naming the rank (postmortem.py), and
nothing of the group is left running.
"""

from __future__ import annotations

import logging
import select
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import cards, launcher, postmortem, protocol
from .config import GroupConfig
from .launcher import GroupProcess

log = logging.getLogger("usp_video")


class GroupError(RuntimeError):
    """The group failed: a rank raised, died or hung. The message names the rank."""


class RequestError(ValueError):
    """The group rejected a request (bad input); the group is still up."""


class Interrupted(Exception):
    """A request was cancelled: every rank stopped after the same step, or before the same block of a step
    (mid_step); or, when the group did not stop within the grace time, it was torn down (group_stopped: the next
    request starts a new group, which loads its models again)."""

    def __init__(self, step: int, mid_step: bool = False, group_stopped: bool = False, grace_s: float = 0.0):
        if group_stopped:
            message = (f"cancelled: the group did not stop within {grace_s:g} s of the Cancel (a block, a load or a "
                       "decode that long), so it was stopped; the next prompt starts a new group, which loads its "
                       "models again")
        elif mid_step:
            message = f"cancelled during step {step + 1} (after {step} steps)"
        else:
            message = f"cancelled after step {step}"
        super().__init__(message)
        self.step, self.mid_step, self.group_stopped = step, mid_step, group_stopped


# How long the group has, from a Cancel, to stop by itself before the client stops it. The ranks look for a Cancel
# before every DiT block: a real model's block takes well under this (tens of milliseconds to a few seconds), so
# the grace time is reached only by a block of an absurd size (the step-time pre-flight refuses most of those), a
# model load, a VAE decode, or a hung rank.
CANCEL_GRACE_S = 5.0


class UspGroup:
    """One running sidecar group. Not thread-safe: one request at a time."""

    attached = False  # started by someone else (attach): not supervised here
    card_probe = staticmethod(cards.probe_cards)  # what a GPU group's cards are (tests hand in fake ones)
    cards: tuple = ()  # the group's GPUs as start() probed them (cards.Card), none for CPU ranks
    warnings: tuple = ()  # start()'s warnings about them (a mixed set)

    def __init__(self, config: GroupConfig, start_timeout: float = 300.0):
        self.config = config
        self.start_timeout = start_timeout
        self.proc: GroupProcess | None = None
        self.sock: socket.socket | None = None
        self.run_dir: Path | None = None
        self.port: int | None = None
        self.secret = protocol.new_secret()
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "UspGroup":
        """Check the machine (cards.check_machine: native Windows refused; the cards probed, a mixed set warned
        about), then launch the ranks and connect."""
        self.cards, self.warnings = [], []
        cards.check_platform()
        if self.config.device == "cuda":
            indices = self.config.gpus or tuple(range(torch.cuda.device_count()))
            self.cards, self.warnings = cards.check_machine(indices, self.card_probe)
            for warning in self.warnings:
                log.warning("usp-video: %s", warning)
        self.run_dir = Path(tempfile.mkdtemp(prefix="usp-video-group-"))
        link = cards.link_of(self.cards) if self.cards else None
        self.proc = GroupProcess.launch(self.config, self.run_dir, self.secret, link=link)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def attach(cls, run_dir: str | Path, secret: str, ranks: int) -> "UspGroup":
        """Connect to a group started by someone else, e.g. torchrun on several hosts (docs/architecture.md,
        "More than one host"): its rank 0 runs on this host and writes its port into run_dir.
        The group is not supervised here; close() asks it to shut down."""
        group = cls(GroupConfig(ranks=ranks))
        group.run_dir, group.secret, group.attached = Path(run_dir), secret, True
        group._connect()
        return group

    @property
    def log_path(self) -> Path:
        return launcher.log_path(self.run_dir)

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

    def _exited(self) -> bool:
        """Has the launcher process ended? (An attached group has none here: its connection says.)"""
        return self.proc is not None and self.proc.poll() is not None

    def alive(self) -> bool:
        return self.sock is not None and (self.attached or (self.proc is not None and self.proc.poll() is None))

    def _check_alive(self) -> None:
        if self._exited():
            raise self._failure()

    def _failure(self) -> GroupError:
        """Explain why the group failed (postmortem.py), then stop what is left of it at once."""
        if postmortem.read_reports(self.run_dir):
            time.sleep(0.5)  # let the ranks that failed with it report too
        reports = postmortem.read_reports(self.run_dir)
        # after a timeout the silent ranks hung (torchrun may have killed them since); else a
        # silent rank that is gone died first and broke its peers' connections
        dead = [] if postmortem.timed_out(reports) else [
            r for r in postmortem.silent_ranks(reports, self.config.ranks) if not launcher.rank_alive(self.run_dir, r)]
        if (dead or not reports) and self.proc is not None:
            self.proc.wait_exit(5.0 if reports else 10.0)  # torchrun's summary says how the rank ended
        clean_exit = self.attached or (self.proc is not None and self.proc.poll() == 0)
        msg = postmortem.explain_failure(reports, self.config.ranks, dead, self.log_tail(), self.log_path,
                                         self.config.timeout, clean_exit)
        self._teardown(graceful=False)
        return GroupError(msg)

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
            if self.proc is not None:
                self.proc.wait_exit(timeout)
        self._teardown()

    def _teardown(self, graceful: bool = True) -> None:
        """Close the connection and stop every process of the group (launcher.GroupProcess.teardown)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.proc.teardown(graceful)

    def cleanup_files(self) -> None:
        if self.run_dir is not None and not self.alive():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------

    def request(self, header: dict, tensors: dict[str, torch.Tensor] | None = None, *,
                on_progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                on_start: Callable[[], None] | None = None,
                timeout: float | None = None,
                cancel_grace_s: float = CANCEL_GRACE_S) -> tuple[dict, dict[str, torch.Tensor]]:
        """Send one request and wait for its reply, forwarding progress, the start of sampling (on_start) and cancel.
        A Cancel (should_cancel, or an exception raised by a hook) not answered within cancel_grace_s stops the group
        (_stop_after_cancel); a group that fails meanwhile (a rank died) is reported as such, Cancel or not."""
        with self._lock:
            if not self.alive():
                raise GroupError("the group is not running")
            try:
                protocol.send_frame(self.sock, header, tensors)
            except OSError:
                raise self._failure() from None
            cancel_sent_at: float | None = None
            pending: BaseException | None = None  # raised by a hook; re-raised once the group is idle again
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._exited() or postmortem.read_reports(self.run_dir):
                    raise self._failure()
                if cancel_sent_at is None and (pending is not None or self._call(should_cancel)):
                    cancel_sent_at = self._send_cancel()
                if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > cancel_grace_s:
                    self._stop_after_cancel(pending, cancel_grace_s)
                if deadline is not None and time.monotonic() > deadline:
                    self._teardown()
                    raise GroupError(f"no reply to {header['type']!r} within {timeout:.0f} s; the group was stopped")
                if not select.select([self.sock], [], [], 0.1)[0]:
                    continue
                try:
                    reply, out = protocol.recv_frame(self.sock)
                except (protocol.ProtocolError, OSError):  # a reset connection: rank 0 died
                    raise self._failure() from None
                kind = reply["type"]
                if kind == "started":
                    if on_start is not None and pending is None:
                        try:
                            on_start()
                        except BaseException as exc:
                            pending = exc
                    continue
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
                    raise Interrupted(reply["step"], reply.get("mid_step", False))
                if kind == "error":
                    raise RequestError(f"{reply['message']} (rank {reply['rank']}, {reply['error_type']})")
                raise GroupError(f"unexpected reply {kind!r} from rank 0")

    def _send_cancel(self) -> float:
        """Send the cancel frame; returns when. A connection that fails here means rank 0 is gone: say why (a rank
        died, GroupError), not "connection reset"."""
        try:
            protocol.send_frame(self.sock, {"type": "cancel"})
        except OSError:
            raise self._failure() from None
        return time.monotonic()

    def _stop_after_cancel(self, pending: BaseException | None, grace_s: float) -> None:
        """The group did not stop within the grace time of a Cancel: stop it now (SIGKILL: a rank inside a long
        block would not see a SIGTERM either) and raise `pending` (ComfyUI's own interrupt, raised by its progress
        hook), else Interrupted(group_stopped); unless the group failed meanwhile (then say why: GroupError)."""
        if self._exited() or postmortem.read_reports(self.run_dir) or self._a_rank_is_gone():
            raise self._failure()
        log.warning("usp-video: the group did not stop within the grace time of a Cancel; stopping it (the next "
                    "request starts a new group)")
        if self.attached:
            self.close(timeout=2.0)
        else:
            self._teardown(graceful=False)
        if pending is not None:
            raise pending
        raise Interrupted(0, group_stopped=True, grace_s=grace_s)

    def _a_rank_is_gone(self) -> bool:
        """Has a rank of this group ended (killed, say) while torchrun has not yet noticed?"""
        return not self.attached and any(not launcher.rank_alive(self.run_dir, r) for r in range(self.config.ranks))

    @staticmethod
    def _call(should_cancel: Callable[[], bool] | None) -> bool:
        return should_cancel is not None and bool(should_cancel())


__all__ = ["GroupConfig", "UspGroup", "GroupError", "RequestError", "Interrupted"]
